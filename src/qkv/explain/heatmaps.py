"""PNG heatmaps of attention weights (matplotlib, no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly, not ``pyplot``: no
global state, no GUI backend, safe to call from tests and servers.

Files written by :func:`save_heatmaps`:

* ``overview.png`` — the baseline and every layer's head-average weights, side by side;
* ``layer{N}_heads.png`` — every head of layer N;
* ``layer{N}_head{M}.png`` — one head, larger, with its numbers (when a head is chosen).

Rows are queries (the token that looks), columns keys (the token looked at); the
focus word's rows are boxed.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .analysis import Explanation

__all__ = ["save_heatmaps"]

_CMAP = "Blues"


def _draw(
    ax,
    w: Tensor,
    tokens: list[str],
    focus_rows: tuple[int, ...],
    *,
    labels: bool,
    numbers: bool = False,
):
    """Draw ``w`` (L, S) on ``ax``; returns the image (for a colour bar)."""
    image = ax.imshow(w.float().numpy(), cmap=_CMAP, vmin=0.0, vmax=1.0, aspect="equal")
    L = len(tokens)
    if labels:
        ax.set_xticks(range(L), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(L), tokens, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    # Box the focus word's rows so the eye finds them.
    top, bottom = min(focus_rows) - 0.5, max(focus_rows) + 0.5
    ax.plot(
        [-0.5, L - 0.5, L - 0.5, -0.5, -0.5],
        [top, top, bottom, bottom, top],
        color="#d62728",
        lw=1.2,
    )
    if numbers:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                val = float(w[i, j])
                ax.text(
                    j,
                    i,
                    f"{val:.2f}",
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if val > 0.5 else "black",
                )
    return image


def save_heatmaps(
    expl: Explanation, out_dir: str | Path, *, layer: int | None = None, head: int | None = None
) -> list[Path]:
    """Write the PNGs described in the module docstring; returns their paths.

    Args:
        expl: from :func:`qkv.explain.explain`.
        out_dir: created if missing.
        layer: the layer (from 1) whose heads get their own figure; default the last.
        head: a head (from 1) of that layer to draw large with its numbers.
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens, rows = expl.tokens, expl.focus.positions
    n_layers = len(expl.run.layers)
    layer = n_layers if layer is None else layer
    labels = len(tokens) <= 40  # beyond that, tick labels overlap into a grey smear
    paths = []

    n = n_layers + 1
    cols = min(n, 4)
    grid = -(-n // cols)  # ceil: rows of panels
    fig = Figure(figsize=(3.3 * cols, 3.5 * grid), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    image = None
    for s, ax in enumerate(axes.flat):
        if s >= n:
            ax.axis("off")
            continue
        w = expl.stage_weights(s).mean(0)  # (L, S): average over heads
        image = _draw(ax, w, tokens, rows, labels=labels)
        ax.set_title("untrained baseline" if s == 0 else f"layer {s} · head average", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(
        f"Attention weights: each row (query) looks at the columns (keys); focus {expl.focus.word!r} boxed",
        fontsize=10,
    )
    paths.append(out / "overview.png")
    fig.savefig(paths[-1], dpi=100)

    weights = expl.stage_weights(layer)  # (H, L, S)
    H = weights.shape[0]
    cols = 6 if H % 6 == 0 else min(H, 4)
    grid = -(-H // cols)
    fig = Figure(figsize=(2.2 * cols, 2.3 * grid), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        _draw(ax, weights[h], tokens, rows, labels=False)
        ax.set_title(f"head {h + 1}", fontsize=8)
    fig.suptitle(f"Layer {layer}: every head (focus rows boxed)", fontsize=10)
    paths.append(out / f"layer{layer}_heads.png")
    fig.savefig(paths[-1], dpi=110)

    if head is not None:
        side = max(4.0, 0.38 * len(tokens) + 1.5)
        fig = Figure(figsize=(side, side), layout="constrained")
        ax = fig.subplots()
        _draw(ax, weights[head - 1], tokens, rows, labels=True, numbers=len(tokens) <= 24)
        ax.set_title(f"Layer {layer}, head {head}", fontsize=10)
        paths.append(out / f"layer{layer}_head{head}.png")
        fig.savefig(paths[-1], dpi=130)
    return paths
