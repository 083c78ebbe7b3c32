"""``qkv walkthrough [TEXT]``: print each step of self-attention with shapes and numbers.

The words come from the user, so they are printed as plain :class:`~rich.text.Text`
(or escaped): a word like ``[/x]`` or ``:smile:`` is shown as typed, never read as
rich markup or an emoji code.
"""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from torch import Tensor

from ..walkthrough import walkthrough


def _matrix(title: str, m: Tensor, rows: list[str], cols: list[str] | None = None) -> Group:
    shape = "×".join(str(s) for s in m.shape)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    cols = cols or [str(j) for j in range(m.shape[1])]
    table.add_column("")
    for c in cols:
        table.add_column(Text(c), justify="right")
    for name, row in zip(rows, m.tolist(), strict=True):
        table.add_row(Text(name), *(f"{val:.4f}" for val in row))
    return Group(Text.from_markup(f"[bold cyan]{title}[/]  [dim]({shape})[/dim]"), table)


def run(text: str, seed: int, d_model: int, d_k: int, d_v: int, console: Console) -> None:
    w = walkthrough(text, seed=seed, d_model=d_model, d_k=d_k, d_v=d_v)
    t = w.tokens
    say = console.print
    say(
        f"[bold]Input:[/bold] {len(t)} tokens {escape(str(t))}, embeddings of width d_model={d_model} (seed {seed})"
    )
    say(_matrix("Step 1 · input embeddings x", w.x, t))
    say(
        "\n[bold]Part A · the untrained baseline[/bold]: every token is its own query, key and value."
    )
    say(_matrix("Step 2 · scores x·xᵀ (dot products)", w.baseline_scores, t, t))
    say(_matrix("Step 3 · weights = softmax of each row", w.baseline_weights, t, t))
    say(_matrix("Step 4 · context = weights · x", w.baseline_context, t))
    say("\n[bold]Part B · trainable projections[/bold] (random here; training would tune them).")
    say(_matrix("Step 5 · W_Q (d_model × d_k)", w.w_q, [f"in{i}" for i in range(d_model)]))
    say(_matrix("Step 6 · queries q = x·W_Q: what each token looks for", w.q, t))
    say(_matrix("Step 7 · keys k = x·W_K: how each token can be found", w.k, t))
    say(_matrix("Step 8 · values v = x·W_V: what each token passes on", w.v, t))
    say(_matrix(f"Step 9 · scaled scores q·kᵀ / √{d_k}", w.scores, t, t))
    say(_matrix("Step 10 · weights = softmax of each row", w.weights, t, t))
    say(_matrix("Step 11 · context = weights · v", w.context, t))
    say(_matrix("Step 12 · causal weights (no looking ahead)", w.causal_weights, t, t))
    for h in range(w.head_weights.shape[0]):
        say(
            _matrix(
                f"Step 13 · head {h} weights (d_k/2 = {d_k // 2} wide)", w.head_weights[h], t, t
            )
        )


def register(app: typer.Typer) -> None:
    @app.command("walkthrough")
    def walkthrough_cmd(
        text: str = typer.Argument("thinking machine", help="A few words to attend over."),
        seed: int = typer.Option(0, help="Seed for embeddings and projections."),
        d_model: int = typer.Option(6, help="Embedding width."),
        d_k: int = typer.Option(4, help="Query/key width (even: it is split into two heads)."),
        d_v: int = typer.Option(3, help="Value width."),
    ) -> None:
        """Print each step of self-attention, baseline then projections, for TEXT."""
        run(text, seed, d_model, d_k, d_v, Console(width=120, emoji=False))
