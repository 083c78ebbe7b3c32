"""The mechanism step by step on a short text: every intermediate, as tensors.

:func:`walkthrough` computes; ``qkv walkthrough`` prints. Tokens get seeded random
embeddings (a stand-in for a trained embedding table) so every number is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import scaled_dot_product_attention, simple_attention
from .masks import causal_mask
from .modules import SelfAttention

__all__ = ["Walkthrough", "walkthrough"]


@dataclass(frozen=True)
class Walkthrough:
    """All intermediates for one input (L tokens, float64).

    Attributes:
        tokens: the L words.
        x: input embeddings (L, d_model).
        baseline_scores, baseline_weights: x xᵀ and its row softmax, (L, L).
        baseline_context: baseline_weights @ x, (L, d_model).
        w_q, w_k: projection matrices (d_model, d_k); w_v: (d_model, d_v).
        q, k: (L, d_k); v: (L, d_v).
        scores: q kᵀ / sqrt(d_k), (L, L); weights: softmax of scores; context: (L, d_v).
        causal_weights, causal_context: the same with a causal mask.
        head_weights: (2, L, L) weights of a two-head split of q, k (d_k / 2 each).
    """

    tokens: list[str]
    x: Tensor
    baseline_scores: Tensor
    baseline_weights: Tensor
    baseline_context: Tensor
    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    scores: Tensor
    weights: Tensor
    context: Tensor
    causal_weights: Tensor
    causal_context: Tensor
    head_weights: Tensor


def walkthrough(
    text: str = "thinking machine", *, seed: int = 0, d_model: int = 6, d_k: int = 4, d_v: int = 3
) -> Walkthrough:
    """Compute every step of self-attention for ``text`` (words split on whitespace)."""
    tokens = text.split()
    if not tokens:
        raise ValueError("text is empty: give at least one word")
    if d_k % 2:
        raise ValueError(f"d_k must be even to split into two heads, got d_k={d_k}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(tokens), d_model, generator=gen, dtype=torch.float64)  # (L, d_model)

    base = simple_attention(x, need_weights=True)  # q = k = v = x, unscaled
    baseline_scores = x @ x.T  # (L, L)

    torch.manual_seed(seed)  # module init draws from the global generator
    layer = SelfAttention(d_model, d_k, d_v).double()
    with torch.no_grad():
        q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)  # (L, d_k), (L, d_k), (L, d_v)
        out = layer(x, need_weights=True)
        causal = scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=causal_mask(len(tokens)), need_weights=True
        )
        # Two heads: split the d_k columns of q and k (and d_v of v) in halves.
        qh = q.view(len(tokens), 2, d_k // 2).transpose(0, 1)  # (2, L, d_k / 2)
        kh = k.view(len(tokens), 2, d_k // 2).transpose(0, 1)
        heads = scaled_dot_product_attention(qh, kh, kh, need_weights=True)
    return Walkthrough(
        tokens=tokens,
        x=x,
        baseline_scores=baseline_scores,
        baseline_weights=base.weights,
        baseline_context=base.output,
        w_q=layer.q_proj.weight.detach().T,
        w_k=layer.k_proj.weight.detach().T,
        w_v=layer.v_proj.weight.detach().T,
        q=q,
        k=k,
        v=v,
        scores=q @ k.T / math.sqrt(d_k),
        weights=out.weights,
        context=out.output.detach(),
        causal_weights=causal.weights[0],
        causal_context=causal.output[0],
        head_weights=heads.weights,
    )
