"""``qkv compare`` says what its cosines show, beside control pairs (issue 12, point 6).

The verdict logic is checked on made-up cosines (every outcome, no model needed); the
command is checked on the real model: identical texts are reported as identical, the
control columns hold the cosines of the built-in sentences (computed here from the
model's hidden states, not with qkv.explain), and the printed verdict is the one the
numbers call for.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from qkv.cli.app import main
from qkv.explain import (
    CONTROL_SENTENCES,
    ControlCosines,
    Focus,
    WordComparison,
    WordVectors,
    judge_comparison,
)
from support import table_cells as _cells

LABELS = ("input", "baseline", "layer 1")
RIVER = "The bank of the river was muddy after the storm"
MONEY = "I deposited the money at the bank before lunch"


def _comparison(last_cosine: float, identical: bool = False) -> WordComparison:
    """A comparison whose last stage has the given cosine (vectors made to fit)."""
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    angle = torch.acos(torch.tensor(last_cosine, dtype=torch.float64))
    b = a.clone()
    if not identical:
        b[-1] = torch.stack([torch.cos(angle), torch.sin(angle)])
    cos = F.cosine_similarity(a, b, dim=-1)
    focus = Focus("bank", (2,))
    return WordComparison(WordVectors(focus, LABELS, a), WordVectors(focus, LABELS, b), cos)


def _controls(same: list[float], different: list[float]) -> ControlCosines:
    def stages(values: list[float]) -> torch.Tensor:
        t = torch.ones(len(values), len(LABELS), dtype=torch.float64)
        t[:, -1] = torch.tensor(values, dtype=torch.float64)
        return t

    return ControlCosines("bank", "built-in", LABELS, stages(same), stages(different))


@pytest.mark.parametrize(
    ("cosine", "same", "different", "kind"),
    [
        (0.85, [0.80, 0.90], [0.68, 0.77], "like-same"),
        (0.75, [0.80, 0.90], [0.68, 0.77], "like-different"),
        (0.785, [0.80, 0.90], [0.68, 0.77], "between"),
        (0.80, [0.77, 0.94], [0.77, 0.93], "overlap"),
        (0.95, [0.80, 0.90], [0.68, 0.77], "above-all"),
        (0.50, [0.80, 0.90], [0.68, 0.77], "below-all"),
        (0.70, [0.80, 0.90], [], "below-same"),
        (0.85, [0.80, 0.90], [], "like-same"),
    ],
)
def test_verdict_places_the_cosine_among_the_controls(cosine, same, different, kind):
    verdict = judge_comparison(_comparison(cosine), _controls(same, different))
    assert verdict.kind == kind, verdict.summary
    assert verdict.cosine == pytest.approx(cosine)
    assert verdict.same_range == (min(same), max(same))
    assert verdict.different_range == ((min(different), max(different)) if different else None)
    assert f"{cosine:.4f}" in verdict.summary


def test_identical_vectors_need_no_controls():
    verdict = judge_comparison(_comparison(1.0, identical=True), _controls([0.8, 0.9], [0.7]))
    assert verdict.kind == "identical" and "Identical inputs" in verdict.summary
    assert judge_comparison(_comparison(0.99), None).kind == "no-controls"


def _bank_vector(model, text: str, layer: int) -> torch.Tensor:
    run = model.run(text)
    pos = run.texts[0].tokens.index("bank")
    return run.layers[layer - 1].hidden[0, pos].double()


@pytest.fixture(scope="module")
def model():
    from qkv.pretrained import load

    return load("all-MiniLM-L6-v2")


def test_river_and_money_bank_beside_the_built_in_controls(capsys, model):
    assert main(["compare", RIVER, MONEY, "--word", "bank"]) == 0
    out = capsys.readouterr().out
    assert "drift apart" not in out and "move closer" not in out
    # The control columns of layer 6, recomputed from the model's hidden states.
    money, river = CONTROL_SENTENCES["bank"]
    vec = {s: _bank_vector(model, s, 6) for s in money + river}

    def cos(s: str, t: str) -> float:
        return F.cosine_similarity(vec[s], vec[t], dim=0).item()

    same = [cos(s, t) for grp in (money, river) for s, t in itertools.combinations(grp, 2)]
    diff = [cos(s, t) for s in money for t in river]
    cells = _cells(out, "layer 6")
    assert cells[3] == f"{min(same):.2f}-{max(same):.2f}"
    assert cells[4] == f"{min(diff):.2f}-{max(diff):.2f}"
    c = F.cosine_similarity(_bank_vector(model, RIVER, 6), _bank_vector(model, MONEY, 6), dim=0)
    assert float(cells[1]) == pytest.approx(c.item(), abs=6e-5)
    text = " ".join(out.split())
    # The verdict follows from those numbers, and says what kind of number it is.
    if c < min(same) and min(diff) <= c <= max(diff):
        assert "less similar than every same-sense control pair" in text
    elif min(same) <= c <= max(same):
        assert "as similar as the same-sense" in text or "overlap" in text
    else:
        assert "control pair" in text
    assert "not a sense classifier" in text
    assert "12 same-sense pairs and 16 pairs across two senses" in text


def test_identical_texts_report_identity(capsys):
    assert main(["compare", MONEY, MONEY, "--word", "bank"]) == 0
    out = capsys.readouterr().out
    for stage in ("input", "baseline", *(f"layer {n}" for n in range(1, 7))):
        assert _cells(out, stage)[1] == "1.0000"
    assert "Identical inputs" in out
    assert "move closer" not in out and "drift apart" not in out


def test_word_without_controls_says_what_the_numbers_cannot_show(capsys):
    assert main(["compare", "the cat sat on the mat", "a cat ran off", "--word", "cat"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "No control pairs for 'cat'" in text and "--same-sense" in text
    assert re.search(r"0\.\d{4} after layer 6", text)


def test_given_same_sense_sentences_are_the_controls(capsys, model):
    given = ["my cat purrs", "the cat slept on the sofa"]
    argv = ["compare", "the cat sat", "a cat ran off", "--word", "cat"]
    assert main([*argv, "--same-sense", given[0], "--same-sense", given[1]]) == 0
    out = capsys.readouterr().out
    texts = ["the cat sat", *given]

    def vec(text: str) -> torch.Tensor:
        run = model.run(text)
        return run.layers[-1].hidden[0, run.texts[0].tokens.index("cat")].double()

    vs = [vec(t) for t in texts]
    same = [F.cosine_similarity(u, v, dim=0).item() for u, v in itertools.combinations(vs, 2)]
    assert _cells(out, "layer 6")[3] == f"{min(same):.2f}-{max(same):.2f}"
    assert "3 same-sense pairs" in " ".join(out.split())


def test_empty_same_sense_sentence_is_a_one_line_error(capsys):
    code = main(["compare", RIVER, MONEY, "--word", "bank", "--same-sense", " "])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qkv: error:") and "--same-sense" in err
