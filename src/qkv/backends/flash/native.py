"""Run an :class:`~qkv.AttentionRequest` on the compiled CPU kernel (:mod:`.compiled`).

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.

The kernel takes exactly one batch dim and one mask tensor already expanded to
(B, H, L, S) as a *view* (broadcast dims have stride 0, nothing is copied). This module
flattens the request's batch dims, merges the caller's mask with the key padding into
that view, passes the band as its two offsets, and wraps forward and backward in one
``torch.autograd.Function``. Weights come from the kernel too, recomputed from the
log-sum-exp, for all rows, chosen rows or the head average.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...result import AttentionResult
from ..request import AttentionRequest
from . import compiled

__all__ = ["native_attention"]


def _flat(x: Tensor, batch: int) -> Tensor:
    """(..., H, N, d) -> (B, H, N, d) with B = prod(...) (1 without batch dims)."""
    return x.reshape(batch, *x.shape[-3:])


def _mask_view(r: AttentionRequest, batch: int) -> Tensor | None:
    """The caller's mask and key padding as one (B, H, L, S) view (stride 0 where broadcast).

    Only when the mask has several batch dims of its own that one stride cannot walk is
    its batch part copied (never its H, L or S part).
    """
    m = r.user_mask()
    if m is None:
        return None
    nb = len(r.batch_shape)
    m = m.reshape((1,) * (nb + 3 - m.ndim) + tuple(m.shape))  # (..., H|1, L|1, S)
    tail = tuple(m.shape[nb:])
    if nb == 0:
        m = m.unsqueeze(0)
    elif nb > 1:
        m = m.expand(*r.batch_shape, *tail).reshape(batch, *tail)
    return m.expand(batch, r.H, r.L, r.S)


def _band(r: AttentionRequest) -> tuple[int | None, int | None]:
    return (None, None) if r.band is None else (r.band.lo, r.band.hi)


class _NativeFunction(torch.autograd.Function):
    """Forward and backward on the compiled kernel; saves q, k, v, out and the lse (no L x S)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, lo, hi, scale):
        out, lse = compiled.forward(q, k, v, mask, lo, hi, scale, need_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.lo, ctx.hi, ctx.scale = mask, lo, hi, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = compiled.backward(
            q, k, v, out, dout.contiguous(), lse, ctx.mask, ctx.lo, ctx.hi, ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def native_attention(r: AttentionRequest) -> AttentionResult:
    """The ``"flash"`` backend on the compiled kernel (CPU tensors, no dropout)."""
    batch = math.prod(r.batch_shape)
    q, k, v = (_flat(t, batch) for t in (r.q, r.k, r.v))
    mask = _mask_view(r, batch)
    lo, hi = _band(r)
    if r.needs_grad:
        out, lse = _NativeFunction.apply(q, k, v, mask, lo, hi, r.scale)
    else:
        out, lse = compiled.forward(q, k, v, mask, lo, hi, r.scale, need_lse=r.need_weights)
    weights = None
    if r.need_weights:
        w = compiled.weights(q, k, lse, mask, lo, hi, r.scale, r.weight_rows, r.average_heads)
        weights = w.reshape(*r.batch_shape, *w.shape[1:]).to(r.dtype)
    out = out.reshape(*r.batch_shape, r.H, r.L, r.d_v)
    lse = None if lse is None else lse.reshape(*r.batch_shape, r.H, r.L)
    return AttentionResult(output=out, weights=weights, backend="flash", lse=lse)
