"""The ``"triton"`` backend: FlashAttention-2 kernels written in Triton, for CUDA GPUs.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.

It serves what qkv promises everywhere — any bool or float mask (read tile by tile
through its broadcast strides), bottom-right causal and sliding-window masks,
grouped-query attention, zero output for rows with no allowed key — and returns
exact weights on demand, recomputed from the log-sum-exp the forward pass saves.
Kernels and their limits are documented in :mod:`.kernels` and ``docs/triton.md``.

Importing this package registers the backend and nothing else: Triton is imported,
and a GPU touched, only when the backend first runs. It is available when Triton is
installed and either a CUDA device is present or ``TRITON_INTERPRET=1`` (Triton's
CPU interpreter, which the tests use with CPU tensors).
"""

from __future__ import annotations

import importlib.util

import torch

from ...result import AttentionResult
from ..registry import register_backend
from ..request import AttentionRequest
from .config import interpreting

__all__ = ["MAX_HEAD_WIDTH", "triton_attention"]

#: Widest head (d_k and d_v) the kernels take; narrower ones are padded to a power of two.
MAX_HEAD_WIDTH = 256

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _available() -> bool:
    if importlib.util.find_spec("triton") is None:  # looks for it without importing it
        return False
    return interpreting() or torch.cuda.is_available()


def _supports(request: AttentionRequest) -> str | None:
    r = request
    if r.dtype not in _DTYPES:
        return f"triton kernels take float16, bfloat16 or float32, not {r.dtype}"
    if r.device.type != "cuda" and not (r.device.type == "cpu" and interpreting()):
        return "triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    if r.device.type == "cpu" and r.dtype == torch.bfloat16:
        # Triton's CPU interpreter emulates bfloat16 with numpy and returns wrong values.
        return "the triton CPU interpreter computes bfloat16 wrongly; use a CUDA device"
    if max(r.d_k, r.d_v) > MAX_HEAD_WIDTH:
        return (
            f"triton kernels take head widths up to {MAX_HEAD_WIDTH}, got d_k={r.d_k}, d_v={r.d_v}"
        )
    if r.dropout_p > 0:
        return "dropout is not implemented in the triton kernels"
    if r.need_weights and r.needs_grad:
        # Weights come from a separate kernel and carry no gradient; refusing keeps
        # a loss on the weights from silently losing its gradient.
        return "triton weights are not differentiable; weights with gradients need 'reference'"
    mask = r.attn_mask
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        return "triton kernels give no gradient to attn_mask"
    if r.need_weights and mask is not None and mask.is_floating_point():
        # The weights kernel normalises by the saved log-sum-exp; next to a finite mask
        # value near float32's limit the row sum is absorbed into it (weights summing to
        # S), so such weights go to a backend that divides by the row sum.
        huge = (mask > float("-inf")) & (mask < -1e30)
        if bool(huge.any()):
            return "triton weights are inexact for finite float-mask values below -1e30"
    return None


@register_backend(
    "triton",
    supports=_supports,
    available=_available,
    description="FlashAttention-2 in Triton (CUDA): any mask, GQA, exact weights from the LSE",
)
def triton_attention(request: AttentionRequest) -> AttentionResult:
    """Run ``request`` on the Triton kernels: output (..., H, L, d_v), optional weights."""
    from .autograd import run  # deferred: imports Triton

    output, weights, lse = run(request)
    return AttentionResult(output=output, weights=weights, backend="triton", lse=lse)
