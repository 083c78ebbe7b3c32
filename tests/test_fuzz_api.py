"""Property-based fuzz of ``qkv.scaled_dot_product_attention`` over the backend registry.

Part A, valid calls: random shapes (0-2 batch dims, grouped heads, lengths 1-70,
d_k != d_v), dtypes, bool/float masks of random broadcast shapes (float masks with
values up to -1e5 or float32's most negative number, in float32 or float64 beside
half inputs), causal, sliding windows, scales, weights (rows, head averages) and rows
with no allowed key. Every registered backend that is available and whose
``supports()`` accepts the request runs it, and so does ``"auto"``; each must match a
float64 softmax written out below, independently of qkv:

* float64/float32: within a bound that grows with the rounding unit, the size of the
  scores a row really uses (|score| + |mask|), and the sizes of the terms summed;
* float16/bfloat16: error against float64 at most 2x the error of the same formula
  run in that dtype the way the reference backend specifies (scores and softmax in
  float32, weights rounded to the dtype before ``weights @ v``), plus one rounding;
* always: finite outputs, weights and gradients; exact zeros for rows with no key.

A subset also backpropagates (into q, k, v, and a float mask when the backend takes
one with a gradient) and compares dq, dk, dv (and d mask) the same way.

Part B, invalid calls: one argument is broken at a time; qkv must raise ValueError or
TypeError whose message names that argument (as a whole word).

Examples are drawn deterministically (``derandomize=True``), so CI runs the same cases.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qkv
from qkv.backends import backends, choose_backend, make_request
from support import refusal, registry_backend_names

# Registered backends usable on the CPU in this process; "auto" is added per call.
BACKENDS = registry_backend_names(include_auto=False)
HALF = (torch.float16, torch.bfloat16)
F32_MIN = torch.finfo(torch.float32).min

VALID = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
INVALID = settings(max_examples=250, deadline=None, derandomize=True, database=None)


# ====================================================================== valid calls


@dataclass(frozen=True)
class Case:
    """One valid call, small enough to read in a failure report (tensors come from ``seed``)."""

    batch: tuple[int, ...]
    H: int
    H_kv: int
    L: int
    S: int
    d_k: int
    d_v: int
    dtype: torch.dtype
    values: str  # "randn": N(0, magnitude²) · "const": every entry of q, k, v = magnitude
    magnitude: float
    scale: float | None = None
    enable_gqa: bool = False
    is_causal: bool = False
    window: int | None = None
    mask: str = "none"  # "none" | "bool" | "float"
    mask_shape: tuple[int, ...] = ()
    mask_dtype: torch.dtype | None = None
    mask_values: str = "randn"  # float masks: "randn" | "pm100" | "neg1e5" | "f32min"
    dead_rows: tuple[int, ...] = ()  # rows whose every key the mask forbids (or shifts)
    need_weights: bool = False
    weight_rows: tuple[int, ...] | None = None
    rows_as_tensor: bool = False
    average_heads: bool = False
    grads: bool = False
    mask_grad: bool = False
    seed: int = 0


def _mask_shape(draw, target: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``target`` = (..., H, L, S): S last, L or 1, then 1 or equal."""
    ndim = draw(st.integers(2, len(target)))
    lead = [draw(st.sampled_from([1, n])) for n in target[len(target) - ndim : -2]]
    return (*lead, draw(st.sampled_from([1, target[-2]])), target[-1])


@st.composite
def cases(draw, *, grads: bool) -> Case:
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    H = draw(st.sampled_from([1, 2, 4]))
    H_kv = draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]))
    lengths = st.one_of(st.integers(1, 70), st.sampled_from([1, 2, 16, 17, 33, 64, 65]))
    L, S = draw(lengths), draw(lengths)
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    values = draw(st.sampled_from(["randn", "randn", "randn", "const"]))
    magnitude = draw(st.sampled_from([1.0, 1.0, 0.5, 10.0, 40.0]))
    mask = draw(st.sampled_from(["none", "bool", "float"]))
    # is_causal beside an explicit mask is refused when L != S (see Part B)
    is_causal = draw(st.booleans()) if mask == "none" or L == S else False
    case = Case(
        batch=batch,
        H=H,
        H_kv=H_kv,
        L=L,
        S=S,
        d_k=draw(st.integers(1, 40)),
        d_v=draw(st.integers(1, 40)),
        dtype=dtype,
        values=values,
        magnitude=magnitude,
        scale=draw(st.sampled_from([None, None, 1e-3, 0.05, 0.5, 1.0, 4.0, 30.0])),
        enable_gqa=H_kv != H or draw(st.booleans()),
        is_causal=is_causal,
        window=draw(st.one_of(st.none(), st.integers(1, 80))),
        mask=mask,
        grads=grads,
        seed=draw(st.integers(0, 2**20)),
    )
    if mask != "none":
        target = (*batch, H, L, S)
        fdtypes = [torch.float32, torch.float64, dtype]
        case = replace(
            case,
            mask_shape=_mask_shape(draw, target),
            mask_dtype=torch.bool if mask == "bool" else draw(st.sampled_from(fdtypes)),
            # a row whose scores a float32-min bias absorbs has uniform weights, but no
            # defined gradient (finite differences: 0; autograd of the formula: the softmax
            # Jacobian; log-sum-exp kernels: n times that), so gradients skip that bias
            mask_values=draw(
                st.sampled_from(["randn", "pm100", "neg1e5", *([] if grads else ["f32min"])])
            ),
            dead_rows=tuple(draw(st.lists(st.integers(0, L - 1), max_size=2))),
            mask_grad=mask == "float" and grads and draw(st.sampled_from([False, False, True])),
        )
    if draw(st.booleans()):
        rows = draw(st.one_of(st.none(), st.lists(st.integers(-L, L - 1), min_size=1, max_size=4)))
        case = replace(
            case,
            need_weights=True,
            weight_rows=None if rows is None else tuple(rows),
            rows_as_tensor=draw(st.booleans()),
            average_heads=draw(st.booleans()),
        )
    return case


def _inputs(c: Case):
    """float64 q, k, v and the mask (in its own dtype, as the caller passes it)."""
    g = torch.Generator().manual_seed(c.seed)
    shapes = [(*c.batch, c.H, c.L, c.d_k), (*c.batch, c.H_kv, c.S, c.d_k)]
    shapes.append((*c.batch, c.H_kv, c.S, c.d_v))
    if c.values == "const":
        q, k, v = (torch.full(s, c.magnitude, dtype=torch.float64) for s in shapes)
    else:
        q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) * c.magnitude for s in shapes)
    if c.mask == "none":
        return q, k, v, None
    keep = torch.rand(c.mask_shape, generator=g) > 0.3
    if c.mask == "bool":
        for row in c.dead_rows:
            keep[..., row % c.mask_shape[-2], :] = False
        return q, k, v, keep
    if c.mask_values == "randn":
        m = torch.randn(c.mask_shape, generator=g, dtype=torch.float64)
        m = m.masked_fill(~keep, -math.inf)
    elif c.mask_values == "pm100":
        choice = torch.randint(0, 3, c.mask_shape, generator=g)
        m = torch.tensor([-100.0, 0.0, 100.0], dtype=torch.float64)[choice]
        m = m.masked_fill(~keep, -math.inf)
    else:  # large finite negatives instead of -inf: a row of them is a shift, not a dead row
        big = -1e5 if c.mask_values == "neg1e5" else F32_MIN
        m = torch.zeros(c.mask_shape, dtype=torch.float64).masked_fill(~keep, big)
    fill = {"randn": -math.inf, "pm100": -math.inf, "neg1e5": -1e5, "f32min": F32_MIN}
    for row in c.dead_rows:
        m[..., row % c.mask_shape[-2], :] = fill[c.mask_values]
    return q, k, v, m.to(c.mask_dtype)


def _structural(c: Case) -> torch.Tensor:
    """(L, S) bool: causal and window, bottom-right aligned (query i sits at key i + S - L)."""
    diff = torch.arange(c.S).unsqueeze(0) - (torch.arange(c.L).unsqueeze(1) + c.S - c.L)
    allowed = torch.ones(c.L, c.S, dtype=torch.bool)
    if c.is_causal:
        allowed &= diff <= 0
    if c.window is not None:
        allowed &= diff > -c.window if c.is_causal else diff.abs() < c.window
    return allowed


def _rows(c: Case) -> list[int] | None:
    return None if c.weight_rows is None else [r % c.L for r in c.weight_rows]


def _select(w: torch.Tensor, c: Case) -> torch.Tensor:
    """Full weights (..., H, L, S) -> what the call returns: chosen rows, head average."""
    if c.weight_rows is not None:
        w = w[..., _rows(c), :]
    return w.mean(dim=-3) if c.average_heads else w


def softmax_attention(q, k, v, mask, c: Case, compute: torch.dtype):
    """softmax(q kᵀ scale + mask) v with scores and softmax in ``compute``.

    The weights are rounded to v's dtype before ``weights @ v`` (a no-op in float64).
    Rows with no allowed key give zero weights and zero output, and no NaN gradient.
    Returns output, selected weights, and the float64 diagnostics used for tolerances.
    """
    group = c.H // c.H_kv
    k_h = k.repeat_interleave(group, dim=-3)  # query head h reads key/value head h // group
    v_h = v.repeat_interleave(group, dim=-3)
    scale = 1 / math.sqrt(c.d_k) if c.scale is None else c.scale
    s = torch.einsum("...ld,...sd->...ls", q.to(compute), k_h.to(compute)) * scale
    allowed = _structural(c).expand(s.shape)
    t = s
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        t = s + mask.to(compute)
        allowed = allowed & (mask > -math.inf)
    t = t.masked_fill(~allowed, -math.inf)
    live = allowed.any(dim=-1, keepdim=True)
    shift = torch.where(live, t.amax(dim=-1, keepdim=True), torch.zeros_like(s[..., :1])).detach()
    p = torch.exp(t - shift)
    w = p / (p.sum(dim=-1, keepdim=True) + (~live).to(p.dtype))
    out = torch.einsum("...ls,...sd->...ld", w.to(v.dtype), v_h)
    info = {"s": s.detach(), "t": t.detach(), "allowed": allowed, "w": w.detach(), "v_h": v_h}
    return out, _select(w, c).to(v.dtype), info


def _kwargs(c: Case, mask) -> dict:
    """The keyword arguments of the call ``c`` describes (``backend`` aside)."""
    kwargs = {
        "attn_mask": mask,
        "is_causal": c.is_causal,
        "scale": c.scale,
        "enable_gqa": c.enable_gqa,
        "window": c.window,
    }
    if c.need_weights:
        rows = c.weight_rows
        if rows is not None and c.rows_as_tensor:
            rows = torch.tensor(rows)
        elif rows is not None:
            rows = list(rows)
        kwargs |= {"need_weights": True, "weight_rows": rows, "average_heads": c.average_heads}
    return kwargs


def _run(c: Case, q64, k64, v64, mask, dtype, fn):
    """Leaves in ``dtype`` (with gradients when asked), ``fn`` on them, and the gradients."""
    q, k, v = (t.detach().to(dtype).requires_grad_(c.grads) for t in (q64, k64, v64))
    m = mask
    if mask is not None and c.mask_grad:
        m = mask.detach().clone().requires_grad_(True)
    out, weights = fn(q, k, v, m)
    grads = {}
    if c.grads:
        g = torch.Generator().manual_seed(c.seed + 1)
        loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
        if weights is not None:
            gw = torch.randn(weights.shape, generator=g, dtype=torch.float64)
            loss = loss + (weights.double() * gw).sum()
        loss.backward()
        grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
        if c.mask_grad:
            grads["dmask"] = m.grad
    return out.detach(), None if weights is None else weights.detach(), grads


def _grad_bounds(c: Case, info, q64, k64, gw_full):
    """Sizes of the terms each gradient sums (all non-negative), for the float32/64 bound."""
    g = torch.Generator().manual_seed(c.seed + 1)
    out_shape = (*c.batch, c.H, c.L, c.d_v)
    g_out = torch.randn(out_shape, generator=g, dtype=torch.float64).abs()
    w, v_h = info["w"], info["v_h"].abs()
    dp = g_out @ v_h.transpose(-2, -1)  # |dO| |V|ᵀ
    a = w * (dp + (w * dp).sum(-1, keepdim=True))
    if gw_full is not None:
        gw = gw_full.abs()
        a = a + w * (gw + (w * gw).sum(-1, keepdim=True))
    scale = 1 / math.sqrt(c.d_k) if c.scale is None else c.scale
    group = c.H // c.H_kv
    k_h = k64.repeat_interleave(group, dim=-3).abs()

    def per_kv(x):  # (..., H, S, d) -> (..., H_kv, S, d): a kv head serves `group` query heads
        return x.unflatten(-3, (c.H_kv, group)).sum(-3)

    bounds = {
        "dq": scale * (a @ k_h),
        "dk": per_kv(scale * (a.transpose(-2, -1) @ q64.abs())),
        "dv": per_kv(w.transpose(-2, -1) @ g_out),
    }
    if c.mask_grad:
        bounds["dmask"] = a
    return {name: b.max().item() for name, b in bounds.items()}


def _assert_finite(name: str, t: torch.Tensor, who: str):
    assert torch.isfinite(t.double()).all(), f"{who}: non-finite values in {name}"


def _check_valid(c: Case) -> None:
    q64, k64, v64, mask = _inputs(c)
    dtype = c.dtype

    def ours(compute):
        def fn(q, k, v, m):
            out, w, _ = softmax_attention(q, k, v, m, c, compute)
            return out, (w if c.need_weights else None)

        return fn

    # float64 truth (on the float64 inputs), with its diagnostics
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    exact_out, exact_w, exact_g = _run(c, q64, k64, v64, m64, torch.float64, ours(torch.float64))
    with torch.no_grad():
        _, _, info = softmax_attention(q64, k64, v64, m64, c, torch.float64)
    allowed, w_full = info["allowed"], info["w"]
    # the size of the scores each row really uses: |score| + |mask| over keys within e^-40
    # of the row's best (a float32-min mask entry is absorbed exactly in either precision)
    t = info["t"]
    m_abs = (t - info["s"]).abs()
    m_abs = torch.where(m_abs < 1e20, m_abs, torch.zeros_like(m_abs))
    used = allowed & (t >= t.amax(-1, keepdim=True) - 40)
    mag = torch.where(used, info["s"].abs() + m_abs, torch.zeros_like(t)).amax(-1)  # (..., H, L)
    dead = ~allowed.any(-1)  # (..., H, L)

    low, rounding_in = {}, {}
    if dtype in HALF:
        # the formula in this dtype (the reference backend's recipe) and the float64 answer
        # for the inputs rounded to this dtype: how much rounding the inputs alone costs
        b_out, b_w, b_g = _run(c, q64, k64, v64, mask, dtype, ours(torch.float32))
        low = {"output": b_out, "weights": b_w, **b_g}
        q_r, k_r, v_r = (t.to(dtype).double() for t in (q64, k64, v64))
        r_out, r_w, r_g = _run(c, q_r, k_r, v_r, m64, torch.float64, ours(torch.float64))
        exact = {"output": exact_out, "weights": exact_w, **exact_g}
        got_r = {"output": r_out, "weights": r_w, **r_g}
        rounding_in = {
            n: (got_r[n] - exact[n]).abs().max().item() for n in low if low[n] is not None
        }
    eps = torch.finfo(dtype).eps

    gw_full = None
    if c.grads and c.need_weights:
        leaf = w_full.clone().requires_grad_(True)
        g = torch.Generator().manual_seed(c.seed + 1)
        torch.randn((*c.batch, c.H, c.L, c.d_v), generator=g, dtype=torch.float64)  # as _run
        gw = torch.randn(_select(w_full, c).shape, generator=g, dtype=torch.float64)
        (gw_full,) = torch.autograd.grad((_select(leaf, c) * gw).sum(), leaf)
    bounds = _grad_bounds(c, info, q64, k64, gw_full) if c.grads else {}
    # float32/float64 rounding: unit x (8 |scores used| + 64) x size of the summed terms
    unit = torch.finfo(torch.float32 if dtype in HALF else dtype).eps
    row_unit = unit * (8 * mag + 64)  # (..., H, L)
    live_mag = mag[~dead].max().item() if (~dead).any() else 0.0

    def rounding_bound(what: str) -> torch.Tensor:
        if what == "output":
            return row_unit * (w_full @ info["v_h"].abs()).amax(-1)  # (..., H, L)
        if what == "weights":  # weights are at most 1
            tol = row_unit if c.weight_rows is None else row_unit[..., _rows(c)]
            return tol.amax(-2) if c.average_heads else tol
        return torch.tensor(unit * (8 * live_mag + 64) * bounds[what])

    names = [*BACKENDS, "auto"]
    ran = []
    for name in names:
        q_, k_, v_ = (t.to(dtype).requires_grad_(c.grads) for t in (q64, k64, v64))
        m_ = mask.clone().requires_grad_(True) if c.mask_grad else mask
        if refusal(name, q_, k_, v_, **_kwargs(c, m_)) is not None:
            continue
        ran.append(name)
        who = name
        if name == "auto":  # name the backend it picks, for the messages below
            who = f"auto (-> {choose_backend(make_request(q_, k_, v_, **_kwargs(c, m_))).name})"
        seen = {}

        def fn(q, k, v, m, name=name, seen=seen):
            res = qkv.scaled_dot_product_attention(q, k, v, **_kwargs(c, m), backend=name)
            if not c.need_weights:
                return res, None
            seen["backend"] = res.backend
            return res.output, res.weights

        out, weights, grads = _run(c, q64, k64, v64, mask, dtype, fn)
        if c.need_weights:
            chosen = seen["backend"]
            assert chosen in backends(), f"{who}: the result names an unknown backend {chosen!r}"
            assert name in ("auto", chosen), f"{who}: the result names {chosen!r}"
        assert out.dtype == dtype and out.shape == exact_out.shape, (who, out.dtype, out.shape)
        _assert_finite("output", out, who)
        dead_out = out[dead]
        assert torch.equal(dead_out, torch.zeros_like(dead_out)), f"{who}: empty rows not zero"
        pairs = [("output", out, exact_out)]
        if c.need_weights:
            assert weights.dtype == dtype and weights.shape == exact_w.shape, (who, weights.shape)
            _assert_finite("weights", weights, who)
            forbidden = _select(~allowed, c) if not c.average_heads else None
            if c.average_heads:
                never = ~allowed
                if c.weight_rows is not None:
                    never = never[..., _rows(c), :]
                forbidden = never.all(dim=-3)
            assert torch.equal(weights[forbidden], torch.zeros_like(weights[forbidden])), (
                f"{who}: weights of forbidden keys are not exactly zero"
            )
            pairs.append(("weights", weights, exact_w))
        for gname, grad in grads.items():
            assert grad is not None, f"{who}: no gradient for {gname}"
            _assert_finite(gname, grad, who)
            pairs.append((gname, grad, exact_g[gname]))
        if c.grads:
            dq_dead = grads["dq"][dead]
            assert torch.equal(dq_dead, torch.zeros_like(dq_dead)), f"{who}: dq of empty rows"

        for what, got, want in pairs:
            err_t = (got.double() - want.double()).abs()
            tol = rounding_bound(what)
            if what == "dmask":  # the mask's gradient comes in the mask's own dtype
                tol = tol + torch.finfo(c.mask_dtype).eps * want.abs().max()
            per_row = what in ("output", "weights")
            excess = (err_t.amax(-1) if per_row else err_t.max()) - tol
            if dtype in HALF:
                # 2x the formula's own error in this dtype, + a floor that an exact answer
                # for the rounded inputs, rounded once, always meets: the error from rounding
                # the inputs, one rounding of the answer, and float32 arithmetic on these
                # terms (cancellations)
                base_err = (low[what].double() - want.double()).abs().max().item()
                floor = rounding_in[what] + eps * want.abs().max().item() + tol.max().item()
                err = err_t.max().item()
                assert err <= 2 * base_err + floor, (
                    f"{who} {what} in {dtype}: error {err:.3e} > 2 x {base_err:.3e} (the "
                    f"formula run in {dtype}) + {floor:.1e}"
                )
            else:
                assert (excess <= 0).all(), (
                    f"{who} {what} in {dtype}: error {err_t.max().item():.3e} exceeds the "
                    f"bound by {excess.max().item():.3e}"
                )
    assert "auto" in ran and ("reference" not in backends() or "reference" in ran), ran


# Large inputs in float16: q·k = 40 * 40 * 64 = 102,400 > 65,504 before scaling; every
# output is 40.
LARGE_FP16 = Case(
    batch=(1,), H=2, H_kv=2, L=5, S=5, d_k=64, d_v=64, dtype=torch.float16, values="const",
    magnitude=40.0,
)  # fmt: skip
# A row whose float32 mask is float32's most negative number everywhere: its scores are
# absorbed into the mask value (in float32 and float64 alike), so its weights are uniform
# (a shift, not a dead row). Found by this fuzz ("flash" weights summing to 2).
MIN_ROW = Case(
    batch=(), H=2, H_kv=1, L=1, S=2, d_k=1, d_v=1, dtype=torch.float64, values="randn",
    magnitude=1.0, enable_gqa=True, mask="float", mask_shape=(1, 2), mask_dtype=torch.float32,
    mask_values="f32min", dead_rows=(0,),
)  # fmt: skip


@VALID
@given(c=cases(grads=False))
@example(c=LARGE_FP16)
@example(c=replace(LARGE_FP16, need_weights=True))
@example(c=replace(MIN_ROW, need_weights=True))
@example(c=replace(MIN_ROW, need_weights=True, mask_values="neg1e5", dtype=torch.float16))
def test_valid_calls_match_float64(c):
    _check_valid(c)


@VALID
@given(c=cases(grads=True))
@example(c=replace(LARGE_FP16, grads=True))
@example(c=replace(MIN_ROW, grads=True, mask_values="neg1e5"))  # -1e5: -inf in float16
@example(c=replace(MIN_ROW, grads=True, mask_values="neg1e5", dtype=torch.float16))
def test_valid_call_gradients_match_float64(c):
    _check_valid(c)


# ==================================================================== invalid calls


@dataclass(frozen=True)
class Bad:
    """One invalid call: a valid base with one argument broken (``kind``, ``variant``)."""

    kind: str
    variant: int
    batch: tuple[int, ...]
    H: int
    L: int
    S: int
    d: int
    backend: str


# kind -> the number of variants _break knows for it
KINDS = {
    "ndim": 6,  # q, k or v with fewer than 3 dims
    "empty": 3,  # a zero-sized dim
    "batch": 6,  # leading dims differ between q and k/v
    "d_k": 2,  # q and k widths differ
    "kv_length": 1,  # k and v lengths differ
    "kv_heads": 1,  # k and v head counts differ
    "heads_multiple": 2,  # H not a multiple of H_kv
    "gqa_flag": 1,  # H != H_kv without enable_gqa
    "not_tensor": 9,
    "dtype": 6,  # integer, bool or complex q/k/v
    "mixed_dtype": 2,
    "mask_shape": 7,
    "mask_dtype": 4,
    "mask_not_tensor": 3,
    "causal_with_mask": 1,  # is_causal and an explicit mask with L != S
    "scale": 9,
    "dropout": 8,
    "window": 7,
    "weight_rows": 16,
    "is_causal": 4,
    "backend": 5,
    "meta": 5,
}


VARIANTS = [(kind, i) for kind in sorted(KINDS) for i in range(KINDS[kind])]


@st.composite
def bad_calls(draw) -> Bad:
    kind, variant = draw(st.sampled_from(VARIANTS))
    return Bad(
        kind=kind,
        variant=variant,
        batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
        H=draw(st.sampled_from([1, 2, 4])),
        L=draw(st.integers(1, 9)),
        S=draw(st.integers(1, 9)),
        d=draw(st.integers(1, 8)),
        backend=draw(st.sampled_from([*BACKENDS, "auto"])),
    )


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """qkv's rule for masks, restated: S last, then L or 1, then 1 or equal; no extra dims."""
    if not 2 <= len(shape) <= len(target) or shape[-1] != target[-1]:
        return False
    if shape[-2] not in (1, target[-2]):
        return False
    return all(n in (1, t) for n, t in zip(shape[:-2], target[-len(shape) : -2], strict=True))


def _break(b: Bad):
    """Build the call: (q, k, v, keyword arguments, names the error must mention)."""
    g = torch.Generator().manual_seed(b.variant)
    B, H, L, S, d = b.batch, b.H, b.L, b.S, b.d

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    q, k, v = randn(*B, H, L, d), randn(*B, H, S, d), randn(*B, H, S, d + 1)
    kw: dict = {"backend": b.backend}
    x, i = b.kind, b.variant
    target = (*B, H, L, S)
    qkv_names = ("q", "k", "v")

    if x == "ndim":
        name = qkv_names[i % 3]
        t = {"q": q, "k": k, "v": v}[name]
        t = t.reshape(-1)[: t.shape[-1]] if i >= 3 else t.reshape(-1, t.shape[-1])[:2]
        q, k, v = (t if n == name else o for n, o in zip(qkv_names, (q, k, v), strict=True))
        return q, k, v, kw, (name,)
    if x == "empty":
        name = qkv_names[i]
        shape = {"q": (*B, H, 0, d), "k": (*B, H, 0, d), "v": (*B, H, S, 0)}[name]
        empty = torch.zeros(shape)
        if name == "k":
            v = torch.zeros(*B, H, 0, d + 1)
        q, k, v = (empty if n == name else o for n, o in zip(qkv_names, (q, k, v), strict=True))
        return q, k, v, kw, (name,)
    if x == "batch":
        name = ("k", "v", "q")[i % 3]
        extra = (2,) if i < 3 else ()
        lead = (*extra, *[n + 1 for n in B]) if i >= 3 or not B else (*extra, *B)
        if lead == B:
            lead = (*B, 2)
        shapes = {"q": (*lead, H, L, d), "k": (*lead, H, S, d), "v": (*lead, H, S, d + 1)}
        changed = randn(*shapes[name])
        q, k, v = (changed if n == name else o for n, o in zip(qkv_names, (q, k, v), strict=True))
        return q, k, v, kw, (name,)
    if x == "d_k":
        if i == 0:
            k = randn(*B, H, S, d + 1)
            return q, k, v, kw, ("q", "k")
        q = randn(*B, H, L, d + 2)
        return q, k, v, kw, ("q", "k")
    if x == "kv_length":
        v = randn(*B, H, S + 1, d)
        return q, k, v, kw, ("k", "v")
    if x == "kv_heads":
        v = randn(*B, H + 1, S, d)
        return q, k, v, kw | {"enable_gqa": True}, ("k", "v")
    if x == "heads_multiple":
        Hq, Hk = ((4, 3), (3, 2))[i]
        q, k, v = randn(*B, Hq, L, d), randn(*B, Hk, S, d), randn(*B, Hk, S, d)
        return q, k, v, kw | {"enable_gqa": True}, ("q", "k")
    if x == "gqa_flag":
        q, k, v = randn(*B, 4, L, d), randn(*B, 2, S, d), randn(*B, 2, S, d)
        return q, k, v, kw, ("enable_gqa",)
    if x == "not_tensor":
        name = qkv_names[i % 3]
        t = {"q": q, "k": k, "v": v}[name]
        junk = (t.tolist(), t.numpy(), None)[i // 3]
        q, k, v = (junk if n == name else o for n, o in zip(qkv_names, (q, k, v), strict=True))
        return q, k, v, kw, (name,)
    if x == "dtype":
        name = qkv_names[i % 3]
        dt = (torch.int64, torch.bool, torch.complex64, torch.int32, torch.uint8, torch.int8)[i]
        t = {"q": q, "k": k, "v": v}[name].to(dt)
        q, k, v = (t if n == name else o for n, o in zip(qkv_names, (q, k, v), strict=True))
        return q, k, v, kw, (name,)
    if x == "mixed_dtype":
        if i == 0:
            return q, k, v.double(), kw, ("v",)
        return q, k.half(), v, kw, ("k",)
    if x == "mask_shape":
        shape = [
            (S,),  # 1-D
            (L, S + 1),  # wrong S
            (L + 1, S),  # L+1 rows (never L or 1)
            (2, *target),  # more dims than (..., H, L, S)
            (H + 1, L, S),  # heads that do not broadcast
            (*target[:-2], L, 1) if S > 1 else (*target[:-2], L, 2),  # keys stretched
            (B[-1] + 1, *target[-3:]) if B else (H + 2, 1, S),  # a batch dim that differs
        ][i]
        assert not _broadcasts(tuple(shape), target), shape  # the test's own premise
        return q, k, v, kw | {"attn_mask": torch.ones(shape, dtype=torch.bool)}, ("attn_mask",)
    if x == "mask_dtype":
        dt = (torch.int64, torch.uint8, torch.int32, torch.complex64)[i]
        return q, k, v, kw | {"attn_mask": torch.ones(L, S, dtype=dt)}, ("attn_mask",)
    if x == "mask_not_tensor":
        junk = ([[True] * S] * L, np.ones((L, S), dtype=bool), 1.0)[i]
        return q, k, v, kw | {"attn_mask": junk}, ("attn_mask",)
    if x == "causal_with_mask":
        q = randn(*B, H, S + 1, d)  # L = S + 1 != S
        mask = torch.ones(S + 1, S, dtype=torch.bool)
        return q, k, v, kw | {"attn_mask": mask, "is_causal": True}, ("is_causal", "attn_mask")
    if x == "scale":
        bad = (0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "x", True)[i]
        return q, k, v, kw | {"scale": bad}, ("scale",)
    if x == "dropout":
        bad = (1.0, 1.5, -0.1, math.nan, math.inf, "0.1", True, None)[i]
        return q, k, v, kw | {"dropout_p": bad}, ("dropout_p",)
    if x == "window":
        bad = (0, -3, 2.5, True, "2", math.nan, False)[i]
        return q, k, v, kw | {"window": bad}, ("window",)
    if x == "weight_rows":
        bad = (
            "0",
            [10**30],
            object(),
            [L],
            [-L - 1],
            [0.5],
            [[0]],
            [],
            torch.tensor([0.0]),
            torch.zeros(1, 1, dtype=torch.long),
            torch.tensor([L]),
            [True],
            torch.tensor([True]),
            3,
            {0},
            None,  # with need_weights=False: rows given without weights (below)
        )[i]
        if bad is None:
            return q, k, v, kw | {"weight_rows": [0]}, ("weight_rows",)
        return q, k, v, kw | {"need_weights": True, "weight_rows": bad}, ("weight_rows",)
    if x == "is_causal":
        bad = (1, 0, "yes", None)[i]
        return q, k, v, kw | {"is_causal": bad}, ("is_causal",)
    if x == "backend":
        bad = ("nope", "", "Reference", 3, None)[i]
        return q, k, v, kw | {"backend": bad}, ("backend",)
    if x == "meta":
        which = (("q", "k", "v"), ("q",), ("k",), ("v",), ("k", "v"))[i]
        q, k, v = (
            t.to("meta") if n in which else t for n, t in zip(qkv_names, (q, k, v), strict=True)
        )
        return q, k, v, kw, which
    raise AssertionError(x)


def _names(message: str, name: str) -> bool:
    """``name`` appears in ``message`` as a whole word (``k`` is not found in ``d_k``)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


def test_name_matching_is_word_based():
    assert _names("q and k must share a dtype", "k")
    assert not _names("got d_k=3 and mask (2, 3)", "k")
    assert _names("attn_mask of shape (3,)", "attn_mask")
    assert not _names("attn_masks", "attn_mask")


def _check_invalid(b: Bad) -> None:
    q, k, v, kwargs, names = _break(b)
    with pytest.raises((ValueError, TypeError)) as info:
        qkv.scaled_dot_product_attention(q, k, v, **kwargs)
    message = str(info.value)
    if b.kind == "meta":  # the message must name a meta tensor (the first one checked)
        assert any(_names(message, n) for n in names), (names, message)
    else:
        missing = [n for n in names if not _names(message, n)]
        assert not missing, f"{type(info.value).__name__} does not name {missing}: {message!r}"


@INVALID
@given(b=bad_calls())
def test_invalid_calls_raise_naming_the_argument(b):
    _check_invalid(b)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_invalid_variant_raises_naming_the_argument(kind, backend):
    """Each variant of each kind at least once, on small and batched shapes."""
    for variant in range(KINDS[kind]):
        for batch, H, L, S in (((), 1, 1, 1), ((2, 3), 2, 5, 3)):
            _check_invalid(Bad(kind, variant, batch, H, L, S, d=4, backend=backend))
