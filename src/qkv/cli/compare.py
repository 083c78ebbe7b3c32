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
from .explain import bar, check_baseline_finite, check_baseline_scale, console


def _piece_note(label: str, cmp_side) -> str:
    f = cmp_side.focus
    note = (
        f"tokens {f.positions[0]}-{f.positions[-1]}" if len(f.positions) > 1 else f"token {f.first}"
    )
    if f.occurrences > 1:
        note += f", first of {f.occurrences}"
    return f"{label}: {note}"


def _range_cell(t, stage: int) -> str:
    return f"{float(t[:, stage].min()):.2f}-{float(t[:, stage].max()):.2f}" if t.shape[0] else ""


def print_comparison(
    cmp: WordComparison,
    text_a: str,
    text_b: str,
    out: Console,
    controls: ControlCosines | None = None,
) -> None:
    word = escape(repr(cmp.a.focus.word))
    out.print(f"A: {escape(text_a)}\nB: {escape(text_b)}")
    out.print(f"[dim]{_piece_note('A', cmp.a)}; {_piece_note('B', cmp.b)}[/dim]")
    table = Table(title=f"Cosine similarity of {word} in A and B", title_justify="left")
    table.add_column("stage")
    table.add_column("cosine", justify="right")
    table.add_column("", no_wrap=True)
    show_same = controls is not None and controls.same.shape[0] > 0
    show_diff = controls is not None and controls.different.shape[0] > 0
    if show_same:
        table.add_column("same-sense", justify="right")
    if show_diff:
        table.add_column("other-sense", justify="right")
    for i, (label, c) in enumerate(zip(cmp.labels, cmp.cosines.tolist(), strict=True)):
        extra = []
        if show_same:
            extra.append(_range_cell(controls.same, i))
        if show_diff:
            extra.append(_range_cell(controls.different, i))
        table.add_row(label, f"{c:.4f}", bar(c, 20), *extra)
    out.print(table)
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
    table = Table(title="Sentence similarity (cosine)", title_justify="left")
    table.add_column("")
    for j in range(n):
        table.add_column(str(j + 1), justify="right")
    for i in range(n):
        table.add_row(str(i + 1), *(f"{float(sim[i, j]):.4f}" for j in range(n)))
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
        from .. import pretrained

        for name, text in (("TEXT_A", text_a), ("TEXT_B", text_b)):
            if not text.strip():
                raise ValueError(f"{name} is empty: give a sentence")
        check_baseline_scale(baseline_scale)
        for i, s in enumerate(same_sense or ()):
            if not s.strip():
                raise ValueError(f"--same-sense sentence {i + 1} is empty")
        m = pretrained.load(model)
        cmp = compare_word(
            m, text_a, text_b, word, truncate=truncate, baseline_scale=baseline_scale
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
        print_comparison(cmp, text_a, text_b, console(), controls)

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
        from .. import pretrained

        if len(sentences) < 2:
            raise ValueError(f"give at least two sentences to compare, got {len(sentences)}")
        for i, s in enumerate(sentences):
            if not s.strip():
                raise ValueError(f"sentence {i + 1} is empty")
        m = pretrained.load(model)
        for i, s in enumerate(sentences):
            # A sentence of zero-width or control characters only is not blank to
            # str.strip() but holds no word for the model: its embedding would be
            # [CLS] and [SEP] alone, and its cosine meaningless.
            pieces = m.tokenizer(s, truncate=True)
            if all(w is None for w in pieces.word_ids):
                raise UsageError(f"sentence {i + 1} has no words to compare (got {s!r})")
        sim = sentence_similarities(m, sentences, truncate=truncate)
        print_similarities(sim, sentences, console())
