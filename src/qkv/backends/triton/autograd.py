"""Launchers for the Triton kernels and the ``torch.autograd.Function`` around them.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.

Importing this module imports Triton; :mod:`qkv.backends.triton` does so only when
the backend first runs.
"""

from __future__ import annotations

import importlib
import math
from contextlib import nullcontext
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..request import AttentionRequest
from . import config

__all__ = ["TritonAttention", "attention_weights", "load_kernels", "prepare_mask", "run"]

_LN2 = math.log(2.0)

#: Compile options for every launch: fused multiply-adds (the exp2 argument
#: ``s * qk_scale - m`` is one FMA). Stated explicitly, as Triton 3.9 warns when it
#: is left to its default; the interpreter ignores it.
_OPTIONS = {"enable_fp_fusion": True}


def load_kernels() -> ModuleType:
    """The kernels module, built for the mode ``TRITON_INTERPRET`` asks for now.

    ``triton.jit`` decides between compiled and interpreted kernels when it decorates,
    so if the module was first imported under the other setting (e.g. a test enabled
    the interpreter after something else imported it), it is rebuilt.
    """
    from . import kernels

    if config.interpreting() != kernels.INTERPRETED:
        kernels = importlib.reload(kernels)
    return kernels


@dataclass(frozen=True)
class MaskArg:
    """A user mask ready for the kernels: a tensor plus (B, H, L, S) strides, 0 where
    the mask broadcasts. ``kind``: 0 none, 1 bool (read as uint8), 2 float."""

    tensor: Tensor | None
    strides: tuple[int, int, int, int]
    kind: int


@dataclass(frozen=True)
class Params:
    """Everything but tensors that the kernels need (hashable, kept on the autograd ctx)."""

    scale: float
    causal: bool
    window: int | None


def prepare_mask(
    mask: Tensor | None, batch_shape: tuple[int, ...], H: int, L: int, S: int
) -> MaskArg:
    """Strides that read ``mask`` (broadcastable to (*batch, H, L, S)) as (B, H, L, S).

    Broadcast dims get stride 0, so nothing is expanded in memory. Only when several
    leading batch dims cannot be flattened into one stride does the batch part get
    materialised (never the H, L or S parts).
    """
    if mask is None:
        return MaskArg(None, (0, 0, 0, 0), 0)
    if mask.dtype == torch.bool:
        kind = 1
        mask = mask.view(torch.uint8)  # same bytes; Triton loads uint8 cleanly
    else:
        kind = 2
        if mask.dtype == torch.float64:
            mask = mask.float()  # the kernels add in float32; converts only the mask's own size
    nb = len(batch_shape)
    full_ndim = nb + 3
    mask = mask.reshape((1,) * (full_ndim - mask.ndim) + tuple(mask.shape))  # a view
    tail = tuple(mask.shape[nb:])  # (H|1, L|1, S)
    if nb > 1 and any(size != 1 for size in mask.shape[:nb]):
        expanded = mask.expand(*batch_shape, *tail)  # stride 0 on broadcast batch dims
        try:
            mask = expanded.view(-1, *tail)  # (B, H|1, L|1, S) when one stride walks them
        except RuntimeError:
            mask = expanded.reshape(-1, *tail)  # copies the batch dims only
    elif nb != 1:
        mask = mask.reshape(1, *tail)  # no batch dims, or all of size 1: a view
    strides = tuple(
        0 if size == 1 else st for size, st in zip(mask.shape, mask.stride(), strict=True)
    )
    return MaskArg(mask, strides, kind)


def _unit_last(t: Tensor) -> Tensor:
    """Kernels index the last dim with stride 1; copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _common(q: Tensor, k: Tensor, v: Tensor, mask: MaskArg, p: Params) -> dict:
    """Keyword arguments every kernel shares."""
    return {
        "qk_scale": p.scale * math.log2(math.e),  # exp2 trick: log2(e) folded in once
        "window": p.window if p.window is not None else 0,
        "TUNE_L": _pow2(q.shape[2]),
        "TUNE_S": _pow2(k.shape[2]),
        "D_K": q.shape[3],
        "D_V": v.shape[3],
        "BLOCK_DK": config.padded_width(q.shape[3]),
        "BLOCK_DV": config.padded_width(v.shape[3]),
        "CAUSAL": p.causal,
        "WINDOWED": p.window is not None,
        "MASK_KIND": mask.kind,
        # float32 inputs (tests) get exact IEEE products, not TF32.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        **_OPTIONS,
    }


def forward(q: Tensor, k: Tensor, v: Tensor, mask: MaskArg, p: Params) -> tuple[Tensor, Tensor]:
    """q (B, H, L, d_k), k (B, H_kv, S, d_k), v (B, H_kv, S, d_v) -> out (B, H, L, d_v),
    base-2 LSE (B, H, L) float32."""
    kern = load_kernels()
    B, H, L, _ = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    out = torch.empty((B, H, L, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    m = mask.tensor if mask.tensor is not None else q  # any pointer; never read
    with _device_ctx(q):
        kern.attn_fwd[lambda meta: (_cdiv(L, meta["BLOCK_M"]), B * H)](
            q, k, v, m, out, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask.strides, *out.stride()[:3],
            H, L, S, H // H_kv,
            **_common(q, k, v, mask, p),
        )  # fmt: skip
    return out, lse


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: MaskArg,
    p: Params,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients dq (B, H, L, d_k), dk (B, H_kv, S, d_k), dv (B, H_kv, S, d_v)."""
    kern = load_kernels()
    B, H, L, d_k = q.shape
    H_kv, S, d_v = k.shape[1], k.shape[2], v.shape[3]
    dout = _unit_last(dout)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty((B, H_kv, S, d_k), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H_kv, S, d_v), dtype=v.dtype, device=v.device)
    m = mask.tensor if mask.tensor is not None else q
    common = _common(q, k, v, mask, p)
    block_pre = 16 if config.interpreting() else 64
    with _device_ctx(q):
        kern.attn_bwd_preprocess[(_cdiv(L, block_pre), B * H)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, L,
            D_V=d_v, BLOCK_DV=common["BLOCK_DV"], BLOCK_M=block_pre, **_OPTIONS,
        )  # fmt: skip
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask.strides)
        kern.attn_bwd_dkdv[lambda meta: (_cdiv(S, meta["BLOCK_N"]), B * H_kv)](
            q, k, v, m, dout, lse, delta, dk, dv, *strides, *dout.stride()[:3],
            H, H_kv, L, S, H // H_kv, sm_scale=p.scale, **common,
        )  # fmt: skip
        kern.attn_bwd_dq[lambda meta: (_cdiv(L, meta["BLOCK_M"]), B * H)](
            q, k, v, m, dout, lse, delta, dq, *strides, *dout.stride()[:3],
            H, L, S, H // H_kv, sm_scale=p.scale, **common,
        )  # fmt: skip
    return dq, dk, dv


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TritonAttention(torch.autograd.Function):
    """Differentiable FlashAttention-2: saves q, k, v, out and the LSE, recomputes the
    probabilities in backward. Inputs are 4-D: q (B, H, L, d_k), k (B, H_kv, S, d_k),
    v (B, H_kv, S, d_v); returns out (B, H, L, d_v) and the base-2 LSE (B, H, L)."""

    @staticmethod
    def forward(ctx, q, k, v, mask_tensor, mask_strides, mask_kind, params):
        mask = MaskArg(mask_tensor, mask_strides, mask_kind)
        out, lse = forward(q, k, v, mask, params)
        ctx.save_for_backward(q, k, v, out, lse, mask_tensor)
        ctx.mask_layout = (mask_strides, mask_kind)
        ctx.params = params
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask_tensor = ctx.saved_tensors
        mask = MaskArg(mask_tensor, *ctx.mask_layout)
        dq, dk, dv = backward(dout, q, k, v, out, lse, mask, ctx.params)
        return dq, dk, dv, None, None, None, None


def attention_weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    mask: MaskArg,
    p: Params,
    rows: Tensor | None,
    average_heads: bool,
) -> Tensor:
    """Exact weights from the base-2 LSE: (B, H, R, S), or (B, R, S) when averaged, float32."""
    kern = load_kernels()
    B, H, L, d_k = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if rows is None:
        rows = torch.arange(L, device=q.device)
    rows = rows.to(device=q.device, dtype=torch.int64).contiguous()
    R = rows.numel()
    shape = (B, R, S) if average_heads else (B, H, R, S)
    w = torch.empty(shape, dtype=torch.float32, device=q.device)
    # 64 rows: the smallest tile Hopper's wgmma takes (a one-pass kernel, not tuned).
    block_m, block_n = (16, 16) if config.interpreting() else (64, 64)
    m = mask.tensor if mask.tensor is not None else q
    common = _common(q, k, k, mask, p)
    with _device_ctx(q):
        grid = (_cdiv(R, block_m), _cdiv(S, block_n), B if average_heads else B * H)
        kern.attn_weights[grid](
            q, k, m, lse, rows, w, *q.stride()[:3], *k.stride()[:3], *mask.strides,
            H, L, S, R, H // H_kv, common["qk_scale"], common["window"],
            D_K=d_k, BLOCK_DK=common["BLOCK_DK"], CAUSAL=p.causal, WINDOWED=p.window is not None,
            MASK_KIND=mask.kind, PRECISION=common["PRECISION"], AVERAGE=average_heads,
            BLOCK_M=block_m, BLOCK_N=block_n, **_OPTIONS,
        )  # fmt: skip
    return w


def run(request: AttentionRequest) -> tuple[Tensor, Tensor | None, Tensor]:
    """Serve a request: output (..., H, L, d_v), weights or None, natural-log LSE (..., H, L)."""
    r = request
    batch = r.batch_shape
    q = _unit_last(r.q.reshape(-1, r.H, r.L, r.d_k))  # (B, H, L, d_k)
    k = _unit_last(r.k.reshape(-1, r.H_kv, r.S, r.d_k))  # (B, H_kv, S, d_k)
    v = _unit_last(r.v.reshape(-1, r.H_kv, r.S, r.d_v))  # (B, H_kv, S, d_v)
    mask = prepare_mask(r.user_mask(), batch, r.H, r.L, r.S)
    params = Params(scale=r.scale, causal=r.causal, window=r.window)
    out, lse2 = TritonAttention.apply(q, k, v, mask.tensor, mask.strides, mask.kind, params)
    weights = None
    if r.need_weights:
        weights = attention_weights(q, k, lse2, mask, params, r.weight_rows, r.average_heads)
        tail = tuple(weights.shape[1:])  # (H, R, S) or (R, S)
        weights = weights.reshape(*batch, *tail).to(r.dtype)
    out = out.reshape(*batch, r.H, r.L, r.d_v)  # (..., H, L, d_v)
    lse = (lse2 * _LN2).reshape(*batch, r.H, r.L)  # base 2 -> natural log; -inf stays -inf
    return out, weights, lse
