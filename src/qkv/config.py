"""Typed, validated configuration for the attention modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import _checks as C

__all__ = ["LEARNED_PROJECTIONS", "PROJECTIONS", "AttentionConfig", "Projections"]

Projections = Literal["fixed", "qk", "trainable"]

#: Which of the four projections each ``projections`` setting learns; the others are
#: the identity, so the input is split into heads as it is.
LEARNED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "fixed": (),
    "qk": ("q_proj", "k_proj"),
    "trainable": ("q_proj", "k_proj", "v_proj", "out_proj"),
}

#: The ``projections`` settings, from no learned projection to all four.
PROJECTIONS: tuple[str, ...] = tuple(LEARNED_PROJECTIONS)


@dataclass(frozen=True)
class AttentionConfig:
    """Configuration of :class:`qkv.MultiHeadAttention`; checked on construction.

    Attributes:
        d_model: width of the query input and of the output.
        num_heads: query heads H; ``d_model`` must be divisible by it (d_k = d_v = d_model / H).
        num_kv_heads: key/value heads H_kv (default H); H must be a multiple of it.
            1 gives multi-query attention, 1 < H_kv < H grouped-query attention.
        kdim, vdim: widths of the key and value inputs (default d_model), for cross-attention.
        bias: whether the four projections have biases.
        dropout: dropout on the attention weights in training, in [0, 1).
        causal: default causal masking (bottom-right aligned).
        backend: attention backend name or ``"auto"``.
        projections: which projections are learned: ``"trainable"`` (all four,
            the standard layer), ``"qk"`` (only W_Q and W_K; values pass through and
            there is no output mixing) or ``"fixed"`` (none: q = k = v = the input
            split into heads). A projection that is not learned is ``nn.Identity``,
            so ``"fixed"`` and ``"qk"`` need ``num_kv_heads``, ``kdim`` and ``vdim``
            left at their defaults (the identity cannot change a width).
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    kdim: int | None = None
    vdim: int | None = None
    bias: bool = True
    dropout: float = 0.0
    causal: bool = False
    backend: str = "auto"
    projections: Projections = "trainable"

    def __post_init__(self) -> None:
        C.check_positive_int("d_model", self.d_model)
        C.check_positive_int("num_heads", self.num_heads)
        C.check_positive_int("num_kv_heads", self.num_kv_heads, allow_none=True)
        C.check_positive_int("kdim", self.kdim, allow_none=True)
        C.check_positive_int("vdim", self.vdim, allow_none=True)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}"
            )
        C.check_dropout("dropout", self.dropout)
        if not isinstance(self.causal, bool) or not isinstance(self.bias, bool):
            raise TypeError("causal and bias must be bools")
        if not isinstance(self.projections, str) or self.projections not in LEARNED_PROJECTIONS:
            raise ValueError(
                f"projections must be one of {list(PROJECTIONS)}, got {self.projections!r}"
            )
        if self.projections != "trainable":
            widths = {"kdim": self.kdim, "vdim": self.vdim}
            changed = [n for n, w in widths.items() if w not in (None, self.d_model)]
            if self.kv_heads != self.num_heads:
                changed.append("num_kv_heads")
            if changed:
                raise ValueError(
                    f"projections={self.projections!r} keeps some projections as the "
                    f"identity, which cannot change a width: {', '.join(changed)} must be "
                    f"left at the default"
                )
        from .backends import get_backend

        if self.backend != "auto":
            get_backend(self.backend)  # raises ValueError listing the known names

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def learned_projections(self) -> tuple[str, ...]:
        """Names of the learned projections, e.g. ``("q_proj", "k_proj")`` for ``"qk"``."""
        return LEARNED_PROJECTIONS[self.projections]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads
