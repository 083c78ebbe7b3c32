"""Typed per-head intermediates of one :class:`qkv.MultiHeadAttention` call.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_model width · d_k = d_v = d_model / H per head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["AttentionIntermediates"]


@dataclass(frozen=True)
class AttentionIntermediates:
    """What :meth:`qkv.MultiHeadAttention.forward_intermediates` computed, head by head.

    Attributes:
        q: ``(B, H, L, d_k)``, ``q_proj(query)`` split into heads.
        k: ``(B, H_kv, S, d_k)``, ``k_proj(key)`` split into heads (with a cache: the
            cached keys followed by the new ones).
        v: ``(B, H_kv, S, d_v)``, likewise for the values.
        weights: ``(B, H, L, S)`` softmax weights before dropout; rows sum to 1 over the
            keys that may be attended, masked keys get 0.
        context: ``(B, H, L, d_v)`` = ``weights @ v`` (after dropout in training): what
            each head passes on before the heads are concatenated and mixed by ``out_proj``.
        output: ``(B, L, d_model)``, the module's output (what ``forward`` returns).
        backend: the backend that computed the weights (after ``"auto"`` resolved).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    weights: Tensor
    context: Tensor
    output: Tensor
    backend: str
