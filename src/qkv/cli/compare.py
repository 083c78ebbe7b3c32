"""``qkv compare`` (one word in two sentences) and ``qkv similarity`` (sentence embeddings).

User text is escaped before rich prints it, so brackets are shown as typed.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..explain import (
    ControlCosines,
    WordComparison,
    compare_word,
    control_cosines,
    judge_comparison,
    sentence_similarities,
)
from .errors import UsageError
from .explain import check_baseline_finite, check_baseline_scale
from .tables import bar, bar_width, console, label_column, table_overhead


def _piece_note(label: str, cmp_side) -> str:
    f = cmp_side.focus
    note = (
        f"tokens {f.positions[0]}-{f.positions[-1]}" if len(f.positions) > 1 else f"token {f.first}"
    )
    if f.occurrences > 1:
        note += f", occurrence {f.occurrence} of {f.occurrences}"
    return f"{label}: {note}"


def _range_cell(t, stage: int) -> str:
    return f"{float(t[:, stage].min()):.2f}-{float(t[:, stage].max()):.2f}" if t.shape[0] else ""


def print_comparison(
    cmp: WordComparison,
    text_a: str,
    text_b: str,
    out: Console,
    controls: ControlCosines | None = None,
    *,
    causal: bool = False,
) -> None:
    word = escape(repr(cmp.a.focus.word))
    out.print(f"A: {escape(text_a)}\nB: {escape(text_b)}")
    out.print(f"[dim]{_piece_note('A', cmp.a)}; {_piece_note('B', cmp.b)}[/dim]")
    table = Table(title=f"Cosine similarity of {word} in A and B", title_justify="left")
    label_column(table, "stage", list(cmp.labels))
    table.add_column("cosine", justify="right", no_wrap=True)
    show_same = controls is not None and controls.same.shape[0] > 0
    show_diff = controls is not None and controls.different.shape[0] > 0
    widest = max(len("stage"), *(len(x) for x in cmp.labels))
    n_cols = 3 + show_same + show_diff
    fixed = table_overhead(n_cols) + widest + 7 + 12 * (show_same + show_diff)
    width = bar_width(out.width, fixed, most=30)
    if width:
        table.add_column("", no_wrap=True)
    if show_same:
        table.add_column("same-sense", justify="right", no_wrap=True)
    if show_diff:
        table.add_column("other-sense", justify="right", no_wrap=True)
    for i, (label, c) in enumerate(zip(cmp.labels, cmp.cosines.tolist(), strict=True)):
        cells = [label, f"{c:.4f}", *([bar(c, width)] if width else [])]
        if show_same:
            cells.append(_range_cell(controls.same, i))
        if show_diff:
            cells.append(_range_cell(controls.different, i))
        table.add_row(*cells)
    out.print(table)
    if causal:
        out.print(
            "[dim]input = the token embedding the first layer reads (no position: rotary "
            "models add it inside attention); baseline = the untrained causal q = k = v "
            "attention on those inputs; layer N = the output of block N. A decoder's "
            "vector for a word depends only on the words before it.[/dim]"
        )
    else:
        out.print(
            "[dim]input = word + position + token-type embedding after LayerNorm (positions "
            "differ, so it is not exactly 1); baseline = the untrained q = k = v attention on "
            "those inputs; layer N = the output of trained block N.[/dim]"
        )
    if controls is not None:
        pairs = f"{controls.same.shape[0]} same-sense pairs"
        if show_diff:
            pairs += f" and {controls.different.shape[0]} pairs across two senses"
        where = (
            "built-in sentences (qkv.explain.CONTROL_SENTENCES)"
            if controls.source == "built-in"
            else "TEXT_A and the --same-sense sentences"
        )
        out.print(f"[dim]Control columns: lowest-highest cosine of {pairs}, from {where}.[/dim]")
    verdict = judge_comparison(cmp, controls)
    first, last = float(cmp.cosines[0]), float(cmp.cosines[-1])
    if verdict.kind != "identical":
        out.print(
            f"Cosine of the two {word} vectors: {first:.4f} at the input, "
            f"{last:.4f} after {cmp.labels[-1]} (1 = same direction)."
        )
    out.print(escape(verdict.summary))
    out.print(
        "[dim]A cosine measures how alike two contextual vectors are; it is not a sense "
        "classifier.[/dim]"
    )


def print_similarities(sim, sentences: list[str], out: Console) -> None:
    n = len(sentences)
    if n == 2:
        out.print(f"A: {escape(sentences[0])}\nB: {escape(sentences[1])}")
        out.print(f"cosine similarity: {float(sim[0, 1]):.4f}")
        return
    for i, s in enumerate(sentences):
        out.print(f"[bold]{i + 1}[/bold]: {escape(s)}")
    # Columns of sentences, as many as fit the width; more are printed in further blocks.
    label = len(str(n))
    per_column = 6 + 3  # "0.1234" plus padding and rule
    fit = max(1, (out.width - table_overhead(1) - label) // per_column)
    for start in range(0, n, fit):
        cols = range(start, min(n, start + fit))
        title = "Sentence similarity (cosine)"
        if n > fit:
            title += f", sentences {cols[0] + 1}-{cols[-1] + 1}"
        table = Table(title=title, title_justify="left")
        label_column(table, "", [str(i + 1) for i in range(n)])
        for j in cols:
            table.add_column(str(j + 1), justify="right", no_wrap=True)
        for i in range(n):
            table.add_row(str(i + 1), *(f"{float(sim[i, j]):.4f}" for j in cols))
        out.print(table)
    off = sim.clone().fill_diagonal_(-2.0)
    i, j = divmod(int(off.argmax()), n)
    out.print(f"Most similar pair: {i + 1} and {j + 1} ({float(sim[i, j]):.4f}).")


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        text_a: str = typer.Argument(..., help="First sentence."),
        text_b: str = typer.Argument(..., help="Second sentence."),
        word: str = typer.Option(..., help="A word that occurs in both sentences."),
        occurrence_a: int = typer.Option(
            1, help="Which occurrence of WORD in TEXT_A, from 1 (for a repeated word)."
        ),
        occurrence_b: int = typer.Option(
            1, help="Which occurrence of WORD in TEXT_B, from 1 (for a repeated word)."
        ),
        truncate: bool = typer.Option(
            False, help="Cut texts longer than 512 tokens instead of failing."
        ),
        baseline_scale: float = typer.Option(
            1.0, help="Multiplier of the baseline's dot products (1 = plain)."
        ),
        model: str = typer.Option("all-MiniLM-L6-v2", help="Model name or model directory."),
        same_sense: Annotated[
            list[str] | None,
            typer.Option(
                help="A sentence using WORD in the same sense as TEXT_A (repeatable): "
                "control pairs instead of the built-in ones."
            ),
        ] = None,
    ) -> None:
        """How similar WORD's vectors are in two sentences, at every layer, beside controls."""
        from ..explain.models import load_model

        for name, text in (("TEXT_A", text_a), ("TEXT_B", text_b)):
            if not text.strip():
                raise ValueError(f"{name} is empty: give a sentence")
        check_baseline_scale(baseline_scale)
        for name, value in (("--occurrence-a", occurrence_a), ("--occurrence-b", occurrence_b)):
            if value < 1:
                raise UsageError(f"{name} counts from 1, got {value}")
        for i, s in enumerate(same_sense or ()):
            if not s.strip():
                raise ValueError(f"--same-sense sentence {i + 1} is empty")
        m = load_model(model)
        cmp = compare_word(
            m,
            text_a,
            text_b,
            word,
            truncate=truncate,
            baseline_scale=baseline_scale,
            occurrences=(occurrence_a, occurrence_b),
        )
        check_baseline_finite(baseline_scale, cmp.a.vectors, cmp.b.vectors)
        controls = control_cosines(
            m,
            word,
            same_sense=list(same_sense or ()),
            anchor=text_a,
            truncate=truncate,
            baseline_scale=baseline_scale,
        )
        causal = bool(getattr(m, "causal", False))
        print_comparison(cmp, text_a, text_b, console(), controls, causal=causal)

    @app.command("similarity")
    def similarity_cmd(
        sentences: Annotated[
            list[str], typer.Argument(help="Two sentences (or more, for a matrix).")
        ],
        truncate: bool = typer.Option(
            False, help="Cut texts longer than 512 tokens instead of failing."
        ),
        model: str = typer.Option("all-MiniLM-L6-v2", help="Model name or model directory."),
    ) -> None:
        """Cosine similarity of sentence embeddings (mean-pooled, normalised)."""
        from ..explain.models import load_model

        if len(sentences) < 2:
            raise ValueError(f"give at least two sentences to compare, got {len(sentences)}")
        for i, s in enumerate(sentences):
            if not s.strip():
                raise ValueError(f"sentence {i + 1} is empty")
        m = load_model(model)
        if getattr(m, "causal", False):
            raise UsageError(
                f"--model {model} is a causal language model: it has no sentence embedding, "
                "so `qkv similarity` cannot compare sentences with it (use the default "
                "all-MiniLM-L6-v2); `qkv compare` and `qkv explain` do work with it"
            )
        for i, s in enumerate(sentences):
            # A sentence of zero-width or control characters only is not blank to
            # str.strip() but holds no word for the model: its embedding would be
            # [CLS] and [SEP] alone, and its cosine meaningless.
            pieces = m.tokenizer(s, truncate=True)
            if all(w is None for w in pieces.word_ids):
                raise UsageError(f"sentence {i + 1} has no words to compare (got {s!r})")
        sim = sentence_similarities(m, sentences, truncate=truncate)
        print_similarities(sim, sentences, console())
