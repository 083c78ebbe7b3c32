"""The reference backend: the specification every other backend is tested against.

It is the textbook computation, written to be read::

    scores  = q @ kᵀ * scale            (..., H, L, S), float32 for half inputs
    scores  = mask(scores)              bool: -inf where False · float: + mask (float32)
    weights = softmax(scores, keys)     empty row -> zeros
    weights = dropout(weights)
    output  = weights @ v               (..., H, L, d_v)

It materialises the full (L, S) score matrix per head, so its memory grows with
L * S; use it to check, teach, and read weights, not for long sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks as C
from ..result import AttentionResult
from .registry import register_backend
from .request import AttentionRequest

__all__ = ["masked_softmax", "reference_attention", "repeat_kv"]


def repeat_kv(t: Tensor, group: int) -> Tensor:
    """(..., H_kv, S, d) -> (..., H_kv * group, S, d): query head h reads kv head h // group."""
    return t if group == 1 else t.repeat_interleave(group, dim=-3)


def masked_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim where ``-inf`` marks masked keys.

    Unlike ``torch.softmax``, a row whose keys are all masked gives zeros (not NaN),
    and so does its gradient: the row max is replaced by 0 before exponentiating, so
    every entry is ``exp(-inf) = 0``, and the zero sum is divided by 1 instead of 0.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    # Softmax does not depend on the shift, so it carries no gradient.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def select_weights(weights: Tensor, request: AttentionRequest) -> Tensor:
    """Apply ``weight_rows`` and ``average_heads`` to full weights (..., H, L, S)."""
    if request.weight_rows is not None:
        weights = weights.index_select(-2, request.weight_rows)  # (..., H, R, S)
    if request.average_heads:
        weights = weights.mean(dim=-3)  # (..., R, S)
    return weights


def _supports(request: AttentionRequest) -> str | None:
    # The specification serves every valid request that fits in memory: it holds a few
    # dense (..., H, L, S) tensors (scores, exponentials, weights) in the compute dtype.
    r = request
    count = math.prod(r.batch_shape) * r.H * r.L * r.S
    need = 4 * count * torch.finfo(r.compute_dtype).bits // 8
    free = C.free_memory_if_short(need, r.device)
    if free is not None:
        return (
            f"the reference holds dense (..., H, L, S) scores: about {C.human_bytes(need)}, "
            f"more than the {C.human_bytes(free)} free"
        )
    return None


@register_backend(
    "reference",
    supports=_supports,
    description="readable matmul-softmax-matmul; every feature, exact weights, O(L*S) memory",
)
def reference_attention(request: AttentionRequest) -> AttentionResult:
    r = request
    k = repeat_kv(r.k, r.group)  # (..., H, S, d_k)
    v = repeat_kv(r.v, r.group)  # (..., H, S, d_v)

    # Half inputs are compared in float32: a half-precision product q·k can overflow
    # (65,504 in float16) even when the scaled score is small, and rounding scores to
    # half would make the specification less precise than the kernels it judges.
    cdt = r.compute_dtype
    scores = (r.q.to(cdt) @ k.to(cdt).transpose(-2, -1)) * r.scale  # (..., H, L, S)
    mask = r.dense_mask()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.to(cdt)  # the float-mask policy: added in the compute dtype

    weights = masked_softmax(scores)  # (..., H, L, S), rows sum to 1 or 0
    dropped = F.dropout(weights, p=r.dropout_p) if r.dropout_p > 0 else weights
    output = dropped.to(v.dtype) @ v  # (..., H, L, d_v)

    lse = None
    if r.need_weights:
        lse = torch.logsumexp(scores, dim=-1)  # (..., H, L); -inf for an empty row
    return AttentionResult(
        output=output,
        weights=select_weights(weights, r).to(r.dtype) if r.need_weights else None,
        backend="reference",
        lse=lse,
    )
