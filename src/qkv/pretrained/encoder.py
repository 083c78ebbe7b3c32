"""A BERT-style encoder built on :class:`qkv.MultiHeadAttention`, and sentence embeddings.

Shape legend: B batch · H heads · L tokens · d_model width · d_k = d_model / H.

One block (post-LN, as in BERT)::

    a = MultiHeadAttention(x, key_padding_mask)      # (B, L, d_model)
    x = LayerNorm(x + a)
    x = LayerNorm(x + fc_out(gelu(fc_in(x))))        # d_model -> d_ff -> d_model

The model is for inference: dropout is left out (it is the identity in eval mode).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..modules import MultiHeadAttention
from .config import EncoderConfig, PoolingConfig
from .intermediates import EncoderIntermediates, LayerIntermediates
from .tokenizer import LanguageWarning, TokenizedText, Tokenizer, language_warning

__all__ = ["BertEncoder", "EncoderBlock", "SentenceEncoder", "mean_pool"]


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm: ``(B, L) -> (B, L, d_model)``."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)  # (L,)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # one segment
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )  # (B, L, d_model)
        return self.norm(x)


class MLP(nn.Module):
    """``fc_out(gelu(fc_in(x)))``, exact (erf) GELU as BERT's ``"gelu"``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff)
        self.fc_out = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # (B, L, d_model)


class EncoderBlock(nn.Module):
    """One post-LN block: attention, add & norm, MLP, add & norm."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto") -> None:
        super().__init__()
        d = cfg.hidden_size
        self.attention = MultiHeadAttention(d, cfg.num_attention_heads, bias=True, backend=backend)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size)
        self.mlp_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        """``x``: (B, L, d_model); ``key_padding_mask``: (B, L), True = real token."""
        a = self.attention(x, key_padding_mask=key_padding_mask)  # (B, L, d_model)
        x = self.attn_norm(x + a)
        return self.mlp_norm(x + self.mlp(x))

    def forward_intermediates(
        self, x: Tensor, key_padding_mask: Tensor
    ) -> tuple[Tensor, LayerIntermediates]:
        """Like :meth:`forward`, also returning the per-head queries, keys, values,
        weights and context vectors."""
        heads = self.attention.forward_intermediates(x, key_padding_mask=key_padding_mask)
        a = heads.output  # (B, L, d_model)
        x = self.attn_norm(x + a)
        x = self.mlp_norm(x + self.mlp(x))
        # q (B, H, L, d_k), k and v (B, H, S, d) (BERT has H_kv = H), weights (B, H, L, S),
        # context (B, H, L, d_v): the module's own, so they are what its output mixed.
        return x, LayerIntermediates(heads.q, heads.k, heads.v, heads.weights, heads.context, a, x)


class BertEncoder(nn.Module):
    """Embeddings and ``num_hidden_layers`` post-LN blocks; no pooler (mean pooling is used)."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(
            EncoderBlock(cfg, backend) for _ in range(cfg.num_hidden_layers)
        )

    def _check(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dtype != torch.long
            or input_ids.ndim != 2
        ):
            raise TypeError("input_ids must be an int64 tensor of shape (B, L)")
        n_tokens = input_ids.shape[1]
        if n_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {n_tokens} tokens; the model reads at most "
                f"{self.config.max_position_embeddings}"
            )
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask.bool()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids`` (B, L), ``attention_mask`` (B, L) True = real -> ``(B, L, d_model)``."""
        mask = self._check(input_ids, attention_mask)
        x = self.embeddings(input_ids)  # (B, L, d_model)
        for block in self.layers:
            x = block(x, mask)
        return x

    def forward_intermediates(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> EncoderIntermediates:
        """Run the encoder and keep every block's per-head attention (see
        :class:`~qkv.pretrained.EncoderIntermediates`)."""
        mask = self._check(input_ids, attention_mask)
        x = emb = self.embeddings(input_ids)  # (B, L, d_model)
        layers = []
        for block in self.layers:
            x, inter = block.forward_intermediates(x, mask)
            layers.append(inter)
        return EncoderIntermediates(input_ids, mask, emb, tuple(layers))


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the real tokens' vectors: ``(B, L, d_model), (B, L) -> (B, d_model)``."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    # The clamp only matters for an all-padding row, which tokenisation never produces.
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """A pretrained sentence encoder: tokenizer, :class:`BertEncoder`, mean pooling.

    Built by :func:`qkv.pretrained.load`. :meth:`encode` gives sentence embeddings
    like sentence-transformers' ``encode``; :meth:`run` gives every intermediate.
    """

    def __init__(
        self,
        name: str,
        config: EncoderConfig,
        pooling: PoolingConfig,
        tokenizer: Tokenizer,
        backend: str = "auto",
        model_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.encoder = BertEncoder(config, backend)
        self.eval()

    @property
    def backend(self) -> str:
        """The attention backend every block uses (``"auto"`` or a registered name)."""
        return self.encoder.layers[0].attention.backend

    def set_backend(self, backend: str) -> SentenceEncoder:
        """Switch every block's attention to ``backend`` (e.g. ``"reference"``); returns self."""
        for block in self.encoder.layers:
            block.attention.set_backend(backend)  # validates the name
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.embeddings.word_embeddings.weight.device

    def tokenize(
        self, text: str, *, truncate: bool = False, max_length: int | None = None
    ) -> TokenizedText:
        """One text as word pieces; longer than ``max_length`` (default: the model's
        limit, 512) raises ``ValueError`` unless ``truncate``. A text the English model
        is unlikely to read well (``[UNK]`` pieces, mostly non-ASCII letters) gets a
        :class:`~qkv.pretrained.tokenizer.LanguageWarning`."""
        limit = self.config.max_position_embeddings if max_length is None else max_length
        tokenized = self.tokenizer(text, max_length=limit, truncate=truncate)
        why = language_warning(tokenized)
        if why is not None:
            warnings.warn(why, LanguageWarning, stacklevel=3)
        return tokenized

    @torch.no_grad()
    def run(self, texts: str | Sequence[str], *, truncate: bool = False) -> EncoderIntermediates:
        """Run texts (padded into one batch) and keep every intermediate.

        Returns an :class:`~qkv.pretrained.EncoderIntermediates` with ``texts`` set;
        row ``b`` of every tensor belongs to ``texts[b]``.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise ValueError("texts is empty: give at least one text")
        tokenized = [self.tokenize(t, truncate=truncate) for t in items]
        batch = self.tokenizer.batch(tokenized)
        out = self.encoder.forward_intermediates(
            batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        )
        return dataclasses.replace(out, texts=tuple(tokenized))

    @torch.no_grad()
    def encode(
        self,
        sentences: str | Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        truncate: bool = True,
    ) -> Tensor:
        """Sentence embeddings, as sentence-transformers' ``encode`` computes them.

        Args:
            sentences: one string or a list of N strings (none empty).
            batch_size: sentences per forward pass; each batch is padded to its
                longest member and the padding is masked out of attention and pooling.
            max_length: pieces per sentence, [CLS] and [SEP] included (default the
                pooling config's ``max_seq_length``: 256 for all-MiniLM-L6-v2).
            truncate: cut longer sentences (sentence-transformers does so silently);
                ``False`` raises ``ValueError`` instead.

        Returns:
            ``(N, d_model)`` float32 on the model's device; L2-normalised when the
            model's pooling config says so (it does for all-MiniLM-L6-v2). A single
            string gives ``(1, d_model)``.
        """
        items = [sentences] if isinstance(sentences, str) else list(sentences)
        if not items:
            raise ValueError("sentences is empty: give at least one sentence")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        limit = self.pooling.max_seq_length if max_length is None else max_length
        tokenized = [self.tokenize(s, truncate=truncate, max_length=limit) for s in items]
        # Longest first, so each batch pads little (sentence-transformers sorts too).
        order = sorted(range(len(items)), key=lambda i: -len(tokenized[i]))
        out = torch.empty(len(items), self.config.hidden_size, device=self.device)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.batch([tokenized[i] for i in rows])
            ids = batch.input_ids.to(self.device)  # (b, L)
            mask = batch.attention_mask.to(self.device)  # (b, L)
            pooled = mean_pool(self.encoder(ids, mask), mask)  # (b, d_model)
            if self.pooling.normalize:
                pooled = F.normalize(pooled, p=2, dim=-1)
            out[torch.tensor(rows, device=self.device)] = pooled.float()
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"name={self.name!r}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}, "
            f"d_model={c.hidden_size}, backend={self.backend!r}"
        )
