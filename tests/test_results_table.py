"""``qkv experiment`` prints its results as a table that fits the terminal (issue: every
table readable at 80 columns; the markdown table in results.md is ~135 wide)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from qkv.cli.results_table import print_results

SUMMARY = json.loads(
    (Path(__file__).parents[1] / "experiments" / "results" / "results.json").read_text()
)


def _render(width: int) -> str:
    out = Console(width=width, color_system=None)
    with out.capture() as cap:
        print_results(SUMMARY, out)
    return cap.get()


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_results_fit_the_width_with_every_task_and_number(width):
    text = _render(width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text  # nothing cut short
    for task, row in SUMMARY["table"].items():
        line = next(x for x in lines if x.startswith(f"│ {task} "))
        for variant in SUMMARY["variants"]:
            assert f"{row[variant]['mean']:.3f}" in line  # the means stay on the task's row
        assert f"{SUMMARY['gains'][task]['trainable-fixed']:+.3f}" in line
    if width >= 100:  # wide enough for the [min, max] ranges and the steps
        recall = SUMMARY["table"]["recall"]["fixed"]
        assert f"[{recall['min']:.3f}, {recall['max']:.3f}]" in text and "steps" in text


def test_bench_progress_lines_wrap_to_the_width(capsys, monkeypatch):
    from qkv.bench.pipeline import print_wrapped

    line = ", ".join(f"qkv:impl{i} {i}.123 ms" for i in range(30))  # ~500 characters
    for width in (80, 120):
        monkeypatch.setenv("COLUMNS", str(width))
        print_wrapped(line)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) > 1 and max(len(x) for x in lines) <= width
        assert " ".join(x.strip() for x in lines) == line  # nothing lost or cut mid-word
