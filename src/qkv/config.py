"""Typed, validated configuration for the attention modules."""

from __future__ import annotations

from dataclasses import dataclass

from . import _checks as C

__all__ = ["AttentionConfig"]


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
        from .backends import get_backend

        if self.backend != "auto":
            get_backend(self.backend)  # raises ValueError listing the known names

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads
