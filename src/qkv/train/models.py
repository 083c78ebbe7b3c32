"""Small transformers built from qkv's attention modules, for the learning experiment.

Shape legend: B batch · H heads · L target/query length · S source/key length ·
d_model embedding width · V vocabulary size.

Two models, both pre-norm with learned position embeddings and a tied output head:

* :class:`DecoderOnly` — causal self-attention blocks (GPT-like); next-token logits.
* :class:`EncoderDecoder` — a bidirectional encoder and a causal decoder whose blocks
  also cross-attend to the encoder output (the original transformer's layout).

Every attention layer is built by :func:`qkv.train.variants.make_attention`, so one
``attention`` setting switches all of them between ``fixed``, ``qk`` and ``trainable``
while embeddings, MLPs, norms and sizes stay the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from .. import _checks as C
from ..cache import KVCache
from .config import (
    ArchConfig,
    check_settings,
    optional_positive_int,
    positive_int,
    same_setting,
    setting,
)
from .variants import make_attention

__all__ = [
    "MODEL_KINDS",
    "DecoderOnly",
    "EncoderDecoder",
    "ModelConfig",
    "ModelOutput",
    "attention_parameter_count",
    "build_model",
]

MODEL_KINDS = ("decoder", "encdec")


def _model_kind(name: str, kind) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {list(MODEL_KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Size and kind of a model; validated on construction.

    The architecture fields (``attention``, ``d_model``, ``num_heads``, ``num_layers``,
    ``backend``) are :class:`~qkv.train.config.ArchConfig`'s, with its defaults and
    checks; the rest is decided by the task (``kind``, ``vocab_size``, ``max_len``).
    The fields stay flat because config.json records them so and callers pass
    ``kind, vocab_size, attention`` by position.

    Attributes:
        kind: ``"decoder"`` (decoder-only) or ``"encdec"`` (encoder-decoder).
        vocab_size: V, shared by source and target (one tied embedding).
        attention: ``"fixed"``, ``"qk"`` or ``"trainable"`` for every attention layer.
        d_model: embedding width, divisible by ``num_heads``.
        num_heads: H.
        num_layers: blocks per stack (the encoder-decoder has this many in each).
        d_ff: hidden width of the MLPs (default ``4 * d_model``).
        max_len: longest sequence the position embeddings cover.
        backend: attention backend name or ``"auto"``.
    """

    kind: str = setting(check=_model_kind)
    vocab_size: int = setting(check=positive_int)
    attention: str = same_setting(ArchConfig, "attention")
    d_model: int = same_setting(ArchConfig, "d_model")
    num_heads: int = same_setting(ArchConfig, "num_heads")
    num_layers: int = same_setting(ArchConfig, "num_layers")
    d_ff: int | None = setting(None, check=optional_positive_int)
    max_len: int = setting(128, check=positive_int)
    backend: str = same_setting(ArchConfig, "backend")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )

    @property
    def ff_width(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelOutput:
    """Logits plus the attention weights of every layer (when asked for).

    Attributes:
        logits: ``(B, L, V)``.
        self_weights: per decoder layer, ``(B, H, L, S)`` self-attention weights.
        cross_weights: per decoder layer, ``(B, H, L, S_src)`` (encoder-decoder only).
        encoder_weights: per encoder layer, ``(B, H, S_src, S_src)``.
    """

    logits: Tensor
    self_weights: list[Tensor] = field(default_factory=list)
    cross_weights: list[Tensor] = field(default_factory=list)
    encoder_weights: list[Tensor] = field(default_factory=list)


def _attend(layer, x, key=None, *, padding=None, cache=None, need_weights=False):
    """Run one attention layer; returns ``(output (B, L, d_model), weights or None)``."""
    res = layer(
        x,
        key,
        key_padding_mask=padding,
        cache=cache,
        need_weights=need_weights,
        average_weights=False,
    )
    return (res.output, res.weights) if need_weights else (res, None)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` [``+ cross(norm(x), memory)``] ``+ mlp(norm(x))``.

    The norms in front of attention have no learned gain or bias (see
    :mod:`qkv.train.variants`: a gain would be a hidden projection in ``fixed``).
    """

    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_attn = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = make_attention(
            cfg.attention, d, cfg.num_heads, causal=causal, backend=cfg.backend
        )
        self.norm_cross = nn.LayerNorm(d, elementwise_affine=False) if cross else None
        self.cross = (
            make_attention(cfg.attention, d, cfg.num_heads, causal=False, backend=cfg.backend)
            if cross
            else None
        )
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ff_width), nn.GELU(), nn.Linear(cfg.ff_width, d))

    def forward(
        self,
        x: Tensor,
        *,
        padding: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``x`` (B, L, d_model) -> (new x, self weights (B, H, L, S), cross weights)."""
        h, w_self = _attend(
            self.attn, self.norm_attn(x), padding=padding, cache=cache, need_weights=need_weights
        )
        x = x + h
        w_cross = None
        if self.cross is not None:
            # Cross-attention keys are recomputed from the memory at every call: with
            # S_src <= a few dozen tokens this costs less than managing a second cache.
            h, w_cross = _attend(
                self.cross,
                self.norm_cross(x),
                memory,
                padding=memory_padding,
                need_weights=need_weights,
            )
            x = x + h
        x = x + self.mlp(self.norm_mlp(x))
        return x, w_self, w_cross


class _Base(nn.Module):
    """Embeddings, init and the tied head shared by both models."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.norm_out = nn.LayerNorm(cfg.d_model)

    def _init_weights(self) -> None:
        # Fan-in scaling, std = 1 / sqrt(fan_in) (1 / sqrt(d_model) for embeddings): 0.125
        # at d_model = 64, where GPT-2's fixed 0.02 (tuned for d_model = 768) keeps the
        # attention scores near zero for long; in trial runs recall had not started to be
        # learned after 1500 steps with 0.02, and starts within 1000-2000 with this.
        # Residual outputs (out_proj, the MLP's second layer) are scaled down by depth so
        # the stream's variance does not grow with the number of blocks.
        depth = 2 * self.config.num_layers * (2 if self.config.kind == "encdec" else 1)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(p.shape[1])
                if name.endswith(("out_proj.weight", "mlp.2.weight")):
                    std /= math.sqrt(depth)
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _embed(self, tokens: Tensor, offset: int, positions: Tensor | None = None) -> Tensor:
        """Tokens (B, L) -> embeddings (B, L, d_model), positions starting at ``offset``
        (or the given ``positions`` (L,), e.g. a context-parallel shard's global ones)."""
        tokens = C.check_tensor("tokens", tokens)
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be an integer tensor of shape (B, L), got {tokens.dtype} "
                f"{C.shape(tokens)}"
            )
        L = tokens.shape[1]
        if positions is not None:
            positions = C.check_tensor("positions", positions)
            if positions.shape != (L,) or positions.dtype != torch.int64:
                raise ValueError(
                    f"positions must be an int64 tensor of shape (L,) = ({L},), got "
                    f"{positions.dtype} {C.shape(positions)}"
                )
            if L and not 0 <= int(positions.min()) <= int(positions.max()) < self.config.max_len:
                raise ValueError(f"positions must lie in [0, max_len={self.config.max_len})")
            return self.tok_emb(tokens) + self.pos_emb(positions)  # (B, L, d_model)
        if offset + L > self.config.max_len:
            raise ValueError(
                f"sequence of {offset + L} positions exceeds max_len={self.config.max_len}"
            )
        pos = torch.arange(offset, offset + L, device=tokens.device)  # (L,)
        return self.tok_emb(tokens) + self.pos_emb(pos)  # (B, L, d_model)

    def _head(self, x: Tensor) -> Tensor:
        return self.norm_out(x) @ self.tok_emb.weight.T  # (B, L, V): tied head

    def new_caches(self) -> list[KVCache]:
        """One empty self-attention :class:`qkv.KVCache` per decoder layer."""
        return [KVCache(self.config.max_len) for _ in range(self.config.num_layers)]


class DecoderOnly(_Base):
    """Causal language model: ``tokens (B, L) -> logits (B, L, V)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(
            Block(cfg, causal=True, cross=False) for _ in range(cfg.num_layers)
        )
        self._init_weights()

    def forward(
        self,
        tokens: Tensor,
        *,
        caches: list[KVCache] | None = None,
        need_weights: bool = False,
        positions: Tensor | None = None,
    ) -> Tensor | ModelOutput:
        """Next-token logits.

        Args:
            tokens: ``(B, L)`` token ids; with ``caches`` only the new tokens.
            caches: one :class:`qkv.KVCache` per layer (from :meth:`new_caches`); the
                tokens continue the cached sequence.
            need_weights: return a :class:`ModelOutput` with per-layer weights.
            positions: ``(L,)`` position of each token in the whole sequence (default
                ``0..L-1`` after the cache): a context-parallel shard passes its own
                (see :mod:`qkv.distributed`).

        Returns:
            logits ``(B, L, V)``, or a :class:`ModelOutput`.
        """
        if positions is not None and caches is not None:
            raise ValueError("pass positions or caches, not both (a cache knows its positions)")
        offset = 0 if caches is None else len(caches[0])
        x = self._embed(tokens, offset, positions)  # (B, L, d_model)
        out = ModelOutput(logits=x)
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x, w, _ = block(x, cache=cache, need_weights=need_weights)
            out.self_weights.append(w)
        out.logits = self._head(x)
        return out if need_weights else out.logits


class EncoderDecoder(_Base):
    """Sequence to sequence: ``(src (B, S), tgt (B, L)) -> logits (B, L, V)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.encoder = nn.ModuleList(
            Block(cfg, causal=False, cross=False) for _ in range(cfg.num_layers)
        )
        # No gain here either: the memory is the key and value of fixed cross-attention.
        self.norm_memory = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.decoder = nn.ModuleList(
            Block(cfg, causal=True, cross=True) for _ in range(cfg.num_layers)
        )
        self._init_weights()

    def encode(
        self, src: Tensor, src_padding: Tensor | None = None, *, weights: list | None = None
    ) -> Tensor:
        """Source tokens ``(B, S)`` -> memory ``(B, S, d_model)``.

        ``src_padding``: ``(B, S)`` bool, True = real token (padding is never attended).
        """
        x = self._embed(src, 0)
        for block in self.encoder:
            x, w, _ = block(x, padding=src_padding, need_weights=weights is not None)
            if weights is not None:
                weights.append(w)
        return self.norm_memory(x)

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        src_padding: Tensor | None = None,
        *,
        caches: list[KVCache] | None = None,
        need_weights: bool = False,
    ) -> Tensor | ModelOutput:
        """Target tokens ``(B, L)`` attending to ``memory (B, S, d_model)`` -> logits."""
        offset = 0 if caches is None else len(caches[0])
        x = self._embed(tgt, offset)
        out = ModelOutput(logits=x)
        for i, block in enumerate(self.decoder):
            cache = None if caches is None else caches[i]
            x, w_self, w_cross = block(
                x,
                memory=memory,
                memory_padding=src_padding,
                cache=cache,
                need_weights=need_weights,
            )
            out.self_weights.append(w_self)
            out.cross_weights.append(w_cross)
        out.logits = self._head(x)
        return out if need_weights else out.logits

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_padding: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | ModelOutput:
        """Teacher-forced logits ``(B, L, V)`` (or a :class:`ModelOutput`)."""
        enc_weights: list | None = [] if need_weights else None
        memory = self.encode(src, src_padding, weights=enc_weights)
        out = self.decode(tgt, memory, src_padding, need_weights=need_weights)
        if need_weights:
            out.encoder_weights = enc_weights
        return out


def build_model(cfg: ModelConfig) -> DecoderOnly | EncoderDecoder:
    """The model ``cfg`` describes, freshly initialised from torch's current RNG state."""
    return DecoderOnly(cfg) if cfg.kind == "decoder" else EncoderDecoder(cfg)


def attention_parameter_count(model: nn.Module) -> int:
    """Number of parameters inside attention layers (0 for the ``fixed`` variant)."""
    from ..modules import MultiHeadAttention

    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, MultiHeadAttention)
        for p in m.parameters()
    )
