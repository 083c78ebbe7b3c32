"""The attention explorer: one self-contained widget (inline CSS and JS, no network),
written as an HTML page by ``qkv explain`` or shown inline in Jupyter (:mod:`.notebook`).

What it shows, for any number of tokens (tested from 10 to 1,000), stages, layers and heads:

* **Every layer and head** as thumbnail heatmaps, one row per stage (the untrained
  baseline, then each layer), wrapping on narrow windows; each is a button.
* **One token at a time**: a scrollable list of every token with a bar and the
  weight between it and the selected token, in either direction: "what this token
  attends to" (its softmax row) or "what attends to this token" (its column); above
  the list, the ten strongest, so they never scroll out of sight. The focus word
  starts selected; a word split into pieces is shown as the mean of its pieces' rows,
  exactly the row ``qkv explain`` prints.
* **The selected head's matrix** as one canvas, as wide as the panel allows.
* **A colour legend** stating the scale, the same as the PNG heatmaps'
  (:mod:`qkv.explain.colour`), and the keyboard keys the page reacts to.

Causal decoders (``causal=True``): row i sees keys 0..i; keys a token cannot see are
drawn grey and listed as masked, and the wording says "looks back at".

**How weights are embedded.** Each weight ``w`` in [0, 1] is stored as the uint16
``round(w * 65535)`` (error below 7.7e-6, far under the three decimals shown),
little-endian and base64-encoded, one string per matrix. For every stage the page
holds its heads and, for more than one head, their average, and the focus word's
exact rows. When every matrix fits in :data:`MAX_WEIGHT_BYTES` they are stored whole
(a causal matrix only its lower triangle); otherwise each row keeps its ``k``
strongest keys (index and weight, ``k`` as large as the budget allows, at least
:data:`MIN_TOP_K`) and the page says so. So a page is at most about
``MAX_WEIGHT_BYTES * 4 / 3`` plus the tokens and some 30 kB of code, unless
``MIN_TOP_K`` keys per row of every head exceed the budget.

**Safe embedding.** The JSON sits inside a ``<script>`` element, where the HTML parser
looks for ``</script>`` and, after ``<!--``, for ``<script>`` too (the "double-escaped"
state, in which the real closing tag no longer closes). The user's text could hold any
of them, so :func:`script_json` writes ``<``, ``>`` and ``&`` as JSON's ``\\u003c``,
``\\u003e`` and ``\\u0026``: the parser then sees no tag at all, and ``JSON.parse``
reads the same characters back.

Shape legend: H heads · L queries · S keys (S = L).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .analysis import Explanation
from .colour import ColourScale, colour_scale

__all__ = [
    "MAX_EXPLORER_TOKENS",
    "MAX_WEIGHT_BYTES",
    "MIN_TOP_K",
    "ExplorerInput",
    "ExplorerStage",
    "explorer_data",
    "explorer_fragment",
    "explorer_html",
    "explorer_input",
    "script_json",
    "write_explorer",
]

#: Token indices are stored as uint16.
MAX_EXPLORER_TOKENS = 65_535
#: Budget for the stored weights (bytes before base64; the page holds 4/3 of it).
MAX_WEIGHT_BYTES = 4_000_000
#: The fewest keys kept per row when the matrices do not fit whole.
MIN_TOP_K = 4
_LEVELS = 65_535


@dataclass(frozen=True)
class ExplorerStage:
    """One stage of the explorer: the untrained baseline or one layer.

    Attributes:
        label: shown on the page, e.g. ``"untrained baseline"`` or ``"layer 3"``.
        weights: ``(H, L, S)`` softmax weights, one matrix per head.
    """

    label: str
    weights: Tensor


@dataclass(frozen=True)
class ExplorerInput:
    """Everything the explorer needs, independent of the model that made it.

    Attributes:
        tokens: the L tokens.
        stages: the stages in order (e.g. baseline, layer 1, ..., layer n).
        focus: the focus word's piece positions; its rows are averaged.
        focus_label: how the page names the focus word, e.g. ``the 2nd 'the'``.
        causal: True for a causal decoder: row i sees keys 0..i.
        stage: the stage shown first (index into ``stages``); default the last.
        head: the head shown first, from 1; ``None`` for the average of the heads.
        text: the text, shown as the page's heading.
        model: the model's name, shown in the heading.
    """

    tokens: tuple[str, ...]
    stages: tuple[ExplorerStage, ...]
    focus: tuple[int, ...]
    focus_label: str = ""
    causal: bool = False
    stage: int | None = None
    head: int | None = None
    text: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        L = len(self.tokens)
        if L == 0:
            raise ValueError("tokens is empty: the explorer needs at least one token")
        if L > MAX_EXPLORER_TOKENS:
            raise ValueError(f"tokens: at most {MAX_EXPLORER_TOKENS} tokens, got {L}")
        if not self.stages:
            raise ValueError("stages is empty: give at least one stage of weights")
        for st in self.stages:
            w = st.weights
            if not isinstance(w, Tensor) or w.dim() != 3 or tuple(w.shape[1:]) != (L, L):
                shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(
                    f"stages: {st.label!r} weights must be (H, L, S) with L = S = {L} tokens, "
                    f"got {shape}"
                )
        if not self.focus or any(not 0 <= p < L for p in self.focus):
            raise ValueError(f"focus must be positions in 0..{L - 1}, got {list(self.focus)}")
        n = len(self.stages)
        if self.stage is not None and not 0 <= self.stage < n:
            raise ValueError(f"stage must be in 0..{n - 1}, got {self.stage}")
        heads = self.stages[self.initial_stage].weights.shape[0]
        if self.head is not None and not 1 <= self.head <= heads:
            raise ValueError(f"head must be between 1 and {heads}, got {self.head}")

    @property
    def initial_stage(self) -> int:
        return len(self.stages) - 1 if self.stage is None else self.stage


def explorer_input(
    expl: Explanation, model_name: str = "", *, layer: int | None = None, head: int | None = None
) -> ExplorerInput:
    """The explorer's input for an :class:`Explanation`, opening at ``layer`` (from 1;
    0 = the baseline; default the last) and ``head`` (from 1; default the average), as
    ``qkv explain --layer --head`` does."""
    n = len(expl.stages)
    stages = tuple(
        ExplorerStage("untrained baseline" if s == 0 else f"layer {s}", expl.stage_weights(s))
        for s in range(n)
    )
    return ExplorerInput(
        tokens=tuple(expl.tokens),
        stages=stages,
        focus=tuple(expl.focus.positions),
        focus_label=expl.focus.label,
        causal=expl.causal,
        stage=layer,
        head=head,
        text=expl.text.text,
        model=model_name,
    )


def _b64(values: Tensor) -> str:
    """uint16 little-endian, base64: what the page's ``u16()`` reads back."""
    arr = values.to(torch.int32).numpy().astype("<u2")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _quantise(w: Tensor) -> Tensor:
    return (w.detach().to(torch.float64).clamp(0, 1) * _LEVELS).round().to(torch.int32)


def _matrices(st: ExplorerStage) -> list[Tensor]:
    """The stage's matrices as the page indexes them: 0 = the average of the heads (the
    only head when there is one), then heads 1..H."""
    w = st.weights.detach().to(torch.float32)  # (H, L, S)
    if w.shape[0] == 1:
        return [w[0]]
    return [w.mean(0), *w.unbind(0)]


def _encoding(inp: ExplorerInput, max_bytes: int) -> tuple[str, int]:
    """``("dense", 0)`` or ``("top", k)``: how the matrices fit in ``max_bytes``."""
    L = len(inp.tokens)
    heads = (st.weights.shape[0] for st in inp.stages)
    count = sum(1 if h == 1 else h + 1 for h in heads)  # the average is a matrix too
    cells = L * (L + 1) // 2 if inp.causal else L * L
    if 2 * count * cells <= max_bytes:
        return "dense", 0
    k = max(MIN_TOP_K, max_bytes // (4 * count * L))  # 4 bytes: index + weight
    return "top", min(k, L)


def _dense(w: Tensor, causal: bool) -> str:
    q = _quantise(w)  # (L, S)
    if causal:
        L, S = q.shape
        q = q[torch.ones(L, S, dtype=torch.bool).tril()]  # rows 0..i, one after another
    return _b64(q.reshape(-1))


def _top(w: Tensor, k: int, causal: bool) -> str:
    """Each row's ``k`` strongest keys: all L*k indices, then all L*k weights.

    A causal row with fewer than ``k`` keys it may see pads with index 65535, weight 0.
    """
    L, S = w.shape
    w = w.detach().to(torch.float32)
    if causal:
        w = w.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -1.0)
    values, idx = w.topk(k, dim=-1)  # (L, k)
    idx = idx.masked_fill(values < 0, _LEVELS)
    return _b64(torch.cat([idx.reshape(-1), _quantise(values.clamp(min=0)).reshape(-1)]))


def explorer_data(
    source: Explanation | ExplorerInput,
    model_name: str | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    scale: ColourScale | None = None,
    max_bytes: int = MAX_WEIGHT_BYTES,
) -> dict:
    """The JSON the page embeds (see the module docstring for the weight encoding).

    ``source`` is an :class:`Explanation` (with ``model_name``, ``layer`` and ``head``
    as in :func:`explorer_input`) or a ready :class:`ExplorerInput`.
    """
    if isinstance(source, Explanation):
        inp = explorer_input(source, model_name or "", layer=layer, head=head)
    elif isinstance(source, ExplorerInput):
        inp = source
        if model_name is not None:
            inp = dataclasses.replace(inp, model=model_name)
    else:
        raise TypeError(
            f"source must be an Explanation or an ExplorerInput, got {type(source).__name__}"
        )
    if scale is None:
        scale = colour_scale((st.weights for st in inp.stages), causal=inp.causal)
    kind, k = _encoding(inp, max_bytes)
    pos = list(inp.focus)
    stages = []
    for st in inp.stages:
        mats = _matrices(st)
        focus_rows = torch.stack([m[pos].mean(0) for m in mats])  # (1 + H, S)
        stages.append(
            {
                "label": st.label,
                "heads": int(st.weights.shape[0]),
                "matrices": [
                    _dense(m, inp.causal) if k == 0 else _top(m, k, inp.causal) for m in mats
                ],
                "focus": _b64(_quantise(focus_rows).reshape(-1)),
            }
        )
    pieces = " ".join(inp.tokens[p] for p in pos)
    return {
        "model": inp.model,
        "text": inp.text,
        "tokens": list(inp.tokens),
        "causal": bool(inp.causal),
        "focus": {"label": inp.focus_label or repr(pieces), "positions": pos},
        "initial": {"stage": inp.initial_stage, "head": inp.head or 0},
        "scale": {"vmax": scale.vmax, "label": scale.label},
        "encoding": {"kind": kind, "k": k, "levels": _LEVELS},
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


def _fill(template: str, fill: dict[str, str]) -> str:
    # One pass over the template: a text that itself reads "__DATA__" lands in the
    # page as written instead of being replaced in turn.
    return re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group()], template)


def explorer_html(source: Explanation | ExplorerInput, model_name: str | None = None, **kw) -> str:
    """The explorer as a whole HTML page (keyword arguments as :func:`explorer_data`)."""
    data = explorer_data(source, model_name, **kw)
    return _fill(
        _PAGE,
        {
            "__TITLE__": html.escape(f"qkv explorer · {data['model']} · {data['text'][:60]}"),
            "__STYLE__": _STYLE,
            "__DATA__": script_json(data),
            "__SCRIPT__": _SCRIPT,
        },
    )


def explorer_fragment(
    source: Explanation | ExplorerInput, model_name: str | None = None, **kw
) -> str:
    """The explorer as an HTML fragment for a notebook cell: one ``<div>``, its style
    scoped to it, and a script that finds it by a fresh id (so several can coexist)."""
    data = explorer_data(source, model_name, **kw)
    uid = "qkv-" + secrets.token_hex(6)
    return _fill(
        _FRAGMENT,
        {"__UID__": uid, "__STYLE__": _STYLE, "__DATA__": script_json(data), "__SCRIPT__": _SCRIPT},
    )


def write_explorer(
    source: Explanation | ExplorerInput,
    path: str | Path,
    *,
    model_name: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    scale: ColourScale | None = None,
) -> Path:
    """Write the explorer page to ``path`` (parent folders are created)."""
    page = explorer_html(source, model_name, layer=layer, head=head, scale=scale)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { margin: 0; background: #f7f8fb; }
__STYLE__
</style>
</head>
<body>
<div class="qkv-explorer qx-page" id="qkv-root">
<script type="application/json" class="qkv-data" id="qkv-data">__DATA__</script>
</div>
<script>
__SCRIPT__
qkvExplorer(document.getElementById("qkv-root"), true);
</script>
</body>
</html>
"""

_FRAGMENT = """<div class="qkv-explorer" id="__UID__">
<style>
__STYLE__
</style>
<script type="application/json" class="qkv-data">__DATA__</script>
</div>
<script>
(function () {
__SCRIPT__
qkvExplorer(document.getElementById("__UID__"), false);
})();
</script>
"""

# Every rule is scoped to .qkv-explorer so that a notebook's own styles are untouched.
_STYLE = """
.qkv-explorer { --ink: #1d2433; --muted: #5d6577; --line: #d9dde6; --accent: #1f5fbf;
  --focus: #d62728; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--ink); max-width: 100%; overflow-wrap: anywhere; }
.qkv-explorer * { box-sizing: border-box; }
.qkv-explorer.qx-page { padding: 0 0 16px; }
.qkv-explorer :focus-visible { outline: 3px solid var(--focus); outline-offset: 1px; }
.qkv-explorer .qx-top-bar { padding: 12px 18px; background: #fff; border-bottom: 1px solid var(--line); }
.qkv-explorer h1 { font-size: 17px; margin: 0 0 4px; }
.qkv-explorer h2 { font-size: 14px; margin: 0 0 6px; }
.qkv-explorer .qx-text { font-style: italic; max-height: 4.4em; overflow: auto; margin: 0 0 4px; }
.qkv-explorer .qx-muted, .qkv-explorer .qx-hint { color: var(--muted); font-size: 12px; margin: 0 0 6px; }
.qkv-explorer .qx-body { display: flex; flex-wrap: wrap; gap: 14px; padding: 14px 18px; align-items: flex-start; }
.qkv-explorer section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; min-width: 0; }
.qkv-explorer .qx-side { flex: 1 1 300px; max-width: 100%; }
.qkv-explorer .qx-main { flex: 3 1 420px; max-width: 100%; }
.qkv-explorer .qx-row { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: 0 0 8px; }
.qkv-explorer select, .qkv-explorer button { font: inherit; }
.qkv-explorer .qx-heads button { min-width: 2.2em; padding: 2px 6px; border: 1px solid var(--line);
  background: #fff; border-radius: 4px; cursor: pointer; }
.qkv-explorer .qx-heads button[aria-pressed="true"] { background: var(--accent); color: #fff; border-color: var(--accent); }
.qkv-explorer .qx-legend canvas { width: 100%; max-width: 260px; height: 12px; display: block; border: 1px solid var(--line); }
.qkv-explorer .qx-legend .qx-ends { display: flex; justify-content: space-between; max-width: 260px; font-size: 12px; }
.qkv-explorer .qx-swatch { display: inline-block; width: 12px; height: 12px; background: #d9d9d9; vertical-align: middle; border: 1px solid var(--line); }
.qkv-explorer ul.qx-keys { list-style: none; padding: 0; font-size: 12px; margin: 4px 0 8px; color: var(--muted); }
.qkv-explorer ul.qx-keys kbd { color: var(--ink); }
.qkv-explorer kbd { font: 11px ui-monospace, Menlo, monospace; border: 1px solid var(--line); border-radius: 3px; padding: 0 3px; background: #f4f5f8; }
.qkv-explorer .qx-grid { max-height: 60vh; overflow: auto; }
.qkv-explorer .qx-gridrow { display: flex; gap: 4px; align-items: flex-start; margin: 0 0 4px; }
.qkv-explorer .qx-gridrow > span { flex: none; width: 4.6em; font-size: 11px; color: var(--muted); text-align: right; padding: 8px 2px 0 0; }
.qkv-explorer .qx-thumbs { display: flex; flex-wrap: wrap; gap: 3px; min-width: 0; }
.qkv-explorer button.qx-thumb { padding: 0; border: 2px solid #e3e7ef; border-radius: 3px; background: #fff; cursor: pointer; line-height: 0; }
.qkv-explorer button.qx-thumb:hover { border-color: #9db7e0; }
.qkv-explorer button.qx-thumb.selected { border-color: var(--focus); }
.qkv-explorer button.qx-thumb canvas { width: 30px; height: 30px; image-rendering: pixelated; }
.qkv-explorer .qx-title { font-size: 15px; margin: 0 0 2px; }
.qkv-explorer .qx-summary { min-height: 1.4em; margin: 0 0 8px; }
.qkv-explorer ol.qx-topk { margin: 0 0 10px; padding: 0; list-style: none; }
.qkv-explorer ol.qx-topk li { display: grid; grid-template-columns: minmax(5em, 11em) 1fr 4.2em; gap: 6px; align-items: center; font-size: 13px; }
.qkv-explorer ol.qx-topk button { text-align: left; border: 0; background: none; padding: 1px 2px; cursor: pointer;
  font-family: ui-monospace, Menlo, monospace; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.qkv-explorer .qx-bar { height: 10px; background: #eef1f6; border-radius: 2px; overflow: hidden; }
.qkv-explorer .qx-bar > span { display: block; height: 100%; }
.qkv-explorer .qx-list { max-height: 46vh; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.qkv-explorer .qx-tok { display: grid; grid-template-columns: 3.4em minmax(4em, 12em) 1fr 4.6em; gap: 6px; align-items: center;
  padding: 1px 6px; font-family: ui-monospace, Menlo, monospace; font-size: 12px; cursor: pointer; }
.qkv-explorer .qx-tok > .qx-i { color: var(--muted); text-align: right; }
.qkv-explorer .qx-tok > .qx-t { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.qkv-explorer .qx-tok > .qx-w { text-align: right; }
.qkv-explorer .qx-tok.focusword > .qx-t { color: var(--focus); font-weight: 700; }
.qkv-explorer .qx-tok.selected { background: #dbe7f8; }
.qkv-explorer .qx-tok.masked { color: #9aa0ac; }
.qkv-explorer .qx-tok.masked .qx-bar { background: repeating-linear-gradient(45deg, #e6e6e6 0 4px, #f5f5f5 4px 8px); }
.qkv-explorer canvas.qx-matrix { display: block; width: 100%; max-width: 520px; height: auto; margin-top: 10px;
  image-rendering: pixelated; border: 1px solid var(--line); cursor: crosshair; }
"""

# The page's code, in plain ES2017 (no libraries). qkvExplorer(root, page) builds the
# widget inside ``root`` from the JSON in its script.qkv-data; ``page`` makes keys work
# anywhere on the page (in a notebook they work while the widget has the focus, so
# Jupyter's own shortcuts are left alone).
_SCRIPT = r"""
function qkvExplorer(root, page) {
  "use strict";
  const data = JSON.parse(root.querySelector("script.qkv-data").textContent);
  const tokens = data.tokens, L = tokens.length, causal = data.causal;
  const LEVEL = 1 / data.encoding.levels, TOPK = data.encoding.kind === "top" ? data.encoding.k : 0;
  const VMAX = data.scale.vmax;
  const focus = data.focus.positions.slice();
  const focusSet = new Set(focus);
  const uid = root.id || "qkv";
  // matplotlib's "Blues" is these nine ColorBrewer colours, evenly spaced: the PNGs' map.
  const BLUES = [[247,251,255],[222,235,247],[198,219,239],[158,202,225],[107,174,214],
                 [66,146,198],[33,113,181],[8,81,156],[8,48,107]];
  const LUT = [];
  for (let i = 0; i < 256; i++) {
    const t = i / 255 * 8, a = Math.min(7, Math.floor(t)), f = t - a;
    LUT.push(BLUES[a].map((c, k) => Math.round(c + f * (BLUES[a + 1][k] - c))));
  }
  const MASKED = [217, 217, 217];
  function shade(w) { return LUT[Math.max(0, Math.min(255, Math.floor(w / VMAX * 255)))]; }
  function css(rgb) { return "rgb(" + rgb.join(",") + ")"; }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function u16(b64) {
    const s = atob(b64), out = new Uint16Array(s.length >> 1);
    for (let i = 0; i < out.length; i++) out[i] = s.charCodeAt(2 * i) | (s.charCodeAt(2 * i + 1) << 8);
    return out;
  }

  // ---- weights: value >= 0, -1 = masked (a causal token cannot see it), NaN = not stored
  const cache = new Map();
  function matrix(stage, m) {
    const key = stage + ":" + m;
    if (!cache.has(key)) cache.set(key, u16(data.stages[stage].matrices[m]));
    return cache.get(key);
  }
  const rowStart = i => causal ? i * (i + 1) / 2 : i * L;
  function row(stage, m, i) {
    const v = matrix(stage, m), out = new Float64Array(L);
    for (let j = 0; j < L; j++) out[j] = causal && j > i ? -1 : (TOPK ? NaN : 0);
    if (!TOPK) {
      const s = rowStart(i), n = causal ? i + 1 : L;
      for (let j = 0; j < n; j++) out[j] = v[s + j] * LEVEL;
    } else {
      for (let r = 0; r < TOPK; r++) {
        const j = v[i * TOPK + r];
        if (j < L) out[j] = v[L * TOPK + i * TOPK + r] * LEVEL;
      }
    }
    return out;
  }
  function column(stage, m, j) {
    const v = matrix(stage, m), out = new Float64Array(L);
    for (let i = 0; i < L; i++) out[i] = causal && j > i ? -1 : (TOPK ? NaN : 0);
    if (!TOPK) {
      for (let i = causal ? j : 0; i < L; i++) out[i] = v[rowStart(i) + j] * LEVEL;
    } else {
      for (let i = 0; i < L; i++) for (let r = 0; r < TOPK; r++) {
        if (v[i * TOPK + r] === j) out[i] = v[L * TOPK + i * TOPK + r] * LEVEL;
      }
    }
    return out;
  }
  function focusRow(stage, m) {
    const f = u16(data.stages[stage].focus), out = new Float64Array(L), last = Math.max.apply(null, focus);
    for (let j = 0; j < L; j++) out[j] = causal && j > last ? -1 : f[m * L + j] * LEVEL;
    return out;
  }
  // Paint a matrix into an (n * cell)-pixel square: each of the n x n blocks shows the
  // mean weight of its cells (keys a causal row cannot see do not count; a block of
  // such keys only is grey). The mean keeps long texts honest: the largest weight of
  // a 33 x 33 block of random rows would paint every block dark.
  function paint(canvas, stage, m, n, cell) {
    cell = cell || 1;
    canvas.width = n * cell; canvas.height = n * cell;
    const sum = new Float64Array(n * n), count = new Float64Array(n * n), v = matrix(stage, m);
    const startOf = pj => Math.ceil(pj * L / n);
    for (let i = 0; i < L; i++) {
      const pi = Math.floor(i * n / L), lim = causal ? i : L - 1;
      for (let pj = 0; pj < n; pj++) {
        const lo = startOf(pj), hi = Math.min(startOf(pj + 1) - 1, lim);
        if (hi >= lo) count[pi * n + pj] += hi - lo + 1;
      }
      if (!TOPK) {
        const s = rowStart(i);
        for (let j = 0; j <= lim; j++) sum[pi * n + Math.floor(j * n / L)] += v[s + j] * LEVEL;
      } else {
        for (let r = 0; r < TOPK; r++) {
          const j = v[i * TOPK + r];
          if (j < L) sum[pi * n + Math.floor(j * n / L)] += v[L * TOPK + i * TOPK + r] * LEVEL;
        }
      }
    }
    const best = new Float64Array(n * n);
    for (let k = 0; k < n * n; k++) best[k] = count[k] ? sum[k] / count[k] : -1;
    const side = n * cell, ctx = canvas.getContext("2d"), img = ctx.createImageData(side, side);
    for (let y = 0; y < side; y++) for (let x = 0; x < side; x++) {
      const k = Math.floor(y / cell) * n + Math.floor(x / cell), c = best[k] < 0 ? MASKED : shade(best[k]), o = 4 * (y * side + x);
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  // ---- state -------------------------------------------------------------------------
  const state = { stage: data.initial.stage, head: data.initial.head, sel: focus.slice(), dir: "from" };
  const heads = s => data.stages[s].heads;
  const isFocus = () => state.sel.length === focus.length && state.sel.every((p, i) => p === focus[i]);
  function stageTitle(s, h) {
    const st = data.stages[s];
    if (heads(s) === 1) return st.label === "untrained baseline" ? "Untrained baseline (one head: q = k = v = x)" : st.label + " (one head)";
    const name = st.label.charAt(0).toUpperCase() + st.label.slice(1);
    return name + " \u00b7 " + (h === 0 ? "average of " + heads(s) + " heads" : "head " + h);
  }
  function selName() {
    if (isFocus()) {
      const pieces = focus.map(p => tokens[p]).join(" ");
      return data.focus.label + (focus.length > 1 ? " (pieces " + pieces + ", rows averaged as on the command line)" : " (token " + focus[0] + ")");
    }
    return "\u201c" + tokens[state.sel[0]] + "\u201d (token " + state.sel[0] + ")";
  }
  // The vector shown: the selected token's row ("from") or the column of weights that
  // every token puts on it ("to"; for the focus word, summed over its pieces).
  function vector() {
    const m = state.head;
    if (state.dir === "from") {
      if (isFocus()) return focusRow(state.stage, m);
      return row(state.stage, m, state.sel[0]);
    }
    const out = new Float64Array(L);
    state.sel.forEach(j => {
      const c = column(state.stage, m, j);
      for (let i = 0; i < L; i++) out[i] = c[i] < 0 || out[i] < 0 ? -1 : out[i] + c[i];
    });
    return out;
  }

  // ---- layout --------------------------------------------------------------------------
  const dataScript = root.querySelector("script.qkv-data");
  const top = el("div", "qx-top-bar");
  const h1 = el("h1", null, "Attention explorer \u00b7 " + data.model);
  const text = el("p", "qx-text", "\u201c" + data.text + "\u201d");
  const info = el("p", "qx-muted");
  info.textContent = "Focus: " + data.focus.label + " \u00b7 " + L + " tokens \u00b7 " +
    (data.stages.length - 1) + " layers" + (causal ? " \u00b7 causal: each token looks back at itself and earlier tokens only" : "") +
    (TOPK ? " \u00b7 long text: each row keeps its " + TOPK + " strongest keys, lighter ones are not stored" : "");
  top.append(h1, text, info);
  const body = el("div", "qx-body");
  const side = el("section", "qx-side"), main = el("section", "qx-main");
  body.append(side, main);
  root.append(top, body);
  root.appendChild(dataScript);

  // controls: stage, heads, direction, focus
  const stageRow = el("div", "qx-row");
  const stageLabel = el("label", null, "Stage ");
  const stageSelect = el("select", "qx-stage");
  data.stages.forEach((s, i) => { const o = el("option", null, s.label); o.value = i; stageSelect.appendChild(o); });
  stageLabel.appendChild(stageSelect);
  const focusButton = el("button", "qx-focus", "Focus word");
  focusButton.type = "button";
  stageRow.append(stageLabel, focusButton);
  const headRow = el("div", "qx-row qx-heads");
  headRow.setAttribute("role", "group");
  headRow.setAttribute("aria-label", "heads");
  const dirRow = el("div", "qx-row qx-dir");
  dirRow.setAttribute("role", "radiogroup");
  const dirs = [["from", causal ? "what it looks back at" : "what it attends to"],
                ["to", causal ? "what looks back at it" : "what attends to it"]];
  const dirInputs = dirs.map(([value, label]) => {
    const lab = el("label"), input = el("input");
    input.type = "radio"; input.name = uid + "-dir"; input.value = value;
    input.addEventListener("change", () => { state.dir = value; renderView(); });
    lab.append(input, document.createTextNode(" " + label));
    dirRow.appendChild(lab);
    return input;
  });
  // legend
  const legend = el("div", "qx-legend");
  legend.appendChild(el("h2", null, "Colour scale"));
  const ramp = el("canvas"); ramp.width = 256; ramp.height = 1;
  { const c = ramp.getContext("2d"); for (let i = 0; i < 256; i++) { c.fillStyle = css(LUT[i]); c.fillRect(i, 0, 1, 1); } }
  const ends = el("div", "qx-ends");
  ends.append(el("span", null, "0"), el("span", null, "\u2265 " + VMAX));
  legend.append(ramp, ends, el("p", "qx-hint qx-scale", data.scale.label + "; the same scale as the PNG heatmaps. Bars use it too."));
  if (causal) {
    const p = el("p", "qx-hint");
    p.append(el("span", "qx-swatch"), document.createTextNode(" masked: a causal model cannot look at later tokens"));
    legend.appendChild(p);
  }
  // keyboard help
  const keys = el("ul", "qx-keys");
  [["Tab", "moves between the controls, the token list and the heads"],
   ["\u2191 \u2193", "previous / next token (in the token list)"],
   ["PgUp PgDn Home End", "10 tokens up / down, first / last"],
   ["[ ]", "previous / next layer"],
   ["- =", "previous / next head (avg first)"],
   ["d", "switches direction"],
   ["f", "back to the focus word"]].forEach(([k, what]) => {
    const li = el("li");
    k.split(" ").forEach(part => { li.appendChild(el("kbd", null, part)); li.append(" "); });
    li.append(what);
    keys.appendChild(li);
  });
  const keysBox = el("details", "qx-keyhelp");
  keysBox.open = true;
  keysBox.append(el("summary", null, "Keyboard"), keys);
  // grid
  const gridHead = el("h2", null, "Every layer and head");
  const gridHint = el("p", "qx-hint", "One row per stage: the untrained baseline (q = k = v = input embeddings, no projections), then the trained layers. First thumbnail: the average of the heads.");
  const grid = el("div", "qx-grid");
  data.stages.forEach((s, stage) => {
    const r = el("div", "qx-gridrow");
    r.appendChild(el("span", null, stage === 0 && s.label === "untrained baseline" ? "baseline" : s.label));
    const thumbs = el("div", "qx-thumbs");
    r.appendChild(thumbs);
    const count = s.heads === 1 ? 1 : s.heads + 1;
    for (let m = 0; m < count; m++) {
      const b = el("button", "qx-thumb");
      b.type = "button"; b.dataset.stage = stage; b.dataset.head = m;
      const name = s.label + ", " + (s.heads === 1 ? "one head" : m === 0 ? "average of the heads" : "head " + m);
      b.title = name; b.setAttribute("aria-label", name);
      const c = el("canvas"); paint(c, stage, m, Math.min(L, 30));
      b.appendChild(c);
      b.addEventListener("click", () => select(stage, m));
      thumbs.appendChild(b);
    }
    grid.appendChild(r);
  });
  side.append(el("h2", null, "Choose"), stageRow, headRow, dirRow, legend, gridHead, gridHint, grid, keysBox);

  // main view
  const title = el("h2", "qx-title"), summary = el("p", "qx-summary");
  const topk = el("ol", "qx-topk");
  const listHint = el("p", "qx-hint", "Every token: click one, or tab here and use \u2191 \u2193.");
  const list = el("div", "qx-list");
  list.tabIndex = 0;
  list.setAttribute("role", "listbox");
  list.setAttribute("aria-label", "tokens");
  const rows = tokens.map((t, i) => {
    const r = el("div", "qx-tok" + (focusSet.has(i) ? " focusword" : ""));
    r.id = uid + "-tok-" + i; r.dataset.index = i; r.setAttribute("role", "option");
    const bar = el("span", "qx-bar"), fill = el("span");
    bar.appendChild(fill);
    r.append(el("span", "qx-i", String(i)), el("span", "qx-t", t), bar, el("span", "qx-w"));
    r.title = t;
    r.addEventListener("click", () => { setSel([i]); list.focus({ preventScroll: true }); });
    list.appendChild(r);
    return { r, fill, w: r.lastChild };
  });
  const canvas = el("canvas", "qx-matrix");
  canvas.setAttribute("aria-label", "the selected head's weights: rows are queries, columns keys; click a row to select it");
  const matrixHint = el("p", "qx-hint", "The selected head: rows look at columns. Click a row to select that token.");
  main.append(title, summary, topk, listHint, list, matrixHint, canvas);

  // ---- behaviour -----------------------------------------------------------------------
  function select(stage, m) {
    state.stage = Math.max(0, Math.min(data.stages.length - 1, stage));
    state.head = heads(state.stage) === 1 ? 0 : Math.max(0, Math.min(heads(state.stage), m));
    stageSelect.value = String(state.stage);
    headRow.textContent = "";
    const count = heads(state.stage) === 1 ? 1 : heads(state.stage) + 1;
    for (let h = 0; h < count; h++) {
      const b = el("button", null, count === 1 ? "one head" : h === 0 ? "avg" : String(h));
      b.type = "button"; b.dataset.head = h;
      b.setAttribute("aria-pressed", String(h === state.head));
      b.setAttribute("aria-label", count === 1 ? "the only head" : h === 0 ? "average of the heads" : "head " + h);
      b.addEventListener("click", () => select(state.stage, h));
      headRow.appendChild(b);
    }
    grid.querySelectorAll("button.qx-thumb").forEach(b => {
      const on = +b.dataset.stage === state.stage && +b.dataset.head === state.head;
      b.classList.toggle("selected", on);
      b.setAttribute("aria-pressed", String(on));
    });
    const n = Math.min(L, 520);
    paint(canvas, state.stage, state.head, n, Math.max(1, Math.floor(360 / n)));  // sharp marker lines
    matrixImage = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    renderView();
  }
  let matrixImage = null;
  function setSel(positions) { state.sel = positions; renderView(); scrollToSel(); }
  function scrollToSel() {
    const r = rows[state.sel[0]].r;
    const lt = list.scrollTop, lh = list.clientHeight, top = r.offsetTop - list.offsetTop;
    if (top < lt) list.scrollTop = top;
    else if (top + r.offsetHeight > lt + lh) list.scrollTop = top + r.offsetHeight - lh;
  }
  function fmt(w) { return w.toFixed(3); }
  function renderView() {
    const v = vector(), from = state.dir === "from";
    dirInputs.forEach(inp => { inp.checked = inp.value === state.dir; });
    title.textContent = stageTitle(state.stage, state.head);
    const selSet = new Set(state.sel);
    list.setAttribute("aria-activedescendant", uid + "-tok-" + state.sel[0]);
    rows.forEach(({ r, fill, w }, i) => {
      const x = v[i], masked = x < 0, unknown = Number.isNaN(x);
      r.classList.toggle("selected", selSet.has(i));
      r.setAttribute("aria-selected", String(selSet.has(i)));
      r.classList.toggle("masked", masked);
      if (masked || unknown) { delete r.dataset.weight; } else { r.dataset.weight = x; }
      r.dataset.state = masked ? "masked" : unknown ? "not stored" : "weight";
      w.textContent = masked ? "masked" : unknown ? "\u00b7" : fmt(x);
      fill.style.width = masked || unknown ? "0" : Math.min(100, 100 * x / VMAX) + "%";
      fill.style.background = masked || unknown ? "none" : css(shade(Math.max(x, VMAX * 0.35)));
    });
    const order = [];
    for (let i = 0; i < L; i++) if (v[i] >= 0) order.push(i);
    order.sort((a, b) => v[b] - v[a]);
    topk.textContent = "";
    order.slice(0, 10).forEach(i => {
      const li = el("li"), b = el("button", null, i + ": " + tokens[i]), bar = el("span", "qx-bar"), fill = el("span");
      b.type = "button"; b.dataset.index = i; b.title = tokens[i];
      b.addEventListener("click", () => setSel([i]));
      fill.style.width = Math.min(100, 100 * v[i] / VMAX) + "%"; fill.style.background = css(shade(Math.max(v[i], VMAX * 0.35)));
      bar.appendChild(fill);
      li.dataset.index = i; li.dataset.weight = v[i];
      li.append(b, bar, el("span", "qx-w", fmt(v[i])));
      topk.appendChild(li);
    });
    const best = order.slice(0, 3).map(i => tokens[i] + " (" + v[i].toFixed(2) + ")").join(", ");
    const who = selName();
    let sentence;
    if (from) sentence = who + (causal ? " looks back most at " : " attends most to ") + best;
    else sentence = (causal ? "Later tokens that look back most at " : "Tokens that attend most to ") + who + ": " + best;
    if (TOPK && !(from && isFocus())) {
      let kept = 0; for (let i = 0; i < L; i++) if (v[i] > 0) kept += v[i];
      sentence += from ? " \u00b7 the stored keys hold " + kept.toFixed(2) + " of its weight" : " \u00b7 from the tokens that keep it among their " + TOPK + " strongest keys";
    }
    summary.textContent = sentence;
    drawMarker();
  }
  function drawMarker() {
    const ctx = canvas.getContext("2d"), n = canvas.width;
    if (matrixImage) ctx.putImageData(matrixImage, 0, 0);
    ctx.strokeStyle = "#d62728";
    ctx.lineWidth = Math.max(2, n / 180);
    const a = Math.floor(Math.min.apply(null, state.sel) * n / L), b = Math.ceil((Math.max.apply(null, state.sel) + 1) * n / L);
    if (state.dir === "from") ctx.strokeRect(0, a, n, Math.max(1, b - a));
    else ctx.strokeRect(a, 0, Math.max(1, b - a), n);
  }
  canvas.addEventListener("click", e => {
    const box = canvas.getBoundingClientRect();
    const y = Math.floor((e.clientY - box.top) / box.height * L), x = Math.floor((e.clientX - box.left) / box.width * L);
    const i = Math.max(0, Math.min(L - 1, state.dir === "from" ? y : x));
    setSel([i]);
  });
  stageSelect.addEventListener("change", () => select(+stageSelect.value, state.head));
  focusButton.addEventListener("click", () => setSel(focus.slice()));

  function moveSel(key) {
    const lo = Math.min.apply(null, state.sel), hi = Math.max.apply(null, state.sel);
    const to = { ArrowDown: hi + 1, ArrowUp: lo - 1, PageDown: hi + 10, PageUp: lo - 10, Home: 0, End: L - 1 }[key];
    setSel([Math.max(0, Math.min(L - 1, to))]);
  }
  function onKey(e) {
    if (e.altKey || e.ctrlKey || e.metaKey || e.defaultPrevented) return;
    if (page && !root.contains(e.target) && e.target !== document.body) return;
    const inList = e.target === list;
    let done = true;
    switch (e.key) {
      case "ArrowDown": case "ArrowUp": case "PageDown": case "PageUp": case "Home": case "End":
        if (inList) moveSel(e.key); else done = false;
        break;
      case "[": select(state.stage - 1, state.head); break;
      case "]": select(state.stage + 1, state.head); break;
      case "-": case "_": select(state.stage, state.head - 1); break;
      case "=": case "+": select(state.stage, state.head + 1); break;
      case "d": case "D": state.dir = state.dir === "from" ? "to" : "from"; renderView(); break;
      case "f": case "F": setSel(focus.slice()); break;
      default: done = false;
    }
    if (done) e.preventDefault();
  }
  (page ? document : root).addEventListener("keydown", onKey);

  select(state.stage, state.head);
  scrollToSel();
  root.dataset.ready = "1";
}
"""
