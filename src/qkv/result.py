"""Typed results: what an attention call returns when more than the output is asked for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

__all__ = ["AttentionResult"]


@dataclass(frozen=True)
class AttentionResult:
    """Output of attention with its weights; unpacks as ``output, weights = result``.

    Attributes:
        output: context vectors, ``(..., H, L, d_v)`` (modules reshape to ``(B, L, d_model)``).
        weights: softmax weights **before dropout**, ``(..., H, L, S)``; ``(..., L, S)`` when
            averaged over heads; only the requested rows when a subset was asked for.
            A fully masked row is all zeros.
        backend: name of the backend that computed it (after ``"auto"`` resolved).
        lse: per-row log-sum-exp of the scaled, masked scores ``(..., H, L)`` in float32,
            when the backend keeps it (``-inf`` for a fully masked row); else ``None``.
    """

    output: Tensor
    weights: Tensor | None
    backend: str
    lse: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor | None]:
        # Fixed length two, whatever was requested: no tuples that change size.
        yield self.output
        yield self.weights
