"""``qkv walkthrough [TEXT]``: print each step of self-attention with shapes and numbers.

The words come from the user, so they are printed as plain :class:`~rich.text.Text`
(or escaped): a word like ``[/x]`` or ``:smile:`` is shown as typed, never read as
rich markup or an emoji code.

Tables are cut into blocks of columns when they would not fit the terminal (80
columns when the output is not a terminal), so a long sentence still prints one
number per cell.
"""

from __future__ import annotations

import typer

DEFAULTS = {"seed": 0, "d_model": 4, "d_k": 2, "d_v": 3}

_HEADER_MAX = 10  # longest column header; longer words are cut with "…"
_LABEL_MAX = 16  # longest row label


def _cut(word: str, most: int) -> str:
    return word if len(word) <= most else word[: most - 1] + "…"


def _table(rows: list[str], cols: list[str], cells: list[list[str]], lo: int, hi: int):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("", no_wrap=True)
    for c in cols[lo:hi]:
        table.add_column(Text(c), justify="right", no_wrap=True)
    for name, row in zip(rows, cells, strict=True):
        table.add_row(Text(name), *row[lo:hi])
    return table


def _matrix(title: str, m, rows: list[str], cols: list[str] | None, console) -> list:
    """The title and one or more tables (blocks of columns) that fit the console's width."""
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.text import Text

    shape = "×".join(str(s) for s in m.shape)
    cells = [[f"{val:.4f}" for val in row] for row in m.tolist()]
    cols = [_cut(c, _HEADER_MAX) for c in (cols or [str(j + 1) for j in range(m.shape[1])])]
    rows = [_cut(r, _LABEL_MAX) for r in rows]

    def fits(lo: int, hi: int) -> bool:
        table = _table(rows, cols, cells, lo, hi)
        wide = console.options.update(max_width=10_000)  # measure unclamped
        return Measurement.get(console, wide, table).maximum <= console.width

    blocks, lo = [], 0
    while lo < len(cols):
        hi = lo + 1  # at least one column per block, even on a very narrow terminal
        while hi < len(cols) and fits(lo, hi + 1):
            hi += 1
        blocks.append((lo, hi))
        lo = hi
    out: list = [Text.from_markup(f"[bold cyan]{escape(title)}[/]  [dim]({shape})[/dim]")]
    for lo, hi in blocks:
        if len(blocks) > 1:
            out.append(Text(f"columns {lo + 1}-{hi} of {len(cols)}", style="dim"))
        out.append(_table(rows, cols, cells, lo, hi))
    return out


def _embedding_note(tokens: list[str], d_model: int) -> str:
    from ..walkthrough import GUIDE_EMBEDDINGS

    note = (
        f"Embeddings (width d_model={d_model}) are looked up by word, so a word has the "
        "same vector in every sentence."
    )
    guide = [tok for tok in GUIDE_EMBEDDINGS if tok in tokens] if d_model == 4 else []
    if guide:
        note += f" {' and '.join(map(repr, guide))}: the hand-written vectors of docs/guide.md."
    if any(tok not in guide for tok in tokens):
        note += " Other words: seeded random numbers from a hash of the word."
    return note


def run(text: str, seed: int, d_model: int, d_k: int, d_v: int, console) -> None:
    from rich.markup import escape

    from ..walkthrough import NUM_HEADS, walkthrough

    w = walkthrough(text, seed=seed, d_model=d_model, d_k=d_k, d_v=d_v)
    t = w.tokens
    step = 0

    def show(title: str, m, rows: list[str], cols: list[str] | None = None) -> None:
        nonlocal step
        step += 1
        for part in _matrix(f"Step {step} · {title}", m, rows, cols, console):
            console.print(part)

    say = console.print
    say(f"[bold]Input:[/bold] {len(t)} tokens {escape(str(t))}")
    say(_embedding_note(t, d_model), markup=False)
    show("input embeddings x", w.x, t)
    for tok, pos in w.repeated().items():
        say(
            f"[yellow]{escape(repr(tok))} occurs {len(pos)} times (tokens "
            f"{', '.join(map(str, pos))}): identical embeddings, and since nothing here "
            "encodes position, identical rows at every step below, output included, except "
            "the causal step (a causal mask is itself position information). "
            "Real models add position information to tell them apart.[/yellow]"
        )

    say(
        "\n[bold]Part A · the untrained baseline[/bold]: every token is its own query, key and value."
    )
    show("scores x·xᵀ (dot products)", w.baseline_scores, t, t)
    show("weights = softmax of each row", w.baseline_weights, t, t)
    show("context = weights · x", w.baseline_context, t)

    say(
        f"\n[bold]Part B · one head with projections[/bold] (random, seed {seed}; training tunes them)."
    )
    show("W_Q (d_model × d_k)", w.w_q, [f"in{i + 1}" for i in range(d_model)])
    show("queries q = x·W_Q: what each token looks for", w.q, t)
    show("keys k = x·W_K: how each token can be found", w.k, t)
    show("values v = x·W_V: what each token passes on", w.v, t)
    show(f"scaled scores q·kᵀ / √{d_k}", w.scores, t, t)
    show("weights = softmax of each row", w.weights, t, t)
    show("context = weights · v", w.context, t)
    show("causal weights (no looking ahead)", w.causal_weights, t, t)

    dh = d_model // NUM_HEADS
    say(
        f"\n[bold]Part C · {NUM_HEADS} heads[/bold]: MultiHeadAttention(d_model={d_model}, "
        f"num_heads={NUM_HEADS}) projects x to queries, keys and values of width d_model "
        f"and gives head h its own {dh} columns of each (heads numbered from 1)."
    )
    for h in range(NUM_HEADS):
        cols = f"columns {h * dh + 1}-{(h + 1) * dh}" if dh > 1 else f"column {h + 1}"
        show(f"head {h + 1} weights (q, k, v {cols})", w.head_weights[h], t, t)
        show(f"head {h + 1} context = weights · v", w.head_context[h], t)
    show("concatenation [head 1 | head 2]", w.concat, t)
    show(
        "W_O, the output projection (d_model × d_model)",
        w.w_o,
        [f"in{i + 1}" for i in range(d_model)],
    )
    show("output = concatenation · W_O", w.output, t)


def register(app: typer.Typer) -> None:
    @app.command("walkthrough")
    def walkthrough_cmd(
        text: str = typer.Argument("thinking machine", help="A few words to attend over."),
        seed: int = typer.Option(DEFAULTS["seed"], help="Seed for embeddings and projections."),
        d_model: int = typer.Option(DEFAULTS["d_model"], help="Embedding width (even: 2 heads)."),
        d_k: int = typer.Option(DEFAULTS["d_k"], help="Query/key width of the single head."),
        d_v: int = typer.Option(DEFAULTS["d_v"], help="Value width of the single head."),
    ) -> None:
        """Print each step of self-attention, baseline to multi-head output, for TEXT."""
        from rich.console import Console

        run(text, seed, d_model, d_k, d_v, Console(emoji=False, highlight=False))
