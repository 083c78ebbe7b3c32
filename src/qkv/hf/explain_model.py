"""Any Hugging Face model, seen the way ``qkv explain`` sees its embedded encoder.

Shape legend: B batch (1 here) · H query heads · L tokens (queries) · S tokens (keys,
S = L) · d_model width.

:class:`HFModel` wraps a transformers model on qkv's attention and answers the same
questions as :class:`qkv.pretrained.SentenceEncoder`: ``run(text)`` gives the tokens
with their words and character offsets, the input embeddings, and every layer's
attention weights ``(1, H, L, S)`` and output ``(1, L, d_model)``, so
:func:`qkv.explain.explain` and :func:`qkv.explain.compare_word` work unchanged.

What differs for a decoder (``causal=True``):

* row i of every weight matrix covers keys 0..i only: the model reads left to right,
  so a token's row says what it *looks back at*;
* the input embeddings are the token embeddings the first layer reads. Models with
  rotary positions (Llama, SmolLM2, Qwen, Mistral) add positions inside attention, so
  these vectors carry no position: identical tokens have identical embeddings;
* there is no sentence embedding, so :meth:`encode` (``qkv similarity``) refuses.

The weights come from qkv's fast kernels through ``output_attentions=True``
(:mod:`qkv.hf`), not from an eager pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..pretrained.tokenizer import TokenizedText
from . import use
from .models import LocalModel, load_local

__all__ = ["HFModel", "LayerAttention", "ModelConfig", "ModelRun"]


@dataclass(frozen=True)
class ModelConfig:
    """The sizes ``qkv explain`` prints and checks ``--layer``/``--head`` against."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    max_position_embeddings: int


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention weights and output.

    Attributes:
        weights: ``(B, H, L, S)``; in a decoder row i is zero after key i.
        hidden: ``(B, L, d_model)``, the layer's output.
    """

    weights: Tensor
    hidden: Tensor


@dataclass(frozen=True)
class ModelRun:
    """What one text did inside the model.

    Attributes:
        input_ids: ``(B, L)``.
        attention_mask: ``(B, L)`` bool, True = real token.
        embeddings: ``(B, L, d_model)``, what the first layer reads.
        layers: one :class:`LayerAttention` per layer.
        texts: the tokenised text.
    """

    input_ids: Tensor
    attention_mask: Tensor
    embeddings: Tensor
    layers: tuple[LayerAttention, ...]
    texts: tuple[TokenizedText, ...]

    @property
    def last_hidden(self) -> Tensor:
        return self.layers[-1].hidden if self.layers else self.embeddings


def _display(piece: str) -> str:
    """A token as a learner should read it: byte-level markers decoded, spaces trimmed,
    a whitespace-only token shown as a visible symbol rather than an empty cell."""
    shown = piece.strip()
    if shown:
        return shown
    return piece.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """Character span without surrounding whitespace: byte-level BPE pieces (GPT-2,
    Llama 3, SmolLM2) carry the space before a word, and the focus word should read
    ``bank``, not `` bank``. A whitespace-only piece keeps its span."""
    s, e = start, end
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return (s, e) if s < e else (start, end)


class HFTokenizer:
    """A transformers tokenizer seen as qkv's :class:`~qkv.pretrained.Tokenizer`."""

    def __init__(self, tokenizer, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "qkv explain needs a fast (tokenizers-backed) tokenizer to map tokens to "
                "words; this model's tokenizer has no tokenizer.json"
            )
        self._tok = tokenizer
        self.max_length = max_length

    @staticmethod
    def normalize(word: str) -> str:
        """Words are matched without surrounding spaces and case (the focus word)."""
        return word.strip().lower()

    def __call__(self, text: str, *, truncate: bool = False) -> TokenizedText:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty: give at least one word")
        enc = self._tok(text, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(enc["input_ids"])
        truncated = False
        if len(ids) > self.max_length:
            if not truncate:
                raise ValueError(
                    f"text is {len(ids)} tokens long but the model reads at most "
                    f"{self.max_length}; shorten it or ask for truncation (--truncate)"
                )
            ids, truncated = ids[: self.max_length], True
        n = len(ids)
        specials = set(self._tok.all_special_ids)
        word_ids = [
            None if i in specials else w for i, w in zip(ids, enc.word_ids()[:n], strict=True)
        ]
        tokens = [_display(self._tok.decode([i])) for i in ids]
        offsets = [_trim(text, *o) for o in enc["offset_mapping"][:n]]
        return TokenizedText(text, tokens, ids, word_ids, offsets, truncated)


class HFModel:
    """A transformers model on qkv's attention, ready for ``qkv explain``.

    Build it with :meth:`load`. ``causal`` says whether it reads left to right.
    """

    def __init__(self, model, tokenizer, *, name: str, causal: bool, backend: str = "auto"):
        self.model = use(model.eval(), backend)
        self.name = name
        self.causal = causal
        self._backend = backend
        cfg = model.config
        heads = cfg.num_attention_heads
        self.config = ModelConfig(
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            hidden_size=cfg.hidden_size,
            max_position_embeddings=getattr(cfg, "max_position_embeddings", 2048),
        )
        self.tokenizer = HFTokenizer(tokenizer, self.config.max_position_embeddings)

    @classmethod
    def load(cls, name: str, *, backend: str = "auto") -> HFModel:
        """``name``: ``"smollm2"`` or a local transformers folder with safetensors."""
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        local: LocalModel = load_local(name)
        if not (local.path / "tokenizer.json").is_file():
            raise ValueError(
                f"{local.path} has no tokenizer.json: qkv explain needs the model's fast "
                "tokenizer to map tokens to words (save it there with "
                "tokenizer.save_pretrained)"
            )
        auto = AutoModelForCausalLM if local.causal else AutoModel
        kw = {"local_files_only": True, "dtype": torch.float32}
        # transformers draws a "Loading weights" bar for a one-second load; the CLI's
        # output is the explanation, so the bar is switched off for this call only.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = auto.from_pretrained(str(local.path), attn_implementation="qkv", **kw)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(str(local.path), local_files_only=True)
        label = "SmolLM2-135M-Instruct" if name.strip().lower() == "smollm2" else str(local.path)
        return cls(model, tokenizer, name=label, causal=local.causal, backend=backend)

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, backend: str) -> HFModel:
        use(self.model, backend)
        self._backend = backend
        return self

    @torch.no_grad()
    def run(self, texts: str | Sequence[str], *, truncate: bool = False) -> ModelRun:
        """Read one text; weights from qkv's kernels, hidden states after every layer."""
        if not isinstance(texts, str):
            if len(texts) != 1:
                raise ValueError(f"{type(self).__name__}.run reads one text at a time")
            texts = texts[0]
        tokenized = self.tokenizer(texts, truncate=truncate)
        ids = torch.tensor([tokenized.ids])
        mask = torch.ones_like(ids)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            output_attentions=True,
            output_hidden_states=True,
            use_cache=False,
            **({"logits_to_keep": 1} if self.causal else {}),
        )
        if out.attentions is None or len(out.attentions) != self.config.num_hidden_layers:
            raise RuntimeError("the model returned no attention weights for every layer")
        hidden = out.hidden_states  # embeddings, then each layer's output
        layers = tuple(
            LayerAttention(w.float(), h.float())
            for w, h in zip(out.attentions, hidden[1:], strict=True)
        )
        return ModelRun(ids, mask.bool(), hidden[0].float(), layers, (tokenized,))

    def encode(self, *args, **kwargs) -> Tensor:
        raise ValueError(
            f"{self.name} is a causal language model: it has no sentence embedding to compare "
            "(use the default sentence encoder, all-MiniLM-L6-v2)"
            if self.causal
            else f"{self.name} has no sentence-embedding pooling qkv knows; use all-MiniLM-L6-v2"
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"HFModel(name={self.name!r}, causal={self.causal}, layers={c.num_hidden_layers}, "
            f"heads={c.num_attention_heads}, kv_heads={c.num_key_value_heads}, "
            f"d_model={c.hidden_size}, backend={self.backend!r})"
        )
