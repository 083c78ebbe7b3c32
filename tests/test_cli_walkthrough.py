"""``qkv walkthrough``: the printed numbers are the walkthrough's tensors (issue 2, point 10).

The command prints one table per step. The tests parse every table back into numbers
and compare them, to the 4 printed decimals, with :func:`qkv.walkthrough.walkthrough`,
so a table that shows the wrong tensor (or a stale computation) fails.
"""

from __future__ import annotations

import re

import pytest
import torch

from qkv.cli.app import main
from qkv.walkthrough import walkthrough

NUM = re.compile(r"-?\d+\.\d{4}")


def _row(line: str) -> tuple[str, list[float]] | None:
    """``label v1 v2 ...`` (box characters ignored) or None for any other line."""
    cells = line.replace("│", " ").replace("┃", " ").split()
    if len(cells) >= 2 and all(NUM.fullmatch(c) for c in cells[1:]):
        return cells[0], [float(c) for c in cells[1:]]
    return None


def _tables(text: str) -> list[tuple[list[str], torch.Tensor]]:
    """Every printed table as (row labels, values), in print order.

    Rich draws boxes on a terminal and plain spaces otherwise; rows are parsed by
    content (a label followed by numbers with 4 decimals), so both work.
    """
    tables, labels, rows = [], [], []
    for line in [*text.splitlines(), ""]:
        parsed = _row(line)
        if parsed:
            labels.append(parsed[0])
            rows.append(parsed[1])
        elif rows:  # a table just ended
            tables.append((labels, torch.tensor(rows, dtype=torch.float64)))
            labels, rows = [], []
    return tables


def _expected(w) -> list[torch.Tensor]:
    # the order in which the command prints its steps
    return [
        w.x,
        w.baseline_scores,
        w.baseline_weights,
        w.baseline_context,
        w.w_q,
        w.q,
        w.k,
        w.v,
        w.scores,
        w.weights,
        w.context,
        w.causal_weights,
        *w.head_weights,
    ]


@pytest.mark.parametrize(
    "argv,kwargs",
    [
        ([], {"text": "thinking machine"}),
        (["the cat sat down"], {"text": "the cat sat down"}),
        (
            ["a b c", "--seed", "3", "--d-model", "5", "--d-k", "2", "--d-v", "4"],
            {"text": "a b c", "seed": 3, "d_model": 5, "d_k": 2, "d_v": 4},
        ),
    ],
)
def test_printed_numbers_equal_the_tensors(argv, kwargs, capsys):
    assert main(["walkthrough", *argv]) == 0
    out = capsys.readouterr().out
    text = kwargs.pop("text")
    w = walkthrough(text, **kwargs)
    tables = _tables(out)
    expected = _expected(w)
    assert len(tables) == len(expected)
    for i, ((labels, got), want) in enumerate(zip(tables, expected, strict=True)):
        assert got.shape == want.shape, (
            f"table {i}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        )
        err = (got - want.double()).abs().max().item()
        assert err <= 5.1e-5, f"table {i}: printed values differ from the tensor by {err}"
        if want.shape[0] == len(w.tokens):
            assert labels == w.tokens
    # the baseline weights really are row softmaxes (the parsed rows sum to 1)
    baseline = tables[2][1]
    assert (baseline.sum(-1) - 1).abs().max().item() < 5e-4
    assert f"{len(w.tokens)} tokens" in out


def test_thinking_machine_baseline_values(capsys):
    """Spot-check two printed values against the baseline's formula computed here."""
    main(["walkthrough"])
    out = capsys.readouterr().out
    w = walkthrough()
    x = w.x
    weights = torch.softmax(x @ x.T, dim=-1)  # (L, L), unscaled: the untrained baseline
    printed = _tables(out)[2][1]
    assert printed[0, 0].item() == pytest.approx(weights[0, 0].item(), abs=5e-5)
    assert printed[1, 0].item() == pytest.approx(weights[1, 0].item(), abs=5e-5)
    assert "thinking" in out and "machine" in out


def test_walkthrough_is_seeded():
    a, b = walkthrough(seed=1), walkthrough(seed=1)
    assert torch.equal(a.context, b.context) and torch.equal(a.x, b.x)
    assert not torch.equal(walkthrough(seed=2).x, a.x)


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "walkthrough" in out and "Usage" in out
    assert main(["walkthrough", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "TEXT" in out


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_a_one_line_error(text, capsys):
    assert main(["walkthrough", text]) == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1, captured.err
    assert err_lines[0].startswith("qkv: error:") and "empty" in err_lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_odd_d_k_is_a_one_line_error(capsys):
    assert main(["walkthrough", "--d-k", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error:") and "d_k" in err and len(err.strip().splitlines()) == 1


def test_unknown_option_is_a_usage_error(capsys):
    code = main(["walkthrough", "--nope"])
    assert code == 2
    captured = capsys.readouterr()
    assert "qkv: error:" in captured.err and "--nope" in captured.err
    assert "Traceback" not in captured.err


def test_table_parser_reads_boxed_and_plain_rows():
    """The parser above must work whichever way rich draws (terminal or not)."""
    assert _row("│ thinking │ 1.5410 │ -0.2934 │") == ("thinking", [1.5410, -0.2934])
    assert _row("  machine    0.4033    0.8380  ") == ("machine", [0.4033, 0.8380])
    assert _row("             thinking   machine  ") is None
    assert _row("      0         1  ") is None
