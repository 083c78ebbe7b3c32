"""The ``"torch"`` backend: delegates to ``torch.nn.functional.scaled_dot_product_attention``.

PyTorch picks its own kernel (flash, memory-efficient or math) from the inputs.
qkv adds what SDPA does not promise:

* causal attention with L != S is aligned bottom-right (SDPA's ``is_causal`` is
  top-left), by passing an explicit mask;
* a query row with no allowed key gives a zero output and finite gradients: such
  rows are opened before the call (so no NaN is produced inside the kernel) and
  zeroed afterwards.

It cannot return attention weights; ``"auto"`` never sends it a request for them.

**Float masks.** qkv adds a float mask to the scores in the compute dtype (float32 for
half inputs, see :mod:`qkv.masks`). SDPA takes a float mask only in the query dtype, so
for half inputs this backend serves a float mask only when converting it to that dtype
is exact (a bias of 100.3 is not exact in bfloat16; -1e5 overflows float16 to -inf):
anything else is refused, and ``"auto"`` uses a backend that adds it in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..result import AttentionResult
from .registry import register_backend
from .request import AttentionRequest

__all__ = ["torch_attention"]


def _supports(request: AttentionRequest) -> str | None:
    r = request
    if r.need_weights:
        return "torch SDPA does not return attention weights"
    m = r.attn_mask
    if m is not None and m.dtype != torch.bool and m.dtype != r.dtype:
        exact = m.to(r.compute_dtype)
        if not torch.equal(exact.to(r.dtype).to(exact.dtype), exact):
            return (
                f"torch SDPA would round the {m.dtype} attn_mask to {r.dtype}; "
                f"qkv adds float masks in {r.compute_dtype}"
            )
    return None


@register_backend(
    "torch",
    supports=_supports,
    description="PyTorch's fused scaled_dot_product_attention; no weights",
)
def torch_attention(request: AttentionRequest) -> AttentionResult:
    r = request
    mask, is_causal, dead = None, False, None
    if (
        r.attn_mask is None
        and r.key_padding is None
        and r.window is None
        and r.causal
        and r.L == r.S
    ):
        is_causal = True  # SDPA's own causal path: no mask tensor, no empty rows
    elif r.has_mask:
        mask = r.dense_mask()  # bool or float, broadcastable to (..., H, L, S)
        if mask.dtype != torch.bool:
            mask = mask.to(r.dtype)  # exact: _supports refused masks that would round
        allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
        dead = ~allowed.any(dim=-1, keepdim=True)  # (..., 1|H, L, 1): rows with no key
        if bool(dead.any()):
            # Open the empty rows so the kernel never divides by zero; zeroed below.
            fill = True if mask.dtype == torch.bool else 0.0
            mask = mask.masked_fill(dead, fill)
        else:
            dead = None
    output = F.scaled_dot_product_attention(
        r.q,
        r.k,
        r.v,
        attn_mask=mask,
        dropout_p=r.dropout_p,
        is_causal=is_causal,
        scale=r.scale,
        enable_gqa=r.group > 1,
    )  # (..., H, L, d_v)
    if dead is not None:
        output = output.masked_fill(dead, 0.0)
    return AttentionResult(output=output, weights=None, backend="torch")
