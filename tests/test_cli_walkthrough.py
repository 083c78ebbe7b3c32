"""``qkv walkthrough``: the printed numbers are the walkthrough's tensors (issue 2, point 10),
and they agree with the guide (issue 12, point 2).

The command prints one table per step (cut into blocks of columns on a narrow
terminal). The tests parse every table back into numbers and compare them, to the 4
printed decimals, with :func:`qkv.walkthrough.walkthrough`, with the numbers that
``docs/guide.md`` shows, and with ``qkv.MultiHeadAttention`` itself.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch

import qkv
from qkv.cli.app import main
from qkv.walkthrough import embed, walkthrough

NUM = re.compile(r"-?\d+\.\d{4}")
BLOCK = re.compile(r"\s*columns (\d+)-(\d+) of (\d+)\s*")
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def _row(line: str) -> tuple[str, list[float]] | None:
    """``label v1 v2 ...`` (box characters ignored) or None for any other line."""
    cells = line.replace("│", " ").replace("┃", " ").split()
    if len(cells) >= 2 and all(NUM.fullmatch(c) for c in cells[1:]):
        return cells[0], [float(c) for c in cells[1:]]
    return None


def _tables(text: str) -> list[tuple[list[str], torch.Tensor]]:
    """Every printed table as (row labels, values), in print order.

    Rich draws boxes on a terminal and plain spaces otherwise; rows are parsed by
    content (a label followed by numbers with 4 decimals), so both work. A block
    announced by ``columns i-j of n`` with i > 1 continues the table before it.
    """
    tables: list[tuple[list[str], torch.Tensor]] = []
    labels, rows, continues, pending = [], [], False, False
    for line in [*text.splitlines(), ""]:
        parsed = _row(line)
        if parsed:
            if not rows:  # a table starts
                continues, pending = pending, False
            labels.append(parsed[0])
            rows.append(parsed[1])
            continue
        if rows:  # a table just ended
            values = torch.tensor(rows, dtype=torch.float64)
            if continues:
                prev_labels, prev = tables.pop()
                assert prev_labels == labels, "a column block with other rows"
                values = torch.cat([prev, values], dim=1)
            tables.append((labels, values))
            labels, rows = [], []
        block = BLOCK.fullmatch(line)
        if block:
            pending = int(block.group(1)) > 1
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
        w.head_weights[0],
        w.head_context[0],
        w.head_weights[1],
        w.head_context[1],
        w.concat,
        w.w_o,
        w.output,
    ]


WEIGHT_TABLES = (4, 17)  # W_Q and W_O: rows are input features, not tokens
CAUSAL_TABLE = 11


def _run(capsys, *argv: str) -> str:
    assert main(["walkthrough", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,kwargs",
    [
        ([], {"text": "thinking machine"}),
        (["the cat sat down"], {"text": "the cat sat down"}),
        (
            ["a b c", "--seed", "3", "--d-model", "6", "--d-k", "3", "--d-v", "4"],
            {"text": "a b c", "seed": 3, "d_model": 6, "d_k": 3, "d_v": 4},
        ),
    ],
)
def test_printed_numbers_equal_the_tensors(argv, kwargs, capsys):
    out = _run(capsys, *argv)
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
        if i in WEIGHT_TABLES:
            assert labels == [f"in{j + 1}" for j in range(want.shape[0])]
        else:
            assert labels == w.tokens
    # the baseline weights really are row softmaxes (the parsed rows sum to 1)
    baseline = tables[2][1]
    assert (baseline.sum(-1) - 1).abs().max().item() < 5e-4
    assert f"{len(w.tokens)} tokens" in out


def _guide_tensor(needle: str, *, literal: bool = False) -> torch.Tensor:
    """The numbers that the one doctest example of docs/guide.md holding ``needle`` shows
    (with ``literal``: the numbers written in its source)."""
    examples = doctest.DocTestParser().get_examples(GUIDE.read_text())
    exact = needle.endswith("\n")  # the whole source line, e.g. "scores\n"
    hits = [e for e in examples if (e.source == needle if exact else needle in e.source)]
    assert len(hits) == 1, f"{len(hits)} examples hold {needle!r} in the guide"
    if literal:
        text = "".join(line.split("#")[0] for line in hits[0].source.splitlines())
    else:
        text = hits[0].want
    rows = re.findall(r"\[([^\[\]]+)\]", text)
    return torch.tensor([[float(v) for v in r.split(",")] for r in rows], dtype=torch.float64)


def test_thinking_machine_prints_the_guides_numbers(capsys):
    """The guide says the walkthrough of "thinking machine" prints its first steps."""
    tables = [values for _, values in _tables(_run(capsys, "thinking machine"))]
    guide = {
        "x (step 1)": (_guide_tensor("x = torch.tensor(", literal=True), tables[0]),
        "scores (step 2)": (_guide_tensor("scores\n"), tables[1]),
        "weights (step 3)": (_guide_tensor("row i = where token i looks"), tables[2]),
        "context (step 4)": (
            _guide_tensor("context                                    #"),
            tables[3],
        ),
        "random head (step 10)": (_guide_tensor("random projections"), tables[9]),
    }
    assert guide["x (step 1)"][0].shape == (2, 4)
    assert guide["weights (step 3)"][0][0].tolist() == [0.7311, 0.2689]
    for name, (in_guide, printed) in guide.items():
        assert printed.shape == in_guide.shape, name
        assert torch.allclose(printed, in_guide, atol=1e-4), (name, printed, in_guide)


def test_embedding_is_a_function_of_the_word_alone(capsys):
    short = walkthrough("the cat")
    long = walkthrough("the cat sat on the mat because it was tired")
    assert torch.equal(short.x[0], long.x[0]) and torch.equal(long.x[0], long.x[4])
    assert torch.equal(short.x[1], long.x[1])  # "cat" unchanged by a longer sentence
    assert not torch.equal(long.x[1], long.x[2])  # different words differ
    assert torch.equal(embed(["the"])[0], long.x[0])


def test_identical_tokens_get_identical_outputs_and_are_told_so(capsys):
    text = "the cat sat on the mat"
    out = _run(capsys, text)
    w = walkthrough(text)
    for name in ("x", "baseline_context", "context", "concat", "output"):
        t = getattr(w, name)
        assert torch.equal(t[0], t[4]), name
    assert not torch.equal(w.output[0], w.output[1])
    for i, (_, values) in enumerate(_tables(out)):
        if i == CAUSAL_TABLE:  # the mask tells positions apart: token 1 sees only itself
            assert not torch.equal(values[0], values[4])
        elif i not in WEIGHT_TABLES:
            assert torch.equal(values[0], values[4]), i
    note = " ".join(out.split())
    assert "'the' occurs 2 times (tokens 1, 5)" in note and "position" in note
    assert "except the causal step" in note
    assert "occurs" not in _run(capsys, "thinking machine")


def test_steps_are_numbered_once_in_order_and_heads_from_1(capsys):
    out = _run(capsys, "the cat sat")
    steps = [int(n) for n in re.findall(r"^Step (\d+) ·", out, flags=re.M)]
    assert steps == list(range(1, len(_expected(walkthrough("the cat sat"))) + 1))
    assert "head 0" not in out
    assert "head 1 weights" in out and "head 2 weights" in out
    assert "concatenation" in out and "W_O" in out


def test_heads_concat_and_w_o_are_what_multihead_attention_computes():
    w = walkthrough("the cat sat on the mat", seed=4, d_model=6)
    mha = qkv.MultiHeadAttention(6, 2, bias=False).double()
    with torch.no_grad():
        mha.q_proj.weight.copy_(w.mh_w_q.T)
        mha.k_proj.weight.copy_(w.mh_w_k.T)
        mha.v_proj.weight.copy_(w.mh_w_v.T)
        mha.out_proj.weight.copy_(w.w_o.T)
        res = mha(w.x[None], need_weights=True, average_weights=False)
    assert torch.allclose(res.output[0], w.output, atol=1e-12)
    assert torch.allclose(res.weights[0], w.head_weights, atol=1e-12)
    assert torch.equal(w.concat[:, :3], w.head_context[0])
    assert torch.equal(w.concat[:, 3:], w.head_context[1])


@pytest.mark.parametrize(
    "text",
    ["thinking machine", "the cat sat on the mat because it was tired", "a b c d e f g h i j k l"],
)
def test_output_fits_80_columns(text, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = _run(capsys, text)
    assert max(len(line) for line in out.splitlines()) <= 80
    w = walkthrough(text)
    assert len(_tables(out)) == len(_expected(w))  # blocks of columns are joined back


def test_walkthrough_is_seeded_and_leaves_the_global_generator_alone():
    a, b = walkthrough("cat dog", seed=1), walkthrough("cat dog", seed=1)
    assert torch.equal(a.output, b.output) and torch.equal(a.x, b.x)
    assert not torch.equal(walkthrough("cat dog", seed=2).x, a.x)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    walkthrough("cat dog")
    assert torch.equal(torch.rand(3), expected)


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


@pytest.mark.parametrize(
    "argv,name",
    [(["--d-model", "5"], "d_model"), (["--d-k", "0"], "d_k"), (["--d-v", "-1"], "d_v")],
)
def test_bad_width_is_a_one_line_error(argv, name, capsys):
    assert main(["walkthrough", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error:") and name in err and len(err.strip().splitlines()) == 1


def test_embed_rejects_a_bare_string():
    with pytest.raises(TypeError, match="tokens"):
        embed("the cat")


def test_unknown_option_is_a_usage_error(capsys):
    code = main(["walkthrough", "--nope"])
    assert code == 2
    captured = capsys.readouterr()
    assert "qkv: error:" in captured.err and "--nope" in captured.err
    assert "Traceback" not in captured.err


def test_table_parser_reads_boxed_plain_and_split_tables():
    """The parser above must work whichever way rich draws (terminal or not)."""
    assert _row("│ thinking │ 1.5410 │ -0.2934 │") == ("thinking", [1.5410, -0.2934])
    assert _row("  machine    0.4033    0.8380  ") == ("machine", [0.4033, 0.8380])
    assert _row("             thinking   machine  ") is None
    assert _row("      0         1  ") is None
    split = "columns 1-1 of 2\n a 1.0000\n b 3.0000\n\ncolumns 2-2 of 2\n a 2.0000\n b 4.0000\n"
    (labels, values), *rest = _tables(split)
    assert not rest and labels == ["a", "b"]
    assert values.tolist() == [[1.0, 2.0], [3.0, 4.0]]
