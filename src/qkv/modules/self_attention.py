"""The seeds' single attention head with trainable W_Q, W_K, W_V."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .. import _checks as C
from ..functional import scaled_dot_product_attention
from ..result import AttentionResult

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """One head of self-attention: ``softmax(x W_Q (x W_K)ᵀ / sqrt(d_k)) x W_V``.

    Each input embedding ``x_i`` is projected three ways: a query (what this token
    looks for), a key (how it can be found) and a value (what it passes on).

    Args:
        d_in: width of the input embeddings (d_model).
        d_k: width of queries and keys (they are compared, so they share it).
        d_v: width of values and of the output (default ``d_k``).
        bias: biases in the projections (the seeds' formulation has none).
        dropout: dropout on the attention weights, in training only.
        causal: each token attends only to itself and earlier tokens.

    Shapes: ``x`` (B, L, d_in) or (L, d_in) -> output (B, L, d_v) or (L, d_v).
    """

    def __init__(
        self,
        d_in: int,
        d_k: int,
        d_v: int | None = None,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        d_in = C.check_positive_int("d_in", d_in)
        d_k = C.check_positive_int("d_k", d_k)
        d_v = d_k if d_v is None else C.check_positive_int("d_v", d_v)
        self.dropout = C.check_dropout("dropout", dropout)
        self.causal = bool(causal)
        self.q_proj = nn.Linear(d_in, d_k, bias=bias)  # W_Q: d_in -> d_k
        self.k_proj = nn.Linear(d_in, d_k, bias=bias)  # W_K: d_in -> d_k
        self.v_proj = nn.Linear(d_in, d_v, bias=bias)  # W_V: d_in -> d_v

    def forward(
        self, x: Tensor, *, attn_mask: Tensor | None = None, need_weights: bool = False
    ) -> Tensor | AttentionResult:
        """Context vectors for ``x``; with ``need_weights`` also the (…, L, L) weights."""
        x = C.check_float_tensor("x", x)
        d_in = self.q_proj.in_features
        if x.ndim not in (2, 3) or x.shape[-1] != d_in:
            raise ValueError(f"x must have shape (B, L, {d_in}) or (L, {d_in}), got {C.shape(x)}")
        q = self.q_proj(x).unsqueeze(-3)  # (..., 1, L, d_k): one head
        k = self.k_proj(x).unsqueeze(-3)  # (..., 1, L, d_k)
        v = self.v_proj(x).unsqueeze(-3)  # (..., 1, L, d_v)
        if attn_mask is not None:
            attn_mask = C.check_tensor("attn_mask", attn_mask)
        if attn_mask is not None and attn_mask.ndim >= 3:
            attn_mask = attn_mask.unsqueeze(-3)  # (B, L, L) -> (B, 1, L, L)
        result = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            backend="reference" if need_weights else "auto",
        )
        if not need_weights:
            return result.squeeze(-3)  # (..., L, d_v)
        out, w = result
        return AttentionResult(out.squeeze(-3), w.squeeze(-3), result.backend)
