"""The validated request every backend receives: one object, one signature.

All user input is checked here, once, so backends can assume consistent shapes,
dtypes and devices and only decide *whether* they can serve a request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checks as C
from ..masks import causal_mask, combine_masks, sliding_window_mask

__all__ = ["AttentionRequest", "make_request"]


@dataclass(frozen=True)
class AttentionRequest:
    """Everything a backend needs to compute attention.

    Shapes: ``q`` (..., H, L, d_k) · ``k`` (..., H_kv, S, d_k) · ``v`` (..., H_kv, S, d_v);
    the leading dims ``...`` are identical across q, k, v (never broadcast) and H is a
    multiple of H_kv (query head ``h`` reads key/value head ``h // (H // H_kv)``).

    The mask is kept in three parts so that fast backends can skip work instead of
    reading a dense mask: ``attn_mask`` (user tensor, bool or float, broadcastable
    to (..., H, L, S)), ``causal`` and ``window`` (both bottom-right aligned, see
    :mod:`qkv.masks`). A position is allowed only if all three allow it.

    ``weight_rows`` (1-D long tensor of query indices) and ``average_heads`` shape the
    returned weights: (..., H, R, S), or (..., R, S) when averaged, R = number of rows.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None = None
    causal: bool = False
    window: int | None = None
    scale: float = 1.0
    dropout_p: float = 0.0
    need_weights: bool = False
    weight_rows: Tensor | None = None
    average_heads: bool = False

    # Sizes, named as in the shape legend.
    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape[:-3])

    @property
    def H(self) -> int:
        return self.q.shape[-3]

    @property
    def H_kv(self) -> int:
        return self.k.shape[-3]

    @property
    def L(self) -> int:
        return self.q.shape[-2]

    @property
    def S(self) -> int:
        return self.k.shape[-2]

    @property
    def d_k(self) -> int:
        return self.q.shape[-1]

    @property
    def d_v(self) -> int:
        return self.v.shape[-1]

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 = plain multi-head attention)."""
        return self.H // self.H_kv

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """Softmax runs in float32 for half types, in the input dtype otherwise."""
        return torch.float32 if self.q.dtype in C.HALF_DTYPES else self.q.dtype

    @property
    def has_mask(self) -> bool:
        return self.attn_mask is not None or self.causal or self.window is not None

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def dense_mask(self) -> Tensor | None:
        """The combined mask, materialised: bool or float, broadcastable to (..., H, L, S).

        Structured parts (causal, window) become an (L, S) boolean tensor; the user's
        mask keeps its own broadcast shape. ``None`` when nothing is masked.
        """
        structural = None
        if self.window is not None:
            structural = sliding_window_mask(
                self.L, self.S, window=self.window, causal=self.causal, device=self.device
            )
        elif self.causal:
            structural = causal_mask(self.L, self.S, device=self.device)
        return combine_masks(self.attn_mask, structural)


def make_request(
    q: object,
    k: object,
    v: object,
    *,
    attn_mask: object = None,
    is_causal: bool = False,
    window: int | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    enable_gqa: bool = False,
    need_weights: bool = False,
    weight_rows: object = None,
    average_heads: bool = False,
    causal_with_mask_ok: bool = False,
) -> AttentionRequest:
    """Validate user input and build an :class:`AttentionRequest`.

    ``causal_with_mask_ok`` lets callers that built the mask themselves (the modules'
    key-padding masks) combine it with causal attention when L != S; see
    :func:`qkv.scaled_dot_product_attention` for why user masks may not.
    """
    q = C.check_float_tensor("q", q)
    k = C.check_float_tensor("k", k)
    v = C.check_float_tensor("v", v)
    C.check_same_dtype_device(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim < 3:
            raise ValueError(
                f"{name} must have shape (..., heads, length, width), got {C.shape(t)}; "
                f"add a head dimension with {name}.unsqueeze(-3)"
            )
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {C.shape(t)}")
    if not (q.ndim == k.ndim == v.ndim and q.shape[:-3] == k.shape[:-3] == v.shape[:-3]):
        raise ValueError(
            f"q, k and v must share their leading (batch) dimensions, got q {C.shape(q)}, "
            f"k {C.shape(k)}, v {C.shape(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same width d_k to be compared by dot products, got "
            f"q {C.shape(q)} (d_k={q.shape[-1]}) and k {C.shape(k)} (d_k={k.shape[-1]})"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length S, got k {C.shape(k)} (S={k.shape[-2]}) "
            f"and v {C.shape(v)} (S={v.shape[-2]})"
        )
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(
            f"k and v must have the same number of heads H_kv, got k {C.shape(k)} and "
            f"v {C.shape(v)}"
        )
    H, H_kv = q.shape[-3], k.shape[-3]
    if H_kv != H:
        if H % H_kv != 0:
            raise ValueError(
                f"query heads H={H} must be a multiple of key/value heads H_kv={H_kv} "
                f"(q {C.shape(q)}, k {C.shape(k)})"
            )
        if not enable_gqa:
            raise ValueError(
                f"q has H={H} heads but k/v have H_kv={H_kv}; pass enable_gqa=True for "
                f"grouped-query attention"
            )
    scale = C.check_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dropout_p = C.check_dropout("dropout_p", dropout_p)
    window = C.check_positive_int("window", window, allow_none=True)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    L, S = q.shape[-2], k.shape[-2]
    target = (*q.shape[:-3], H, L, S)
    if attn_mask is not None:
        attn_mask = C.check_mask("attn_mask", attn_mask, target, q.device)
        if is_causal and L != S and not causal_with_mask_ok:
            raise ValueError(
                f"is_causal=True with an explicit attn_mask is ambiguous when L={L} != S={S} "
                f"(bottom-right or top-left causal?); put the causal part into the mask "
                f"yourself, e.g. qkv.masks.combine_masks(attn_mask, qkv.masks.causal_mask(L, S))"
            )
    if weight_rows is not None:
        if not need_weights:
            raise ValueError("weight_rows was given but need_weights=False")
        rows = torch.as_tensor(weight_rows, device=q.device)
        if rows.ndim != 1 or rows.is_floating_point() or rows.dtype == torch.bool:
            raise ValueError(f"weight_rows must be a 1-D sequence of query indices, got {rows!r}")
        if rows.numel() == 0 or int(rows.min()) < -L or int(rows.max()) >= L:
            raise ValueError(f"weight_rows must be indices in [0, L={L}), got {rows.tolist()}")
        weight_rows = rows.long() % L
    return AttentionRequest(
        q=q,
        k=k,
        v=v,
        attn_mask=attn_mask,
        causal=is_causal,
        window=window,
        scale=scale,
        dropout_p=dropout_p,
        need_weights=bool(need_weights),
        weight_rows=weight_rows,
        average_heads=bool(average_heads),
    )
