"""PNG heatmaps of attention weights (matplotlib, no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly, not ``pyplot``: no
global state, no GUI backend, safe to call from tests and servers.

Files written by :func:`save_heatmaps`:

* ``overview.png`` — the baseline and every layer's head-average weights, side by side;
* ``layer{N}_heads.png`` — every head of layer N;
* ``layer{N}_head{M}.png`` — one head, larger, with its numbers (when a head is chosen).

Rows are queries (the token that looks), columns keys (the token looked at); the
focus word's rows are boxed and its tick labels are red. Every figure has a colour
bar naming the scale: linear from 0 to the 99th percentile of all the weights drawn,
the same scale the explorer page uses (:mod:`qkv.explain.colour`). Long texts keep
every k-th token label (and the focus word's), so labels never overlap into a smear
and never vanish. For a causal decoder, keys after the query are masked: drawn grey,
not as zero weights.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from .analysis import Explanation
from .colour import ColourScale, colour_scale

__all__ = ["heatmap_figures", "save_heatmaps", "tick_positions"]

_CMAP = "Blues"  # the page interpolates the same nine ColorBrewer colours
_MASKED = "#d9d9d9"
_FOCUS = "#d62728"


def tick_positions(n: int, most: int, keep: tuple[int, ...] = ()) -> list[int]:
    """Every k-th of ``n`` positions so that about ``most`` are labelled, plus ``keep``.

    A thinned position next to a kept one is dropped, so two labels never touch.
    """
    if n <= 0:
        return []
    step = max(1, math.ceil(n / max(1, most)))
    kept = set(keep)
    picks = {i for i in range(0, n, step) if step == 1 or all(abs(i - k) > step // 2 for k in kept)}
    return sorted(picks | kept)


def _draw(
    ax,
    w: Tensor,
    tokens: list[str],
    focus_rows: tuple[int, ...],
    scale: ColourScale,
    *,
    causal: bool,
    most_labels: int,
    fontsize: float = 7,
    x_labels: bool = True,
    y_labels: bool = True,
    numbers: bool = False,
):
    """Draw ``w`` (L, S) on ``ax``; returns the image (for a colour bar)."""
    import matplotlib
    import numpy as np

    cmap = matplotlib.colormaps[_CMAP].with_extremes(bad=_MASKED)
    values = w.float().numpy()
    L, S = values.shape
    if causal:
        future = np.triu(np.ones((L, S), dtype=bool), k=S - L + 1)  # key j > query i
        values = np.ma.masked_array(values, mask=future)
    image = ax.imshow(
        values,
        cmap=cmap,
        vmin=0.0,
        vmax=scale.vmax,
        aspect="equal",
        interpolation="nearest",
    )
    # The focus word's first piece is always labelled (the box marks the others:
    # three adjacent red labels would overlap).
    ticks = tick_positions(L, most_labels, (focus_rows[0],))
    labels = [tokens[i] for i in ticks]
    ax.set_xticks(ticks, labels if x_labels else [], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels if y_labels else [], fontsize=fontsize)
    ax.tick_params(length=2, pad=1)
    for axis_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for pos, label in zip(ticks, axis_labels, strict=False):
            if pos in focus_rows:
                label.set_color(_FOCUS)
                label.set_fontweight("bold")
    # Box the focus word's rows so the eye finds them.
    top, bottom = min(focus_rows) - 0.5, max(focus_rows) + 0.5
    ax.plot(
        [-0.5, S - 0.5, S - 0.5, -0.5, -0.5],
        [top, top, bottom, bottom, top],
        color=_FOCUS,
        lw=1.2,
    )
    if numbers:
        for i in range(L):
            for j in range(S):
                if causal and j > i + S - L:
                    continue
                val = float(w[i, j])
                ax.text(
                    j,
                    i,
                    f"{val:.2f}",
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if val > 0.5 * scale.vmax else "black",
                )
    return image


def _caption(expl: Explanation) -> str:
    masked = "; keys after the query are masked (grey)" if expl.causal else ""
    return f"rows (queries) look at columns (keys); focus {expl.focus.label} boxed{masked}"


def heatmap_figures(
    expl: Explanation,
    *,
    layer: int | None = None,
    head: int | None = None,
    scale: ColourScale | None = None,
) -> dict[str, object]:
    """The figures :func:`save_heatmaps` writes, by file name (matplotlib ``Figure``s).

    Arguments as for :func:`save_heatmaps`.
    """
    from matplotlib.figure import Figure

    tokens, rows = expl.tokens, expl.focus.positions
    n = len(expl.stages)  # the baseline and layers 1..n-1
    n_layers = n - 1
    layer = n_layers if layer is None else layer
    if scale is None:
        scale = colour_scale((expl.stage_weights(s) for s in range(n)), causal=expl.causal)
    figures: dict[str, object] = {}

    cols = min(n, 4)
    grid = -(-n // cols)  # ceil: rows of panels
    fig = Figure(figsize=(3.6 * cols, 3.8 * grid), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    image = None
    for s, ax in enumerate(axes.flat):
        if s >= n:
            ax.axis("off")
            continue
        w = expl.stage_weights(s).mean(0)  # (L, S): average over heads
        image = _draw(ax, w, tokens, rows, scale, causal=expl.causal, most_labels=30, fontsize=6)
        ax.set_title("untrained baseline" if s == 0 else f"layer {s} · head average", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label=scale.label)
    fig.suptitle(f"Attention weights: {_caption(expl)}", fontsize=10)
    figures["overview.png"] = fig

    weights = expl.stage_weights(layer)  # (H, L, S)
    H = weights.shape[0]
    cols = 6 if H % 6 == 0 else min(H, 4)
    grid = -(-H // cols)
    fig = Figure(figsize=(2.6 * cols + 1.0, 2.7 * grid + 0.6), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        image = _draw(
            ax,
            weights[h],
            tokens,
            rows,
            scale,
            causal=expl.causal,
            most_labels=12,
            fontsize=5,
            x_labels=h + cols >= H,  # labels on the outer panels only: less clutter
            y_labels=h % cols == 0,
        )
        ax.set_title(f"head {h + 1}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.7, label=scale.label)
    fig.suptitle(f"Layer {layer}, every head: {_caption(expl)}", fontsize=10)
    figures[f"layer{layer}_heads.png"] = fig

    if head is not None:
        side = min(16.0, max(4.5, 0.38 * len(tokens) + 2.5))
        fig = Figure(figsize=(side + 1.2, side), layout="constrained")
        ax = fig.subplots()
        image = _draw(
            ax,
            weights[head - 1],
            tokens,
            rows,
            scale,
            causal=expl.causal,
            most_labels=80,
            numbers=len(tokens) <= 24,
        )
        fig.colorbar(image, ax=ax, shrink=0.7, label=scale.label)
        ax.set_title(f"Layer {layer}, head {head}", fontsize=10)
        figures[f"layer{layer}_head{head}.png"] = fig
    return figures


def _dpi(name: str) -> int:
    # The single head's figure gets the most dots: its printed numbers must stay legible.
    if name == "overview.png":
        return 100
    return 110 if name.endswith("_heads.png") else 130


def save_heatmaps(
    expl: Explanation,
    out_dir: str | Path,
    *,
    layer: int | None = None,
    head: int | None = None,
    scale: ColourScale | None = None,
) -> list[Path]:
    """Write the PNGs described in the module docstring; returns their paths.

    Args:
        expl: from :func:`qkv.explain.explain`.
        out_dir: created if missing.
        layer: the layer (from 1) whose heads get their own figure; default the last.
        head: a head (from 1) of that layer to draw large with its numbers.
        scale: the colour scale; default :func:`~qkv.explain.colour.colour_scale` of
            every head of every stage (what the explorer page uses too).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in heatmap_figures(expl, layer=layer, head=head, scale=scale).items():
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=_dpi(name))
    return paths
