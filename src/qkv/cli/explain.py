"""``qkv explain TEXT``: a trained model's attention for one word, layer by layer.

Prints the tokens; where the focus word looks in each layer (head average and the
most focused head) next to the untrained baseline; the full row of one layer beside
the baseline's; how far each layer moved the word's vector. Writes PNG heatmaps and
the HTML explorer under ``--out`` (the page opens at ``--layer``/``--head``, on the
same averaged row of the focus word), and with ``--save-weights`` the weights
themselves. Tables fit the terminal (:mod:`.tables`). The numbers come from
:mod:`qkv.explain`.

Texts, words, tokens, model names and paths come from the user: they are escaped
(or printed as :class:`~rich.text.Text`) so that ``[/x]`` is shown as typed instead
of being read as rich markup. ``--out`` is checked before the model runs, and the
system's refusal to write there becomes a one-line error naming ``--out``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..explain import (
    SPECIAL_TOKENS,
    Explanation,
    colour_scale,
    explain,
    save_heatmaps,
    save_weights,
    write_explorer,
)
from ..explain.export import WEIGHT_FORMATS
from .errors import UsageError, check_out_dir, user_paths
from .tables import bar, bar_width, console, label_column, table_overhead

DEFAULT_OUT = Path("qkv-explain")

# Kept importable from here: compare.py and older code use them.
__all__ = ["bar", "console", "print_explanation", "register", "run"]


def check_baseline_scale(value: float) -> float:
    """Refuse a ``--baseline-scale`` that is not a finite number > 0, naming the option.

    The library would refuse it too, but its message names its own argument ("scale"),
    which is not what the user typed.
    """
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--baseline-scale must be a finite number > 0, got {value}")
    return value


def check_baseline_finite(value: float, *results: torch.Tensor) -> None:
    """Refuse a ``--baseline-scale`` so large that the baseline's numbers stopped being finite.

    A huge scale makes the scaled dot products overflow to infinity, and the softmax of
    infinities is NaN: printing those numbers would only hide the cause.
    """
    if not all(bool(torch.isfinite(t).all()) for t in results):
        raise UsageError(
            f"--baseline-scale {value:g} is too large: the baseline's scaled dot products "
            "overflow and its weights are not finite numbers; use a smaller value"
        )


def _top(row, tokens: list[str], k: int, sep: str = " · ") -> str:
    values, idx = row.topk(min(k, len(tokens)))
    return sep.join(
        f"{escape(tokens[j])} {v:.2f}" for v, j in zip(values.tolist(), idx.tolist(), strict=True)
    )


def check_save_weights(path: Path) -> Path:
    """Refuse a ``--save-weights`` file that cannot be written, before the model runs."""
    if str(path) == "":
        raise UsageError("--save-weights is empty: give a .safetensors or .npz file name")
    if path.suffix.lower() not in WEIGHT_FORMATS:
        got = f"{path.suffix!r}" if path.suffix else "no extension"
        raise UsageError(
            f"--save-weights {path}: the name must end in .safetensors or .npz, got {got}"
        )
    if path.is_dir():
        raise UsageError(f"--save-weights {path} is a folder, not a file")
    try:
        check_out_dir("--save-weights", path.parent)
    except UsageError as err:
        # check_out_dir names the folder; the user typed the file.
        why = str(err).removeprefix(f"--save-weights {path.parent}").lstrip(": ")
        raise UsageError(f"--save-weights {path}: cannot write in {path.parent} ({why})") from err
    return path


def _check_range(name: str, value: int | None, high: int) -> None:
    if value is not None and not 1 <= value <= high:
        raise ValueError(f"{name} must be between 1 and {high}, got {value}")


#: Below this width the top-k lists of the summary table go one entry per line.
_WIDE = 100


def print_explanation(
    expl: Explanation, out: Console, *, layer: int, head: int | None, top: int
) -> None:
    """Print the tokens and the three tables, fitted to ``out.width`` (see :mod:`.tables`).

    For a causal decoder (``expl.causal``) the wording says "looks back at" and the
    keys after the focus word, which it cannot see, are marked instead of printed as 0.
    """
    tokens = expl.tokens
    focus = expl.focus
    pos = list(focus.positions)
    width = out.width
    # Only the special tokens this text has: a decoder has no [CLS] or [SEP].
    specials = [j for j, t in enumerate(tokens) if t in SPECIAL_TOKENS]
    special_names = "+".join(dict.fromkeys(tokens[j] for j in specials))
    looks = "looks back" if expl.causal else "looks"

    line = Text(f"Tokens ({len(tokens)}): ")
    for j, t in enumerate(tokens):
        line.append(f"{j}:", style="dim")
        line.append(t, style="bold red" if j in pos else ("dim" if t in SPECIAL_TOKENS else ""))
        line.append("  ")
    out.print(line)
    pieces = " ".join(tokens[j] for j in pos)
    where = (
        f"token {pos[0]}"
        if len(pos) == 1
        else f"tokens {pos[0]}-{pos[-1]} ({pieces}; their rows and vectors are averaged)"
    )
    more = (
        f", {focus.occurrence} of {focus.occurrences} occurrences (--occurrence picks another)"
        if focus.occurrences > 1
        else ""
    )
    word = escape(focus.label)
    out.print(f"Focus: [bold]{word}[/bold] = {escape(where)}{more}\n")

    # Narrow: one "token weight" per line, so no entry is ever split across lines.
    wide = width >= _WIDE
    sep = " · " if wide else "\n"
    table = Table(
        title=f"Where {word} {looks}, layer by layer (top {top})",
        title_justify="left",
    )
    label_column(table, "stage", [s.label for s in expl.stages])
    table.add_column("head average", overflow="fold")
    if specials:
        table.add_column(special_names, justify="right", overflow="fold")
    table.add_column("most focused head", overflow="fold")
    for stage in expl.stages:
        h_row = stage.head_rows[stage.focused_head]
        if stage.label == "baseline":
            focused = "(one head)"
        else:
            gap = " " if wide else "\n"
            focused = f"head {stage.focused_head + 1}:{gap}{_top(h_row, tokens, top, sep)}"
        cells = [stage.label, _top(stage.mean_row, tokens, top, sep)]
        if specials:
            cells.append(f"{float(stage.mean_row[specials].sum()):.2f}")
        table.add_row(*cells, focused)
    out.print(table)
    not_counted = f"not {special_names.replace('+', '/')}, " if specials else ""
    out.print(
        "[dim]Most focused head: the head whose largest weight on one other word "
        f"({escape(not_counted)}not the word itself) is highest. Heads are numbered from 1.[/dim]"
    )
    self_w = float(expl.stages[0].mean_row[pos].sum())
    out.print(
        f"[dim]Untrained baseline: {word} puts {self_w:.2f} of its attention on itself "
        "(plain dot products: a vector is most similar to itself).[/dim]\n"
    )

    st = expl.stages[layer]
    row = st.mean_row if head is None else st.head_rows[head - 1]
    which = "head average" if head is None else f"head {head}"
    every = "every token it can see" if expl.causal else "every token"
    detail = Table(
        title=f"Attention of {word} on {every}: untrained baseline vs layer {layer} ({which})",
        title_justify="left",
    )
    index_labels = [str(j) for j in range(len(tokens))]
    label_column(detail, "#", index_labels, justify="right", style="dim")
    widest = max(len(t) for t in tokens)
    token_width = min(max(widest, len("token")), 24)
    detail.add_column("token", min_width=token_width, overflow="fold")
    used = (
        table_overhead(6) + len(index_labels[-1]) + token_width + 8 + max(7, len(f"layer {layer}"))
    )
    bars = bar_width(width, used, 2)
    if not bars:  # no room for bars: four columns, and the numbers alone
        used = table_overhead(4) + len(index_labels[-1]) + token_width + 8 + 7
    detail.add_column("baseline", justify="right", no_wrap=True)
    if bars:
        detail.add_column("", no_wrap=True)
    detail.add_column(f"layer {layer}", justify="right", no_wrap=True)
    if bars:
        detail.add_column("", no_wrap=True)
    base = expl.stages[0].mean_row
    seen = max(pos)  # a causal row i sees keys 0..i; the word's rows see up to its last piece
    for j, t in enumerate(tokens):
        if expl.causal and j > seen:
            cells = ["future", ""] if bars else ["future"]
            detail.add_row(str(j), Text(t), *cells, *cells)
            continue
        b, r = float(base[j]), float(row[j])
        cells_b = [f"{b:.4f}", bar(b, bars)] if bars else [f"{b:.4f}"]
        cells_r = [f"{r:.4f}", bar(r, bars)] if bars else [f"{r:.4f}"]
        detail.add_row(str(j), Text(t), *cells_b, *cells_r)
    out.print(detail)
    if expl.causal:
        out.print(
            "[dim]A causal decoder's token sees only itself and the tokens before it: "
            "'future' keys are masked.[/dim]"
        )

    moves = Table(
        title=f"How far each stage moved {word} from its input embedding x",
        title_justify="left",
    )
    label_column(moves, "stage", [m.label for m in expl.movement])
    moves.add_column("cos distance", justify="right")
    used = table_overhead(6) + 8 + 12 + 3 * 7
    bars = bar_width(width, used)
    if bars:
        moves.add_column("", no_wrap=True)
    moves.add_column("step", justify="right")
    moves.add_column("shift", justify="right")
    moves.add_column("|h|", justify="right")
    for m in expl.movement:
        cells = [m.label, f"{m.cos_from_input:.4f}"]
        if bars:
            cells.append(bar(m.cos_from_input, bars))
        cells += [f"{m.cos_from_previous:.4f}", f"{m.relative_shift:.4f}", f"{m.norm:.2f}"]
        moves.add_row(*cells)
    out.print(moves)
    out.print(
        "[dim]cosine distance = 1 - cos(h, x); step = cosine distance from the previous "
        "layer; shift = |h - x| / |x|.[/dim]"
    )


def run(
    text: str,
    *,
    focus: str | None,
    layer: int | None,
    head: int | None,
    out_dir: Path | None,
    top: int,
    truncate: bool,
    baseline_scale: float,
    model_name: str,
    backend: str,
    out: Console,
    occurrence: int = 1,
    save_weights_to: Path | None = None,
) -> Explanation:
    from ..explain.models import load_model

    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: give a sentence to explain")
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    check_baseline_scale(baseline_scale)
    if occurrence < 1:
        raise UsageError(f"--occurrence counts from 1, got {occurrence}")
    if out_dir is not None:
        check_out_dir("--out", out_dir)
    if save_weights_to is not None:
        check_save_weights(save_weights_to)
    model = load_model(model_name, backend=backend)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    _check_range("--layer", layer, n_layers)
    _check_range("--head", head, n_heads)
    expl = explain(
        model,
        text,
        focus,
        truncate=truncate,
        baseline_scale=baseline_scale,
        occurrence=occurrence,
    )
    check_baseline_finite(baseline_scale, expl.baseline_weights, expl.baseline_context)
    layer = n_layers if layer is None else layer
    out.print(
        f"[bold]{escape(model.name)}[/bold] on qkv attention: {n_layers} layers × {n_heads} heads, "
        f"d_model={model.config.hidden_size}, backend={model.backend!r}"
        + (" [yellow](input truncated)[/yellow]" if expl.text.truncated else "")
    )
    print_explanation(expl, out, layer=layer, head=head, top=top)
    if save_weights_to is not None:
        with user_paths("--save-weights", save_weights_to):
            saved = save_weights(expl, save_weights_to)
        out.print(f"\nSaved every stage's weights and the tokens to {escape(str(saved))}")
    if out_dir is not None:
        # One colour scale for the PNGs and the page, so the same weight looks the same.
        scale = colour_scale(
            (expl.stage_weights(s) for s in range(len(expl.stages))), causal=expl.causal
        )
        with user_paths("--out", out_dir):
            files = save_heatmaps(expl, out_dir, layer=layer, head=head, scale=scale)
            page = write_explorer(
                expl,
                Path(out_dir) / "explorer.html",
                model_name=model.name,
                layer=layer,
                head=head,
                scale=scale,
            )
            files.append(page)
        out.print(f"\nWrote {len(files)} files to {escape(str(Path(out_dir).resolve()))}:")
        for f in files:
            out.print(f"  {escape(str(f))}")
        if len(files) and files[-1].suffix == ".html":
            out.print(f"Open the explorer in a browser: {escape(files[-1].resolve().as_uri())}")
    return expl


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain_cmd(
        text: str = typer.Argument(..., help="A sentence for the model to read."),
        focus: str | None = typer.Option(
            None, help="The word to follow (default: the first word)."
        ),
        occurrence: int = typer.Option(
            1,
            help="Which occurrence of a repeated focus word to follow, from 1 "
            "(--focus bank --occurrence 2: the second 'bank').",
        ),
        layer: int | None = typer.Option(
            None, help="Layer (from 1) shown in detail and drawn head by head; default the last."
        ),
        head: int | None = typer.Option(
            None, help="Head (from 1) of that layer to show instead of the head average."
        ),
        out: Annotated[
            Path, typer.Option(help="Folder for the PNG heatmaps and explorer.html.")
        ] = DEFAULT_OUT,
        files: bool = typer.Option(True, help="Write the heatmaps and the explorer page."),
        save_weights: Annotated[
            Path | None,
            typer.Option(
                help="Also save every stage's weights with the tokens: FILE.safetensors "
                "or FILE.npz (the extension picks the format).",
                metavar="FILE",
            ),
        ] = None,
        top: int = typer.Option(3, help="How many attended tokens to list per stage."),
        truncate: bool = typer.Option(
            False, help="Cut a text longer than 512 tokens instead of failing."
        ),
        baseline_scale: float = typer.Option(
            1.0, help="Multiplier of the baseline's dot products (1 = plain)."
        ),
        model: str = typer.Option(
            "all-MiniLM-L6-v2",
            help="all-MiniLM-L6-v2, smollm2 (make llm) or a local transformers model folder.",
        ),
        backend: str = typer.Option("auto", help="Attention backend for the model's layers."),
    ) -> None:
        """Show what a trained model attends to, layer by layer, for one word of TEXT."""
        run(
            text,
            focus=focus,
            layer=layer,
            head=head,
            out_dir=out if files else None,
            top=top,
            truncate=truncate,
            baseline_scale=baseline_scale,
            model_name=model,
            backend=backend,
            out=console(),
            occurrence=occurrence,
            save_weights_to=save_weights,
        )
