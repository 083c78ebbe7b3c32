"""The attention explorer: one self-contained HTML page (inline CSS and JS, no network).

Two views, in the spirit of bertviz's model view and head view:

* **Layer x head grid** — one thumbnail heatmap per (layer, head), plus the head
  average, with the untrained baseline as the first row. Clicking one selects it.
* **Token view** — the tokens twice, queries on the left and keys on the right.
  Hovering (or clicking, to pin) a query token draws lines to the keys with opacity =
  weight and shades each key; each key element carries its exact weight in
  ``data-weight`` (what the browser test reads). A matrix of the selected head sits below.

Layers are numbered from 1 (0 is the baseline) and heads from 1, as on the command
line. The weights are embedded as JSON, rounded to 7 decimals (float32 precision).

The JSON sits inside a ``<script>`` element, where the HTML parser looks for
``</script>`` and, after ``<!--``, for ``<script>`` too (the "double-escaped" state,
in which the real closing tag no longer closes). The user's text could hold any of
them, so :func:`script_json` writes ``<``, ``>`` and ``&`` as JSON's ``\u003c``,
``\u003e`` and ``\u0026``: the parser then sees no tag at all, and ``JSON.parse``
reads the same characters back.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .analysis import Explanation

__all__ = ["MAX_EXPLORER_TOKENS", "explorer_data", "script_json", "write_explorer"]

#: Longer texts would make the page huge (layers x heads x L x L numbers).
MAX_EXPLORER_TOKENS = 128


def _rounded(rows: list) -> list:
    return [[round(v, 7) for v in row] for row in rows]


def explorer_data(expl: Explanation, model_name: str) -> dict:
    """The JSON the page embeds: tokens, focus, and every stage's per-head and mean weights."""
    stages = []
    for s in range(len(expl.stages)):
        w = expl.stage_weights(s)  # (H, L, S)
        stages.append(
            {
                "label": "untrained baseline" if s == 0 else f"layer {s}",
                "heads": [_rounded(w[h].tolist()) for h in range(w.shape[0])],
                "mean": _rounded(w.mean(0).tolist()),
            }
        )
    return {
        "model": model_name,
        "text": expl.text.text,
        "tokens": expl.tokens,
        "focus": {"word": expl.focus.word, "positions": list(expl.focus.positions)},
        "stages": stages,
    }


# Characters that may not appear as such inside an inline <script>: the three that
# can form a tag or an HTML comment, and the two line separators that very old
# JavaScript parsers refuse in string literals.
_SCRIPT_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")


def script_json(obj) -> str:
    """``obj`` as JSON that is safe to paste between ``<script>`` and ``</script>``.

    Outside of strings ``json.dumps`` never writes these characters, so every
    replacement lands inside a string literal, where the ``\\uXXXX`` form stands
    for the same character: ``JSON.parse`` gives back exactly ``obj``.
    """
    data = json.dumps(obj, separators=(",", ":"))
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group()], data)


def write_explorer(expl: Explanation, path: str | Path, *, model_name: str) -> Path:
    """Write the explorer page for ``expl`` to ``path`` (parent folders are created)."""
    if len(expl.tokens) > MAX_EXPLORER_TOKENS:
        raise ValueError(
            f"the explorer page is made for texts up to {MAX_EXPLORER_TOKENS} tokens; "
            f"this one has {len(expl.tokens)}"
        )
    fill = {
        "__TITLE__": html.escape(f"qkv explorer · {model_name} · {expl.text.text[:60]}"),
        "__DATA__": script_json(explorer_data(expl, model_name)),
    }
    # One pass over the template: a text that itself reads "__DATA__" lands in the
    # title as written instead of being replaced in turn.
    page = re.sub("__TITLE__|__DATA__", lambda m: fill[m.group()], _TEMPLATE)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --ink: #1d2433; --muted: #6b7385; --line: #d9dde6; --accent: #1f5fbf; --focus: #d62728; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: #f7f8fb; }
  header { padding: 14px 22px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 17px; margin: 0 0 4px; }
  header p { margin: 0; color: var(--muted); }
  #text { font-style: italic; color: var(--ink); }
  main { display: grid; grid-template-columns: minmax(420px, auto) 1fr; gap: 18px; padding: 18px 22px; align-items: start; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
  h2 { font-size: 14px; margin: 0 0 8px; }
  .hint { color: var(--muted); font-size: 12px; margin: 0 0 8px; }
  table.grid { border-collapse: collapse; }
  table.grid th { font-size: 11px; font-weight: 500; color: var(--muted); padding: 2px 3px; white-space: nowrap; }
  table.grid th.row { text-align: right; }
  table.grid td { padding: 2px; }
  canvas.thumb { display: block; width: 34px; height: 34px; border: 2px solid #e3e7ef; border-radius: 3px; cursor: pointer; image-rendering: pixelated; }
  canvas.thumb:hover { border-color: #9db7e0; }
  canvas.thumb.selected { border-color: var(--focus); }
  #view-title { font-size: 15px; margin: 0 0 2px; }
  #summary { color: var(--muted); min-height: 1.4em; margin: 0 0 10px; }
  .tokens { display: flex; align-items: flex-start; gap: 0; position: relative; }
  .col { display: flex; flex-direction: column; gap: 3px; z-index: 1; }
  .tok { display: flex; align-items: center; gap: 6px; height: 22px; padding: 0 8px; border-radius: 4px; font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 13px; white-space: nowrap; }
  .query { justify-content: flex-end; cursor: pointer; }
  .query:hover { background: #eef3fb; }
  .query.active { background: #dbe7f8; }
  .query.focus { color: var(--focus); }
  /* The marker always takes its place, so pinning never shifts the columns. */
  .query::before { content: "\25B8"; color: var(--accent); visibility: hidden; }
  .query.pinned::before { visibility: visible; }
  .key .w { font-size: 11px; color: var(--muted); min-width: 44px; text-align: right; }
  .key.dark, .key.dark .w { color: #fff; }
  svg#lines { flex: none; }
  #matrix { margin-top: 14px; overflow: auto; max-height: 60vh; }
  table.matrix { border-collapse: collapse; font-family: ui-monospace, Menlo, monospace; font-size: 11px; }
  table.matrix th { font-weight: 500; color: var(--muted); padding: 1px 4px; white-space: nowrap; }
  table.matrix thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
  table.matrix td { width: 20px; height: 18px; border: 1px solid #fff; }
  table.matrix tr.active th { color: var(--accent); font-weight: 700; }
  table.matrix tr.active td { box-shadow: inset 0 2px 0 var(--focus), inset 0 -2px 0 var(--focus); }
  footer { padding: 0 22px 18px; color: var(--muted); font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1>Attention explorer · <span id="model"></span></h1>
  <p>Text: <span id="text"></span> · focus word: <b id="focus"></b></p>
</header>
<main>
  <section id="model-view">
    <h2>Every layer and head</h2>
    <p class="hint">Rows: the untrained baseline (query = key = value = input embeddings, no projections), then the trained layers. Click a thumbnail.</p>
    <table class="grid" id="grid"></table>
  </section>
  <section id="head-view">
    <h2 id="view-title"></h2>
    <p class="hint">Hover a token on the left to see what it attends to on the right; click it to keep it selected.</p>
    <p id="summary"></p>
    <div class="tokens">
      <div class="col" id="queries"></div>
      <svg id="lines" width="160"></svg>
      <div class="col" id="keys"></div>
    </div>
    <div id="matrix"></div>
  </section>
</main>
<footer>Written by qkv explain. Weights are softmax rows: each query's weights over the keys sum to 1.</footer>
<script type="application/json" id="qkv-data">__DATA__</script>
<script>
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("qkv-data").textContent);
  const tokens = data.tokens;
  const L = tokens.length;
  const focusSet = new Set(data.focus.positions);
  const state = { stage: data.stages.length - 1, head: "mean", pinned: data.focus.positions[0], hover: null };
  const SVGNS = "http://www.w3.org/2000/svg";

  document.getElementById("model").textContent = data.model;
  document.getElementById("text").textContent = "\u201c" + data.text + "\u201d";
  document.getElementById("focus").textContent = data.focus.word;

  function weights(stage, head) {
    const s = data.stages[stage];
    return head === "mean" ? s.mean : s.heads[head - 1];
  }
  function colour(w) {
    // White to deep blue; sqrt so that small weights stay visible.
    const t = Math.sqrt(Math.max(0, Math.min(1, w)));
    const r = Math.round(255 - t * (255 - 17)), g = Math.round(255 - t * (255 - 72)), b = Math.round(255 - t * (255 - 160));
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function headLabel(stage, head) {
    const s = data.stages[stage];
    if (stage === 0) return "Untrained baseline (one head: q = k = v = x)";
    return "Layer " + stage + " \u00b7 " + (head === "mean" ? "average of " + s.heads.length + " heads" : "head " + head);
  }

  // ---- layer x head grid ------------------------------------------------------------
  function drawThumb(canvas, w) {
    canvas.width = L; canvas.height = L;
    const ctx = canvas.getContext("2d");
    for (let i = 0; i < L; i++) for (let j = 0; j < L; j++) { ctx.fillStyle = colour(w[i][j]); ctx.fillRect(j, i, 1, 1); }
  }
  function buildGrid() {
    const grid = document.getElementById("grid");
    const H = Math.max.apply(null, data.stages.map(s => s.heads.length));
    const head = grid.insertRow();
    head.appendChild(document.createElement("th"));
    const mean = document.createElement("th"); mean.textContent = "avg"; head.appendChild(mean);
    for (let h = 1; h <= H; h++) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
    data.stages.forEach((s, stage) => {
      const row = grid.insertRow();
      const th = document.createElement("th"); th.className = "row";
      th.textContent = stage === 0 ? "baseline" : "layer " + stage; row.appendChild(th);
      const choices = stage === 0 ? ["mean"] : ["mean"].concat(s.heads.map((_, h) => h + 1));
      for (let c = 0; c <= H; c++) {
        const td = row.insertCell();
        if (c >= choices.length) continue;
        const canvas = document.createElement("canvas");
        canvas.className = "thumb";
        canvas.dataset.layer = stage;
        canvas.dataset.head = choices[c];
        canvas.title = headLabel(stage, choices[c]);
        drawThumb(canvas, weights(stage, choices[c]));
        canvas.addEventListener("click", () => select(stage, choices[c]));
        td.appendChild(canvas);
      }
    });
  }
  function select(stage, head) {
    state.stage = stage;
    state.head = stage === 0 ? "mean" : head;
    document.querySelectorAll("canvas.thumb").forEach(c => {
      c.classList.toggle("selected", +c.dataset.layer === state.stage && c.dataset.head === String(state.head));
    });
    buildMatrix();
    render();
  }

  // ---- token view ---------------------------------------------------------------------
  function buildTokens() {
    const q = document.getElementById("queries"), k = document.getElementById("keys");
    tokens.forEach((t, i) => {
      const a = document.createElement("div");
      a.className = "tok query" + (focusSet.has(i) ? " focus" : "");
      a.dataset.index = i; a.textContent = t;
      a.addEventListener("mouseenter", () => { state.hover = i; render(); });
      a.addEventListener("mouseleave", () => { state.hover = null; render(); });
      a.addEventListener("click", () => { state.pinned = i; render(); });
      q.appendChild(a);
      const b = document.createElement("div");
      b.className = "tok key"; b.dataset.index = i;
      const w = document.createElement("span"); w.className = "w";
      const name = document.createElement("span"); name.textContent = t;
      b.appendChild(w); b.appendChild(name);
      k.appendChild(b);
    });
  }
  function render() {
    const w = weights(state.stage, state.head);
    const active = state.hover === null ? state.pinned : state.hover;
    document.getElementById("view-title").textContent = headLabel(state.stage, state.head);
    document.querySelectorAll(".query").forEach(el => {
      const i = +el.dataset.index;
      el.classList.toggle("active", i === active);
      el.classList.toggle("pinned", i === state.pinned);
    });
    const row = w[active];
    document.querySelectorAll(".key").forEach(el => {
      const j = +el.dataset.index;
      el.dataset.weight = row[j];
      el.style.background = colour(row[j]);
      el.classList.toggle("dark", row[j] > 0.45);
      el.querySelector(".w").textContent = row[j].toFixed(3);
    });
    const top = row.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
    document.getElementById("summary").textContent =
      "\u201c" + tokens[active] + "\u201d attends most to " + top.map(([v, j]) => tokens[j] + " (" + v.toFixed(2) + ")").join(", ");
    drawLines(row, active);
    document.querySelectorAll("table.matrix tbody tr").forEach((tr, i) => tr.classList.toggle("active", i === active));
  }
  function drawLines(row, active) {
    const svg = document.getElementById("lines");
    const qs = document.querySelectorAll(".query"), ks = document.querySelectorAll(".key");
    const box = svg.getBoundingClientRect();
    svg.setAttribute("height", document.getElementById("queries").offsetHeight);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const qy = qs[active].getBoundingClientRect();
    row.forEach((v, j) => {
      if (v < 0.005) return;
      const ky = ks[j].getBoundingClientRect();
      const line = document.createElementNS(SVGNS, "line");
      line.setAttribute("x1", 2); line.setAttribute("x2", box.width - 2);
      line.setAttribute("y1", qy.top + qy.height / 2 - box.top);
      line.setAttribute("y2", ky.top + ky.height / 2 - box.top);
      line.setAttribute("stroke", "#1f5fbf");
      line.setAttribute("stroke-opacity", Math.min(1, 0.15 + v));
      line.setAttribute("stroke-width", 1 + 5 * v);
      svg.appendChild(line);
    });
  }

  // ---- matrix of the selected head ------------------------------------------------
  function buildMatrix() {
    const w = weights(state.stage, state.head);
    const box = document.getElementById("matrix");
    box.textContent = "";
    const table = document.createElement("table"); table.className = "matrix";
    const head = table.createTHead().insertRow();
    head.appendChild(document.createElement("th"));
    tokens.forEach(t => { const th = document.createElement("th"); th.textContent = t; head.appendChild(th); });
    const body = table.createTBody();
    w.forEach((row, i) => {
      const tr = body.insertRow();
      const th = document.createElement("th"); th.textContent = tokens[i]; tr.appendChild(th);
      row.forEach((v, j) => {
        const td = tr.insertCell();
        td.style.background = colour(v);
        td.title = tokens[i] + " \u2192 " + tokens[j] + ": " + v.toFixed(4);
      });
    });
    box.appendChild(table);
  }

  buildGrid();
  buildTokens();
  select(state.stage, state.head);
  window.addEventListener("resize", render);
})();
</script>
</body>
</html>
"""
