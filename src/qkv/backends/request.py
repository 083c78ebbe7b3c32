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
from ..band import Band
from ..masks import combine_masks

__all__ = ["AttentionRequest", "make_request"]


@dataclass(frozen=True)
class AttentionRequest:
    """Everything a backend needs to compute attention.

    Shapes: ``q`` (..., H, L, d_k) · ``k`` (..., H_kv, S, d_k) · ``v`` (..., H_kv, S, d_v);
    the leading dims ``...`` are identical across q, k, v (never broadcast) and H is a
    multiple of H_kv (query head ``h`` reads key/value head ``h // (H // H_kv)``).

    The mask is kept in three structured parts so that fast backends can skip work
    instead of reading a dense mask: ``attn_mask`` (the caller's tensor, bool or float,
    broadcastable to (..., H, L, S)), ``band`` (causal / sliding window, bottom-right
    aligned: :class:`qkv.Band`) and ``key_padding`` (bool (B, S), True = real key, for
    requests with one batch dim). A position is allowed only if all three allow it.

    ``weight_rows`` (1-D long tensor of query indices) and ``average_heads`` shape the
    returned weights: (..., H, R, S), or (..., R, S) when averaged, R = number of rows.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None = None
    band: Band | None = None
    key_padding: Tensor | None = None
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
    def causal(self) -> bool:
        """Whether the band is causal (``is_causal``), read from :attr:`band`."""
        return self.band is not None and self.band.causal

    @property
    def window(self) -> int | None:
        """The sliding window size (``window=``), read from :attr:`band`."""
        return None if self.band is None else self.band.window

    @property
    def has_mask(self) -> bool:
        return self.attn_mask is not None or self.band is not None or self.key_padding is not None

    @property
    def has_mask_tensor(self) -> bool:
        """Whether a dense tensor (``attn_mask`` or ``key_padding``) takes part."""
        return self.attn_mask is not None or self.key_padding is not None

    def padding_mask(self) -> Tensor | None:
        """``key_padding`` as a mask broadcastable to (B, H, L, S): (B, 1, 1, S)."""
        return None if self.key_padding is None else self.key_padding[:, None, None, :]

    def user_mask(self) -> Tensor | None:
        """``attn_mask`` and ``key_padding`` combined (the band stays structured)."""
        return combine_masks(self.attn_mask, self.padding_mask())

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def dense_mask(self) -> Tensor | None:
        """The combined mask, materialised: bool or float, broadcastable to (..., H, L, S).

        The band becomes an (L, S) boolean tensor, key padding (B, 1, 1, S); the
        caller's mask keeps its own broadcast shape. ``None`` when nothing is masked.
        """
        structural = None if self.band is None else self.band.allowed(self.L, self.S, self.device)
        return combine_masks(self.attn_mask, self.padding_mask(), structural)


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
    key_padding_mask: object = None,
) -> AttentionRequest:
    """Validate user input and build an :class:`AttentionRequest`.

    ``key_padding_mask``: (B, S), True / 1 = a real key (q must have exactly one batch
    dim). It is kept apart from ``attn_mask``, so causal attention with L != S stays
    unambiguous with it (see :func:`qkv.scaled_dot_product_attention`).
    """
    q = C.check_float_tensor("q", q)
    k = C.check_float_tensor("k", k)
    v = C.check_float_tensor("v", v)
    C.check_same_dtype_device(q=q, k=k, v=v)
    C.check_has_data(q=q, k=k, v=v)
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
        if is_causal and L != S:
            raise ValueError(
                f"is_causal=True with an explicit attn_mask is ambiguous when L={L} != S={S} "
                f"(bottom-right or top-left causal?); put the causal part into the mask "
                f"yourself, e.g. qkv.masks.combine_masks(attn_mask, qkv.masks.causal_mask(L, S))"
            )
    key_padding = None
    if key_padding_mask is not None:
        key_padding = _check_key_padding(key_padding_mask, q, S)
    if weight_rows is not None:
        if not need_weights:
            raise ValueError("weight_rows was given but need_weights=False")
        weight_rows = C.check_index_list("weight_rows", weight_rows, L, "L", q.device)
    if need_weights:
        _check_weights_fit(q, H, L, S, weight_rows, bool(average_heads))
    return AttentionRequest(
        q=q,
        k=k,
        v=v,
        attn_mask=attn_mask,
        band=Band.from_flags(is_causal, window),
        key_padding=key_padding,
        scale=scale,
        dropout_p=dropout_p,
        need_weights=bool(need_weights),
        weight_rows=weight_rows,
        average_heads=bool(average_heads),
    )


def _check_weights_fit(
    q: Tensor, H: int, L: int, S: int, rows: Tensor | None, average_heads: bool
) -> None:
    """Refuse, before any work, weights that cannot fit in the memory left on the device.

    The weights are (..., H, R, S) (R = chosen rows or L; no H when averaged); a request
    for more than the device has free would otherwise run the whole forward pass and
    then fail in the allocator.
    """
    R = L if rows is None else rows.numel()
    count = math.prod(q.shape[:-3]) * (1 if average_heads else H) * R * S
    # Backends build the weights in the compute dtype (float32 for half inputs) and
    # round them to the input dtype at the end: both copies exist for a moment.
    size = count * q.element_size()
    if q.dtype in C.HALF_DTYPES:
        size += count * 4
    free = C.free_memory_if_short(size, q.device)
    if free is not None:
        raise ValueError(
            f"need_weights=True asks for weights of shape "
            f"({', '.join(map(str, (*q.shape[:-3], *(() if average_heads else (H,)), R, S)))})"
            f" = {C.human_bytes(size)}, more than the {C.human_bytes(free)} free on "
            f"{q.device}; ask for less with weight_rows=[...] (chosen query rows) and/or "
            f"average_heads=True"
        )


def _check_key_padding(mask: object, q: Tensor, S: int) -> Tensor:
    """(B, S) bool or 0/1 integers, True = real key; q must be (B, H, L, d_k)."""
    from ..masks import key_padding_mask as to_mask

    mask = C.check_tensor("key_padding_mask", mask)
    if q.ndim != 4:
        raise ValueError(
            f"key_padding_mask needs q of shape (B, H, L, d_k) (one batch dim), got q {C.shape(q)}"
        )
    checked = to_mask(mask)[:, 0, 0, :]  # bool (B, S); refuses other ndims and dtypes
    if tuple(mask.shape) != (q.shape[0], S):
        raise ValueError(
            f"key_padding_mask must have shape (B, S) = ({q.shape[0]}, {S}), got {C.shape(mask)}"
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but the queries are on {q.device}")
    return checked
