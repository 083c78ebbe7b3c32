"""The results of ``qkv experiment`` as a terminal table that fits the width it is given.

``results.md`` keeps the full markdown table (mean ± std [min, max] per variant, about
135 columns); the terminal gets the same numbers in a rich table whose optional parts
go first when the width is short: the ``[min, max]`` range, then the steps column.
Row labels (the task names) are never cut (see :mod:`qkv.cli.tables`).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .tables import label_column, table_overhead

__all__ = ["print_results"]


def _cell(stats: dict, layout: str) -> str:
    mean, std = f"{stats['mean']:.3f}", f"{stats['std']:.3f}"
    if layout == "narrow":  # the spread on a second line keeps the column 9 wide
        return f"{mean}\n± {std}"
    text = f"{mean} ± {std}"
    return f"{text}\n[{stats['min']:.3f}, {stats['max']:.3f}]" if layout == "wide" else text


def _layout(width: int, tasks: list[str], n_variants: int) -> str:
    """``"wide"`` (steps and [min, max] too), ``"medium"`` (mean ± std on one line) or
    ``"narrow"`` (mean over ± std), the widest that fits ``width`` columns."""
    label = max(len("task"), *(len(t) for t in tasks))
    fixed = table_overhead(3 + n_variants) + label + len("bits/char") + len("+0.000")
    if width >= fixed + 15 * n_variants + table_overhead(1) + len("steps"):
        return "wide"
    if width >= fixed + 13 * n_variants:
        return "medium"
    return "narrow"


def print_results(summary: dict, out: Console) -> None:
    """Print the experiment's summary table (``summary`` as ``run_experiment`` returns it)."""
    variants = summary["variants"]
    tasks = list(summary["table"])
    layout = _layout(out.width, tasks, len(variants))
    table = Table(
        title="Test metric per task: mean ± std over seeds"
        + (" [min, max]" if layout == "wide" else ""),
        title_justify="left",
    )
    label_column(table, "task", tasks)
    if layout == "wide":
        table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("metric", overflow="fold")
    for v in variants:
        table.add_column(v, justify="right", overflow="fold")
    table.add_column("gain", justify="right", no_wrap=True)
    for task, row in summary["table"].items():
        metric = "answer acc" if summary["metric"][task] == "seq_acc" else "bits/char"
        if layout == "narrow":
            metric = "acc" if metric == "answer acc" else metric
        gain = summary["gains"][task]["trainable-fixed"]
        table.add_row(
            task,
            *([str(summary["steps"][task])] if layout == "wide" else []),
            metric,
            *(_cell(row[v], layout) for v in variants),
            f"{gain:+.3f}",
        )
    out.print(table)
    out.print(
        "answer acc (acc) = whole answer right under greedy decoding (higher is better); "
        "bits/char for charlm (lower is better); gain = trainable - fixed, in the "
        "better direction. The full table is in results.md.",
        markup=False,
    )
