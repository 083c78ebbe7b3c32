"""The explorer page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Opens the page from disk, picks a layer and head in the grid, hovers a token, and
checks the weights the page highlights (each key's ``data-weight``) against the
model's own weights. Saves screenshots under the test's tmp dir. Skips with a clear
message where /usr/bin/chromium or Playwright is missing (``.ci/run`` installs chromium).

A text holding ``<!--<script>`` and ``</script>`` must not break the page: the JSON
embedded in its ``<script>`` block is checked here without a browser (no ``<``,
``>`` or ``&`` left in it, and it parses back to the data), and in the browser (the
page's script ran and shows the text as written).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from qkv.explain import explain, explorer_data, write_explorer
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

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model():
    return load("all-MiniLM-L6-v2")


def _embedded_json(page: str) -> str:
    """The text of the page's data block, cut where an HTML parser would end it."""
    start = page.index('<script type="application/json" id="qkv-data">')
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


@contextlib.contextmanager
def _browse(html: Path, root: Path):
    """A headless Chromium showing ``html``; yields (page, requests, errors)."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"Debian chromium not found at {CHROMIUM}: the explorer's browser test needs "
            "it (apt-get install -y chromium; .ci/run installs it when it can)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    requests: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(root / "profile"),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            pg = context.new_page()
            pg.on("request", lambda r: requests.append(r.url))
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.goto(html.as_uri())
            pg.wait_for_selector(".key[data-weight]", timeout=30_000)
            yield pg, requests, errors
        finally:
            context.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory, model):
    expl = explain(model, TEXT, "bank")
    root = tmp_path_factory.mktemp("explorer")
    html = write_explorer(expl, root / "explorer.html", model_name=model.name)
    with _browse(html, root) as (pg, requests, errors):
        yield pg, expl, root, requests, errors


def test_hostile_text_leaves_the_page_working(model, tmp_path):
    expl = explain(model, HOSTILE, "bank")
    html = write_explorer(expl, tmp_path / "explorer.html", model_name=model.name)
    with _browse(html, tmp_path) as (pg, requests, errors):
        # The page script ran: it filled in the text (as typed) and the token view.
        assert pg.text_content("#text") == f"\u201c{HOSTILE}\u201d"
        assert pg.eval_on_selector_all(".query", "els => els.length") == len(expl.tokens)
        assert pg.eval_on_selector_all("canvas.thumb", "els => els.length") > 1
        assert errors == []
        assert all(url.startswith("file://") for url in requests), requests


def _key_weights(pg) -> torch.Tensor:
    values = pg.eval_on_selector_all(".key", "els => els.map(e => e.dataset.weight)")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _check_hover(pg, expl, layer: int, head: str, query: int, expected: torch.Tensor) -> None:
    pg.click(f'canvas.thumb[data-layer="{layer}"][data-head="{head}"]')
    pg.hover(f'.query[data-index="{query}"]')
    got = _key_weights(pg)
    torch.testing.assert_close(got, expected.double(), atol=1e-6, rtol=0)
    active = pg.eval_on_selector_all(".query.active", "els => els.map(e => +e.dataset.index)")
    assert active == [query]
    # One line per key with weight >= 0.005, from the hovered token.
    assert pg.eval_on_selector_all("svg#lines line", "els => els.length") == int(
        (expected >= 0.005).sum()
    )


def test_hovering_a_token_highlights_the_models_weights(page, tmp_path):
    pg, expl, root, requests, errors = page
    # Layer 3, head 5, hovering 'river' (token 5).
    _check_hover(pg, expl, 3, "5", 5, expl.run.layers[2].weights[0, 4, 5])
    assert pg.text_content("#view-title") == "Layer 3 · head 5"
    assert "“river” attends most to" in pg.text_content("#summary")
    pg.screenshot(path=str(tmp_path / "explorer-layer3-head5.png"), full_page=True)
    # Layer 6, head average, hovering 'bank'.
    _check_hover(pg, expl, 6, "mean", 2, expl.run.layers[5].weights[0, :, 2].mean(0))
    # The untrained baseline row: q = k = v = the input embeddings.
    xs = expl.run.embeddings[0]
    _check_hover(pg, expl, 0, "mean", 2, torch.softmax(xs @ xs[2], dim=0))
    # Leaving the token goes back to the pinned one (the focus word, token 2).
    pg.mouse.move(5, 5)
    assert pg.eval_on_selector_all(".query.active", "els => els.map(e => +e.dataset.index)") == [2]
    # Clicking a token pins it.
    pg.click('canvas.thumb[data-layer="1"][data-head="3"]')
    pg.click('.query[data-index="7"]')
    pg.mouse.move(5, 5)
    torch.testing.assert_close(
        _key_weights(pg), expl.run.layers[0].weights[0, 2, 7].double(), atol=1e-6, rtol=0
    )
    shot = tmp_path / "explorer.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # Keep a copy beside the page for a person to look at.
    shutil.copy(shot, root / "explorer.png")
    assert errors == []
    assert all(url.startswith("file://") for url in requests), requests


def test_grid_has_every_layer_and_head(page):
    pg = page[0]
    cells = pg.eval_on_selector_all(
        "canvas.thumb", "els => els.map(e => e.dataset.layer + ':' + e.dataset.head)"
    )
    expected = ["0:mean"] + [f"{n}:{h}" for n in range(1, 7) for h in ["mean", *range(1, 13)]]
    assert cells == expected
    selected = pg.eval_on_selector_all(
        "canvas.thumb.selected", "els => els.map(e => e.dataset.layer + ':' + e.dataset.head)"
    )
    assert len(selected) == 1
