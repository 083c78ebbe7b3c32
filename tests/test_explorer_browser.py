"""The explorer in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One browser for the whole module; each test opens its own page in it:

* a real sentence written by ``qkv explain --layer 3 --head 5``: the page opens there,
  and the weights it shows (each token row's ``data-weight``) are the model's, in both
  directions, after clicks on thumbnails, head buttons and tokens;
* a word split into pieces: the page's first row is the CLI's averaged row;
* 1,000 synthetic tokens at 800 px: no horizontal scroll, every head clickable, the
  keyboard moves the selection and the selected token stays in view; the file's size;
* a causal model with 30 layers x 9 heads: masked keys, "looks back" wording, the
  heads grid wraps with every thumbnail clickable;
* the notebook fragment, twice in one page: head toggles and direction work in each.

A text holding ``<!--<script>`` and ``</script>`` must not break the page: the JSON
embedded in its ``<script>`` block is checked here without a browser (no ``<``,
``>`` or ``&`` left in it, and it parses back to the data), and in the browser.
Skips with a clear message where /usr/bin/chromium or Playwright is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qkv.cli.app import main
from qkv.explain import (
    ExplorerInput,
    ExplorerStage,
    explain,
    explorer_data,
    show,
    write_explorer,
)
from qkv.pretrained import load

CHROMIUM = Path("/usr/bin/chromium")
TEXT = "The bank of the river was muddy after the storm"
# Everything that can end or hijack an inline <script>, plus a placeholder lookalike.
# No "-->": it would close the comment-like parser state and hide the bug.
HOSTILE = "bank <!--<script> a </script> b </SCRIPT > & \u2028 __DATA__ ]]>"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: uint16 storage: |error| <= 0.5 / 65535.
QUANT = 8e-6
#: The bound on a 1,000-token, 7-stage x 12-head page (MAX_WEIGHT_BYTES * 4/3 + code).
PAGE_BOUND = 5_600_000

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model():
    return load("all-MiniLM-L6-v2")


def _embedded_json(page: str) -> str:
    """The text of the page's data block, cut where an HTML parser would end it."""
    start = page.index('<script type="application/json" class="qkv-data" id="qkv-data">')
    body = page[start:].split(">", 1)[1]
    return body[: re.search(r"</script", body, re.IGNORECASE).start()]


def test_embedded_json_cannot_end_or_open_a_script(model, tmp_path):
    expl = explain(model, HOSTILE, "bank")
    page = write_explorer(expl, tmp_path / "explorer.html", model_name=model.name)
    html = page.read_text(encoding="utf-8")
    data = _embedded_json(html)
    # No character that could start a tag or a comment, nor a raw line separator.
    assert not set(data) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(data) == json.loads(json.dumps(explorer_data(expl, model.name)))
    assert json.loads(data)["text"] == HOSTILE
    # Exactly the template's two scripts: the user's text opened and closed none.
    assert len(re.findall(r"<script\b", html, re.IGNORECASE)) == 2
    assert len(re.findall(r"</script", html, re.IGNORECASE)) == 2
    # The placeholder lookalike stays in the title as written, escaped.
    title = re.search(r"<title>(.*?)</title>", html, re.DOTALL)[1]
    assert "__DATA__" in title and "<" not in title and "{" not in title


def synthetic(
    L: int, *, layers: int = 6, heads: int = 12, causal: bool = False, focus=(5,), **kw
) -> ExplorerInput:
    """Random but peaked softmax weights for ``L`` tokens (float16 keeps 1,000 tokens small)."""
    g = torch.Generator().manual_seed(L + layers)
    words = ["the", "bank", "of", "the", "river", "was", "muddy", "after", "the", "storm"]
    tokens = tuple(words[i % len(words)] for i in range(L))
    future = torch.ones(L, L, dtype=torch.bool).triu(1)

    def weights(h: int, sharp: float) -> torch.Tensor:
        x = torch.randn(h, L, L, generator=g) * sharp
        if causal:
            x = x.masked_fill(future, float("-inf"))
        return torch.softmax(x, -1).to(torch.float16)  # (h, L, S)

    stages = [ExplorerStage("untrained baseline", weights(1, 6.0))]
    stages += [ExplorerStage(f"layer {n}", weights(heads, 3.0)) for n in range(1, layers + 1)]
    return ExplorerInput(
        tokens, tuple(stages), tuple(focus), "'river'", causal, text=" ".join(tokens), **kw
    )


# -- the browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module; ``open(path_or_html, width)`` gives a page."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"Debian chromium not found at {CHROMIUM}: the explorer's browser test needs "
            "it (apt-get install -y chromium; .ci/run installs it when it can)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    root = tmp_path_factory.mktemp("chromium")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(root / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
        )
        pages = []

        def open_page(
            target: Path | str, width: int = 1280, ready: str = ".qkv-explorer[data-ready]"
        ):
            pg = context.new_page()
            pg.set_viewport_size({"width": width, "height": 900})
            pg.requests, pg.errors = [], []
            pg.on("request", lambda r: pg.requests.append(r.url))
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
            if isinstance(target, Path):
                pg.goto(target.as_uri())
            else:
                pg.set_content(target)
            pg.wait_for_selector(ready, timeout=60_000)
            pages.append(pg)
            return pg

        try:
            yield open_page
        finally:
            for pg in pages:
                # Nothing went to the network and no script failed, on any page.
                assert pg.errors == [], pg.errors
                assert all(u.startswith(("file://", "about:", "data:")) for u in pg.requests)
            context.close()


def _weights(pg, root: str = "") -> list[float | None]:
    """Each token row's weight as the page shows it (None: masked or not stored)."""
    values = pg.eval_on_selector_all(
        f"{root} .qx-tok",
        "els => els.map(e => e.dataset.weight === undefined ? null : +e.dataset.weight)",
    )
    return values


def _assert_row(pg, expected: torch.Tensor, root: str = "") -> None:
    got = torch.tensor(_weights(pg, root), dtype=torch.float64)
    torch.testing.assert_close(got, expected.double(), atol=QUANT, rtol=0)


def _selected(pg, root: str = "") -> list[int]:
    return pg.eval_on_selector_all(
        f"{root} .qx-tok.selected", "els => els.map(e => +e.dataset.index)"
    )


def test_page_opens_at_the_commands_layer_and_head(browser, model, tmp_path, capsys):
    out = tmp_path / "river"
    assert (
        main(
            ["explain", TEXT, "--focus", "river", "--layer", "3", "--head", "5", "--out", str(out)]
        )
        == 0
    )
    capsys.readouterr()
    run = model.run(TEXT)
    pg = browser(out / "explorer.html")
    assert pg.text_content(".qx-title") == "Layer 3 · head 5"
    assert pg.eval_on_selector_all(
        "button.qx-thumb.selected", "els => els.map(e => e.dataset.stage + ':' + e.dataset.head)"
    ) == ["3:5"]
    assert _selected(pg) == [5]  # 'river', as on the command line
    _assert_row(pg, run.layers[2].weights[0, 4, 5])
    assert pg.text_content(".qx-summary").startswith("'river' (token 5) attends most to")
    # Other direction: what every token puts on 'river' (column 5).
    pg.click(".qx-dir input[value=to]")
    _assert_row(pg, run.layers[2].weights[0, 4, :, 5])
    assert pg.text_content(".qx-summary").startswith("Tokens that attend most to 'river'")
    pg.click(".qx-dir input[value=from]")
    # A thumbnail, then a head button, then a token.
    pg.click('button.qx-thumb[data-stage="6"][data-head="0"]')
    assert pg.text_content(".qx-title") == "Layer 6 · average of 12 heads"
    _assert_row(pg, run.layers[5].weights[0, :, 5].mean(0))
    pg.click('.qx-heads button[data-head="7"]')
    pg.click('.qx-tok[data-index="2"]')
    _assert_row(pg, run.layers[5].weights[0, 6, 2])
    # The untrained baseline: q = k = v = the input embeddings.
    pg.click('button.qx-thumb[data-stage="0"]')
    xs = run.embeddings[0]
    _assert_row(pg, torch.softmax(xs @ xs[2], dim=0))
    # The legend states the scale the PNGs use (same number in their colour bars).
    legend = pg.text_content(".qx-legend")
    data = json.loads(_embedded_json((out / "explorer.html").read_text()))
    assert (
        "linear" in legend
        and "99th percentile" in legend
        and f"≥ {data['scale']['vmax']}" in legend
    )
    pg.screenshot(path=str(tmp_path / "explorer.png"), full_page=False)


def test_split_word_shows_the_same_averaged_row_as_the_command(browser, tmp_path, capsys):
    text = "Photosynthesis feeds the plants by the river"
    out = tmp_path / "photo"
    assert (
        main(["explain", text, "--focus", "photosynthesis", "--layer", "2", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "their rows and vectors are averaged" in printed
    detail = printed[printed.index("Attention of 'Photosynthesis' on every token") :]
    detail = detail[: detail.index("└")]  # that table only
    cli_row = []
    for line in detail.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0].isdigit():
            cli_row.append(float(cells[4]))  # layer 2, head average, 4 decimals
    assert len(cli_row) > 5
    pg = browser(out / "explorer.html")
    pieces = pg.eval_on_selector_all(".qx-tok.focusword", "els => els.map(e => +e.dataset.index)")
    assert len(pieces) > 1 and _selected(pg) == pieces  # every piece selected, averaged
    assert "rows averaged as on the command line" in pg.text_content(".qx-summary")
    got = torch.tensor(_weights(pg), dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(cli_row, dtype=torch.float64), atol=6e-5, rtol=0)
    # Moving off the word and back with "f" returns to the averaged row.
    pg.click('.qx-tok[data-index="0"]')
    assert _selected(pg) == [0]
    pg.keyboard.press("f")
    assert _selected(pg) == pieces


def test_hostile_text_leaves_the_page_working(browser, model, tmp_path):
    expl = explain(model, HOSTILE, "bank")
    pg = browser(write_explorer(expl, tmp_path / "explorer.html", model_name=model.name))
    assert pg.text_content(".qx-text") == f"\u201c{HOSTILE}\u201d"
    assert pg.eval_on_selector_all(".qx-tok", "els => els.length") == len(expl.tokens)


@pytest.fixture(scope="module")
def long_page(tmp_path_factory):
    inp = synthetic(1000, focus=(500,))
    path = write_explorer(inp, tmp_path_factory.mktemp("long") / "explorer.html")
    return inp, path


def test_a_thousand_token_page_stays_small(long_page):
    path = long_page[1]
    assert path.stat().st_size < PAGE_BOUND
    data = json.loads(_embedded_json(path.read_text()))
    assert data["encoding"]["kind"] == "top" and data["encoding"]["k"] >= 4


def test_a_thousand_tokens_at_800_px(browser, long_page, tmp_path):
    inp, path = long_page
    pg = browser(path, width=800)
    width = pg.evaluate("document.documentElement.scrollWidth")
    assert width <= 800, f"page is {width} px wide in an 800 px window"
    # The focus row is stored exactly, whatever the length.
    _assert_row(pg, inp.stages[-1].weights.float().mean(0)[500])
    # Every head of every layer can be clicked (Playwright refuses covered elements).
    for stage, head in ((6, 12), (1, 1), (3, 7), (0, 0)):
        pg.click(f'button.qx-thumb[data-stage="{stage}"][data-head="{head}"]', timeout=5_000)
        assert (
            pg.eval_on_selector(
                "button.qx-thumb.selected", "e => e.dataset.stage + ':' + e.dataset.head"
            )
            == f"{stage}:{head}"
        )
    # Keyboard: tab into the token list, move with the arrows, jump to the end.
    pg.click('button.qx-thumb[data-stage="6"][data-head="3"]')
    for _ in range(200):
        pg.keyboard.press("Tab")
        if pg.evaluate("document.activeElement.classList.contains('qx-list')"):
            break
    else:
        pytest.fail("Tab never reached the token list")
    outline = pg.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # focus is visible
    pg.keyboard.press("ArrowDown")
    assert _selected(pg) == [501]
    pg.keyboard.press("End")
    assert _selected(pg) == [999]
    row = inp.stages[6].weights[2].float()[999]  # layer 6, head 3: top-k of row 999
    shown = torch.tensor([w if w is not None else float("nan") for w in _weights(pg)])
    stored = ~shown.isnan()
    assert stored.sum() == json.loads(_embedded_json(path.read_text()))["encoding"]["k"]
    torch.testing.assert_close(shown[stored], row[stored].double().float(), atol=QUANT, rtol=0)
    assert row[stored].min() >= row[~stored].max()  # the strongest keys are the ones kept
    # The selected token is scrolled into view inside the list, and the list in the page.
    inside = pg.evaluate(
        """() => { const l = document.querySelector('.qx-list').getBoundingClientRect();
                    const r = document.querySelector('.qx-tok.selected').getBoundingClientRect();
                    return r.top >= l.top - 1 && r.bottom <= l.bottom + 1; }"""
    )
    assert inside
    # Layer and head keys, and the direction key.
    pg.keyboard.press("[")
    assert pg.text_content(".qx-title") == "Layer 5 · head 3"
    pg.keyboard.press("=")
    assert pg.text_content(".qx-title") == "Layer 5 · head 4"
    pg.keyboard.press("-")
    pg.keyboard.press("-")
    pg.keyboard.press("-")
    pg.keyboard.press("-")
    assert pg.text_content(".qx-title") == "Layer 5 · average of 12 heads"
    pg.keyboard.press("d")
    assert pg.is_checked(".qx-dir input[value=to]")
    keys = pg.text_content(".qx-keys")
    for documented in ("[", "]", "-", "=", "d", "f", "Tab", "\u2191"):
        assert documented in keys
    pg.screenshot(path=str(tmp_path / "explorer-1000-tokens.png"), full_page=False)


def test_causal_model_with_30_layers_of_9_heads(browser, tmp_path):
    inp = synthetic(40, layers=30, heads=9, causal=True, focus=(10,), stage=12, head=4)
    pg = browser(write_explorer(inp, tmp_path / "causal.html"), width=800)
    assert pg.evaluate("document.documentElement.scrollWidth") <= 800
    assert pg.text_content(".qx-title") == "Layer 12 · head 4"
    assert pg.eval_on_selector_all("button.qx-thumb", "els => els.length") == 1 + 30 * 10
    # Token 10 sees tokens 0..10: the rest are masked, not zeros.
    weights = _weights(pg)
    assert all(w is None for w in weights[11:]) and all(w is not None for w in weights[:11])
    states = pg.eval_on_selector_all(".qx-tok", "els => els.map(e => e.dataset.state)")
    assert states[11:] == ["masked"] * 29
    expected = inp.stages[12].weights[3].double()[10, :11]  # layer 12, head 4, token 10
    got = torch.tensor(weights[:11], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=QUANT, rtol=0)
    assert "looks back most at" in pg.text_content(".qx-summary")
    # The other direction: only tokens 10.. can look back at token 10.
    pg.keyboard.press("d")
    weights = _weights(pg)
    assert all(w is None for w in weights[:10]) and all(w is not None for w in weights[10:])
    assert "Later tokens that look back most at" in pg.text_content(".qx-summary")
    # The last thumbnail of the last layer is reachable and clickable.
    pg.click('button.qx-thumb[data-stage="30"][data-head="9"]', timeout=5_000)
    assert pg.text_content(".qx-title") == "Layer 30 · head 9"
    assert "masked" in pg.text_content(".qx-legend")


def test_notebook_view_twice_in_one_page(browser, model):
    expl = explain(model, TEXT, "bank")
    first = show(expl, model_name=model.name, layer=2)._repr_html_()
    second = expl._repr_html_()
    assert "<html" not in first and 'id="qkv-data"' not in first
    page = (
        f"<!DOCTYPE html><html><body><p>notebook</p>{first}<p>next cell</p>{second}</body></html>"
    )
    pg = browser(page, ready=".qkv-explorer[data-ready] ~ p ~ .qkv-explorer[data-ready]")
    roots = pg.eval_on_selector_all(".qkv-explorer", "els => els.map(e => e.id)")
    assert len(roots) == 2 and roots[0] != roots[1]
    a, b = (f"#{r}" for r in roots)
    assert pg.text_content(f"{a} .qx-title") == "Layer 2 · average of 12 heads"
    assert pg.text_content(f"{b} .qx-title") == "Layer 6 · average of 12 heads"
    # A head toggle in the first widget changes only the first.
    pg.click(f'{a} .qx-heads button[data-head="7"]')
    assert pg.text_content(f"{a} .qx-title") == "Layer 2 · head 7"
    assert pg.text_content(f"{b} .qx-title") == "Layer 6 · average of 12 heads"
    run = expl.run
    _assert_row(pg, run.layers[1].weights[0, 6, 2], a)
    pg.click(f"{a} .qx-dir input[value=to]")
    _assert_row(pg, run.layers[1].weights[0, 6, :, 2], a)
    _assert_row(pg, run.layers[5].weights[0, :, 2].mean(0), b)
    # Keys act inside the widget that has the focus.
    pg.focus(f"{b} .qx-list")
    pg.keyboard.press("ArrowDown")
    assert _selected(pg, b) == [3] and _selected(pg, a) == [2]


def test_invalid_input_names_the_argument():
    good = synthetic(6, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"focus must be positions in 0\.\.5"):
        ExplorerInput(good.tokens, good.stages, (6,))
    with pytest.raises(ValueError, match="head must be between 1 and 2"):
        ExplorerInput(good.tokens, good.stages, (1,), head=3)
    with pytest.raises(ValueError, match=r"weights must be \(H, L, S\)"):
        ExplorerInput(good.tokens[:5], good.stages, (1,))
    with pytest.raises(TypeError, match="source must be"):
        show("not an explanation")
