"""``qkv explain TEXT``: a trained model's attention for one word, layer by layer.

Prints the tokens; where the focus word looks in each layer (head average and the
most focused head) next to the untrained baseline; the full row of one layer beside
the baseline's; how far each layer moved the word's vector. Writes PNG heatmaps and
the HTML explorer under ``--out``. The numbers come from :mod:`qkv.explain`.

Texts, words, tokens, model names and paths come from the user: they are escaped
(or printed as :class:`~rich.text.Text`) so that ``[/x]`` is shown as typed instead
of being read as rich markup. ``--out`` is checked before the model runs, and the
system's refusal to write there becomes a one-line error naming ``--out``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..explain import (
    MAX_EXPLORER_TOKENS,
    SPECIAL_TOKENS,
    Explanation,
    explain,
    save_heatmaps,
    write_explorer,
)
from .errors import UsageError, check_out_dir, user_paths

DEFAULT_OUT = Path("qkv-explain")

_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float, width: int = 20) -> str:
    """A horizontal bar for ``value`` in [0, 1], ``width`` characters at full scale."""
    cells = max(0.0, min(1.0, value)) * width
    full = int(cells)
    part = _BLOCKS[int((cells - full) * 8)] if full < width else ""
    return ("█" * full + part.strip()).ljust(width)


def console() -> Console:
    """A rich console; plain text, 120 columns, when output is not a terminal (pipes, tests).

    Emoji codes are off: a user's ``:smile:`` is text to show, not a picture.
    """
    if sys.stdout.isatty():
        return Console(emoji=False)
    return Console(width=120, color_system=None, emoji=False)


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


def _top(row, tokens: list[str], k: int) -> str:
    values, idx = row.topk(min(k, len(tokens)))
    return " · ".join(
        f"{escape(tokens[j])} {v:.2f}" for v, j in zip(values.tolist(), idx.tolist(), strict=True)
    )


def _check_range(name: str, value: int | None, high: int) -> None:
    if value is not None and not 1 <= value <= high:
        raise ValueError(f"{name} must be between 1 and {high}, got {value}")


def print_explanation(
    expl: Explanation, out: Console, *, layer: int, head: int | None, top: int
) -> None:
    tokens = expl.tokens
    focus = expl.focus
    pos = list(focus.positions)
    specials = [j for j, t in enumerate(tokens) if t in SPECIAL_TOKENS]

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
    more = f", first of {focus.occurrences} occurrences" if focus.occurrences > 1 else ""
    word = escape(repr(focus.word))
    out.print(f"Focus: [bold]{word}[/bold] = {escape(where)}{more}\n")

    table = Table(
        title=f"Where {word} looks, layer by layer (top {top})",
        title_justify="left",
    )
    table.add_column("stage")
    table.add_column("head average", no_wrap=True)
    table.add_column("[CLS]+[SEP]", justify="right")
    table.add_column("most focused head", no_wrap=True)
    for stage in expl.stages:
        special = float(stage.mean_row[specials].sum()) if specials else 0.0
        h_row = stage.head_rows[stage.focused_head]
        if stage.label == "baseline":
            name, focused = "baseline", "(one head)"
        else:
            name = stage.label
            focused = f"head {stage.focused_head + 1}: {_top(h_row, tokens, top)}"
        table.add_row(name, _top(stage.mean_row, tokens, top), f"{special:.2f}", focused)
    out.print(table)
    out.print(
        "[dim]Most focused head: the head whose largest weight on one other word (not "
        "[CLS]/[SEP], not the word itself) is highest. Heads are numbered from 1.[/dim]"
    )
    self_w = float(expl.stages[0].mean_row[pos].sum())
    out.print(
        f"[dim]Untrained baseline: {word} puts {self_w:.2f} of its attention on itself "
        "(plain dot products: a vector is most similar to itself).[/dim]\n"
    )

    st = expl.stages[layer]
    row = st.mean_row if head is None else st.head_rows[head - 1]
    which = "head average" if head is None else f"head {head}"
    detail = Table(
        title=f"Attention of {word} on every token: untrained baseline vs layer {layer} ({which})",
        title_justify="left",
    )
    detail.add_column("#", justify="right", style="dim")
    detail.add_column("token")
    detail.add_column("baseline", justify="right")
    detail.add_column("", no_wrap=True)
    detail.add_column(f"layer {layer}", justify="right")
    detail.add_column("", no_wrap=True)
    base = expl.stages[0].mean_row
    for j, t in enumerate(tokens):
        detail.add_row(
            str(j),
            Text(t),
            f"{float(base[j]):.4f}",
            bar(float(base[j])),
            f"{float(row[j]):.4f}",
            bar(float(row[j])),
        )
    out.print(detail)

    moves = Table(
        title=f"How far each stage moved {word} from its input embedding x",
        title_justify="left",
    )
    moves.add_column("stage")
    moves.add_column("cos distance", justify="right")
    moves.add_column("", no_wrap=True)
    moves.add_column("step", justify="right")
    moves.add_column("shift", justify="right")
    moves.add_column("|h|", justify="right")
    for m in expl.movement:
        moves.add_row(
            m.label,
            f"{m.cos_from_input:.4f}",
            bar(m.cos_from_input),
            f"{m.cos_from_previous:.4f}",
            f"{m.relative_shift:.4f}",
            f"{m.norm:.2f}",
        )
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
) -> Explanation:
    from ..explain.models import load_model

    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: give a sentence to explain")
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    check_baseline_scale(baseline_scale)
    if out_dir is not None:
        check_out_dir("--out", out_dir)
    model = load_model(model_name, backend=backend)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    _check_range("--layer", layer, n_layers)
    _check_range("--head", head, n_heads)
    expl = explain(model, text, focus, truncate=truncate, baseline_scale=baseline_scale)
    check_baseline_finite(baseline_scale, expl.baseline_weights, expl.baseline_context)
    layer = n_layers if layer is None else layer
    out.print(
        f"[bold]{escape(model.name)}[/bold] on qkv attention: {n_layers} layers × {n_heads} heads, "
        f"d_model={model.config.hidden_size}, backend={model.backend!r}"
        + (" [yellow](input truncated)[/yellow]" if expl.text.truncated else "")
    )
    print_explanation(expl, out, layer=layer, head=head, top=top)
    if out_dir is not None:
        with user_paths("--out", out_dir):
            files = save_heatmaps(expl, out_dir, layer=layer, head=head)
            if len(expl.tokens) <= MAX_EXPLORER_TOKENS:
                page = write_explorer(expl, Path(out_dir) / "explorer.html", model_name=model.name)
                files.append(page)
        if len(expl.tokens) > MAX_EXPLORER_TOKENS:
            out.print(
                f"[dim]No explorer page: it is made for texts up to {MAX_EXPLORER_TOKENS} tokens.[/dim]"
            )
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
        )
