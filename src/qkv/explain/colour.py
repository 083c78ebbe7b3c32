"""The one colour scale the PNG heatmaps and the explorer page share.

A softmax row spreads a total weight of 1 over S keys, so in a 1,000-token text most
weights are near 1/1,000 and a plain 0-to-1 scale paints the whole picture white. The
scale here stays **linear** (twice the colour depth means twice the weight) but ends
at ``vmax``, the 99th percentile of all the weights one explanation draws (every head
of every stage; keys a causal model cannot see are left out); weights above it get
the darkest colour. For a short sentence ``vmax`` is close to 1; for a long text it
drops towards the weights that actually occur. The same number is used by every
figure and by the page, and each states it in its colour bar or legend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ColourScale", "colour_scale"]

#: The share of weights drawn lighter than the darkest colour.
QUANTILE = 0.99
#: Weights sampled in all to estimate the quantile: torch.quantile refuses more than
#: 2**24 values, and an evenly strided sample of this size estimates it well enough.
_SAMPLE = 4_000_000


@dataclass(frozen=True)
class ColourScale:
    """Linear colours from 0 (white) to ``vmax`` (darkest); above ``vmax`` is clipped.

    Attributes:
        vmax: the weight drawn darkest, in (0, 1].
        quantile: the share of weights at or below it (0.99).
    """

    vmax: float
    quantile: float = QUANTILE

    @property
    def label(self) -> str:
        """What a colour bar says about this scale."""
        pct = f"{self.quantile * 100:g}th percentile"
        return f"attention weight (linear, 0 to {self.vmax:.2g} = {pct}; higher is clipped)"


def _round_up(x: float) -> float:
    """Round up to two significant digits, so the legend shows the exact number used."""
    if x <= 0:
        return x
    step = 10 ** (math.floor(math.log10(x)) - 1)
    return min(1.0, math.ceil(x / step - 1e-9) * step)


def colour_scale(matrices: Iterable[Tensor], *, causal: bool = False) -> ColourScale:
    """The scale for a set of ``(..., L, S)`` weight matrices (every head of every stage).

    ``causal``: only keys ``j <= i`` count (the rest are masked, not zero weights).
    """
    matrices = list(matrices)
    if not matrices:
        raise ValueError("matrices is empty: nothing to make a colour scale for")
    per_matrix = max(1_000, _SAMPLE // len(matrices))
    samples = []
    for w in matrices:
        w = w.detach().to(torch.float32)
        if causal:
            L, S = w.shape[-2:]
            allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)  # bottom-right aligned
            w = w[..., allowed]
        flat = w.reshape(-1)
        step = max(1, -(-flat.numel() // per_matrix))  # ceil: at most per_matrix values
        samples.append(flat[::step])
    values = torch.cat(samples)
    q = float(torch.quantile(values, QUANTILE))
    # Never below 1e-3: a scale ending at ~0 would turn rounding noise into colour.
    return ColourScale(_round_up(max(q, 1e-3)))
