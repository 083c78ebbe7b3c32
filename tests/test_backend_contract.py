"""The contract every registered backend keeps, checked over ``qkv.backends.backends()``.

A backend added to the registry later (a compiled one, say) meets every test here
without editing this file:

* ``supports(request)`` answers ``None`` or a non-empty one-line reason;
* a named backend that cannot serve a request (or is not available) raises
  ``ValueError`` naming the backend and giving the reason, and never runs;
  ``"auto"`` then uses another backend;
* results name the backend that computed them (a registered one; for ``"auto"`` one
  that is available and accepts the request);
* outputs, gradients and weights match a float64 softmax written out here, on a small
  fixed grid: masks (bool, per head, float with -inf, padding, 2-D), causal with
  L < S and L > S, windows, grouped-query heads, d_k != d_v, lengths 1, 7 and 97, in
  float64/float32 (fixed tolerances) and bfloat16/float16 (2x the error of the same
  formula run in that dtype, as in tests/support.py);
* inputs are not modified, and repeating a call gives bitwise-identical results
  (threaded kernels included).

Backends not usable on the CPU here (Triton without CUDA or ``TRITON_INTERPRET=1``)
are skipped with the reason, except for the refusal checks, which need no kernel.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import qkv
from qkv.backends import backends, choose_backend, make_request
from qkv.result import AttentionResult
from support import registry_backends

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
ALL_NAMES = sorted(backends())  # every registered backend, usable here or not


def _per_device(include_auto: bool = True) -> list:
    """``(backend, device)`` params: every registered backend (+ "auto") on every device."""
    params = []
    for device in DEVICES:
        for p in registry_backends(include_auto=include_auto, device=device):
            params.append(pytest.param(p.values[0], device, marks=p.marks, id=f"{p.id}-{device}"))
    return params


BACKEND_DEVICE = _per_device()


# ------------------------------------------------------------ the float64 truth


def _structural(L: int, S: int, is_causal: bool, window: int | None) -> torch.Tensor:
    """(L, S) bool, bottom-right aligned: query i sits at key position i + S - L."""
    diff = torch.arange(S).unsqueeze(0) - (torch.arange(L).unsqueeze(1) + S - L)
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allowed &= diff <= 0
    if window is not None:
        allowed &= diff > -window if is_causal else diff.abs() < window
    return allowed


def softmax_attention(q, k, v, *, compute, attn_mask=None, is_causal=False, window=None,
                      scale=None, weight_rows=None, average_heads=False, **_):  # fmt: skip
    """softmax(q kᵀ scale + mask) v, scores and softmax in ``compute``, weights rounded to
    v's dtype before ``@ v``; rows with no allowed key give zeros. Returns (out, weights)."""
    group = q.shape[-3] // k.shape[-3]
    k_h, v_h = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("...ld,...sd->...ls", q.to(compute), k_h.to(compute)) * scale
    allowed = _structural(q.shape[-2], k.shape[-2], is_causal, window).to(s.device)
    allowed = allowed.expand(s.shape)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask.to(compute)
        allowed = allowed & (attn_mask > -math.inf)
    s = s.masked_fill(~allowed, -math.inf)
    live = allowed.any(-1, keepdim=True)
    shift = torch.where(live, s.amax(-1, keepdim=True), torch.zeros_like(s[..., :1])).detach()
    p = torch.exp(s - shift)
    w = p / (p.sum(-1, keepdim=True) + (~live).to(p.dtype))
    out = torch.einsum("...ls,...sd->...ld", w.to(v.dtype), v_h)
    sel = w if weight_rows is None else w[..., [r % w.shape[-2] for r in weight_rows], :]
    sel = sel.mean(-3) if average_heads else sel
    return out, sel.to(v.dtype)


# ------------------------------------------------------------ the fixed grid


@dataclasses.dataclass(frozen=True)
class Grid:
    B: tuple[int, ...] = (2,)
    H: int = 2
    H_kv: int | None = None
    L: int = 7
    S: int = 7
    d_k: int = 8
    d_v: int | None = None
    mask: str = "none"
    is_causal: bool = False
    window: int | None = None
    scale: float | None = None
    const: float | None = None  # every entry of q, k, v equal to this (else N(0, 1))
    # a row whose every score is absorbed by a huge bias: its forward pass is well defined
    # (uniform weights, in any precision) but not its gradient (finite differences give 0,
    # autograd of the formula the softmax Jacobian, log-sum-exp kernels n times that)
    gradient_defined: bool = True


GRID = {
    "L1": Grid(L=1, S=1),
    "L1_S97": Grid(L=1, S=97),
    "L97_S1": Grid(L=97, S=1),
    "L7": Grid(),
    "L97": Grid(L=97, S=97),
    "bool_mask": Grid(S=9, mask="bool"),
    "bool_mask_per_head": Grid(S=9, mask="bool_heads"),
    "float_mask": Grid(S=9, mask="float"),
    "padding": Grid(S=9, mask="padding"),
    "mask_2d": Grid(L=97, S=7, mask="2d"),
    "causal_square": Grid(L=97, S=97, is_causal=True),
    "causal_L<S": Grid(L=7, S=97, is_causal=True),
    "causal_L>S": Grid(L=97, S=7, is_causal=True),  # the first 90 rows see no key
    "window_causal": Grid(L=97, S=97, is_causal=True, window=5),
    "window_both_sides": Grid(L=7, S=12, window=3),
    "window_L>S": Grid(L=12, S=7, is_causal=True, window=2),
    "gqa": Grid(H=4, H_kv=2, S=9, mask="bool"),
    "mqa_causal": Grid(H=4, H_kv=1, L=97, S=97, is_causal=True),
    "dk_ne_dv": Grid(d_k=8, d_v=3, S=9, mask="float"),
    "dk_ne_dv_wide": Grid(d_k=3, d_v=20),
    "scale": Grid(scale=0.3),
    "batchless": Grid(B=()),
    "two_batch_dims": Grid(B=(2, 3), mask="bool_heads"),
    # a float32 bias that half types cannot hold (100.3 in bfloat16, -1e5 in float16)
    "float32_bias": Grid(S=9, mask="float32_bias"),
    # rows shifted by -1e5: live rows, not dead ones (-1e5 is -inf in float16)
    "float32_shift": Grid(S=9, mask="float32_shift"),
    # a row shifted by float32's most negative number: uniform weights, not a dead row
    "float32_min_row": Grid(S=9, mask="float32_min_row", gradient_defined=False),
    # q·k = 40 * 40 * 64 = 102,400 overflows float16 before scaling; the output is 40
    "large_values": Grid(L=5, S=5, d_k=64, const=40.0),
}


def _mask(g: Grid, H: int) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(1)
    B, L, S = g.B, g.L, g.S
    if g.mask == "none":
        return None
    if g.mask == "padding":  # (B, 1, 1, S): the last sequence pads half its keys, the first all
        m = torch.ones(*B, 1, 1, S, dtype=torch.bool)
        m[-1, ..., (S + 1) // 2 :] = False
        m[0] = False
        return m
    if g.mask == "float32_bias":  # (H, L, S): biases near 100, some -inf, a dead row
        bias = 100 + 3 * torch.rand(H, L, S, generator=gen, dtype=torch.float64)
        bias[:, 1, ::2] = -math.inf
        bias[:, L // 2, :] = -math.inf
        return bias.float()
    if g.mask in ("float32_shift", "float32_min_row"):  # (L, S): rows shifted far down
        bias = torch.randn(L, S, generator=gen, dtype=torch.float64)
        if g.mask == "float32_shift":
            bias[0, :] = -1e5  # -inf in float16
            bias[2, ::2] = -1e5
        else:
            bias[1, :] = torch.finfo(torch.float32).min  # absorbs the scores: uniform
            bias[2, ::2] = torch.finfo(torch.float32).min  # weight exactly 0 there
        return bias.float()
    shape = {"bool": (*B, 1, L, S), "bool_heads": (*B, H, L, S), "float": (1, H, L, S)}
    shape = shape.get(g.mask, (L, S))
    keep = torch.rand(shape, generator=gen) > 0.3
    keep[..., L // 2, :] = False  # one row with no key at all
    if g.mask == "float":
        bias = torch.randn(shape, generator=gen, dtype=torch.float64)
        return bias.masked_fill(~keep, -math.inf)
    return keep


def _inputs(g: Grid):
    gen = torch.Generator().manual_seed(0)
    H_kv = g.H if g.H_kv is None else g.H_kv
    d_v = g.d_k if g.d_v is None else g.d_v
    shapes = ((*g.B, g.H, g.L, g.d_k), (*g.B, H_kv, g.S, g.d_k), (*g.B, H_kv, g.S, d_v))
    if g.const is None:
        q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    else:
        q, k, v = (torch.full(s, g.const, dtype=torch.float64) for s in shapes)
    kwargs = {
        "attn_mask": _mask(g, g.H),
        "is_causal": g.is_causal,
        "window": g.window,
        "scale": g.scale,
        "enable_gqa": H_kv != g.H,
    }
    return q, k, v, kwargs


def _on(kwargs: dict, device: str) -> dict:
    m = kwargs.get("attn_mask")
    return kwargs | {"attn_mask": None if m is None else m.to(device)}


def _evaluate(fn, q64, k64, v64, dtype, device, grads: bool):
    """fn on leaves in ``dtype`` on ``device``: output, weights, dq, dk, dv (on the CPU)."""
    q, k, v = (
        t.detach().to(device=device, dtype=dtype).requires_grad_(grads) for t in (q64, k64, v64)
    )
    out, weights = fn(q, k, v)
    results = {"output": out, "weights": weights}
    if grads:
        gen = torch.Generator().manual_seed(7)
        loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
        if weights is not None:
            gw = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
            loss = loss + (weights.double() * gw.to(device)).sum()
        loss.backward()
        results |= {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: t.detach().cpu() for n, t in results.items() if t is not None}


def _term_sizes(q64, k64, v64, kw, weights_out_shape) -> tuple[float, dict[str, float]]:
    """The size of the scores used, and the largest sum of |terms| behind each result.

    Rounding in float32 arithmetic costs about unit x (8 |scores| + 64) x these sizes
    (as in test_fuzz_api); it matters where the result is much smaller than its terms
    (cancellation, e.g. dq for equal keys) or the scores are large (a -1e5 shift).
    """
    plain = {n: kw[n] for n in ("attn_mask", "is_causal", "window", "scale")}
    _, w = softmax_attention(q64, k64, v64, compute=torch.float64, **plain)  # (..., H, L, S)
    group = q64.shape[-3] // k64.shape[-3]
    # the size of the scores rows really use: |q·k scale| + |mask| where the weight is above
    # e^-40 of the row's largest (a float32-min bias is absorbed alike in any precision)
    scale = 1 / math.sqrt(q64.shape[-1]) if kw["scale"] is None else kw["scale"]
    s = q64 @ k64.repeat_interleave(group, -3).transpose(-2, -1) * scale
    m = kw["attn_mask"]
    m = torch.zeros(()) if m is None or m.dtype == torch.bool else m.double()
    m = torch.where(m.abs() < 1e20, m, torch.zeros_like(m))
    t = (s + m).masked_fill(w == 0, -math.inf)
    used = t >= t.amax(-1, keepdim=True) - 40
    mag = torch.where(used, s.abs() + m.abs(), torch.zeros_like(t)).max().item()
    k_h, v_h = (t.repeat_interleave(group, -3).abs() for t in (k64, v64))
    gen = torch.Generator().manual_seed(7)  # the gradients _evaluate draws
    g_out = torch.randn((*q64.shape[:-1], v64.shape[-1]), generator=gen, dtype=torch.float64)
    dp = g_out.abs() @ v_h.transpose(-2, -1)
    a = w * (dp + (w * dp).sum(-1, keepdim=True))
    if weights_out_shape is not None:
        gw = torch.randn(weights_out_shape, generator=gen, dtype=torch.float64)
        leaf = w.clone().requires_grad_(True)
        rows = kw.get("weight_rows")
        sel = leaf if rows is None else leaf[..., [r % leaf.shape[-2] for r in rows], :]
        sel = sel.mean(-3) if kw.get("average_heads") else sel
        (gw_full,) = torch.autograd.grad((sel * gw).sum(), leaf)
        a = a + w * (gw_full.abs() + (w * gw_full.abs()).sum(-1, keepdim=True))
    return mag, {
        "output": (w @ v_h).max().item(),
        "weights": 1.0,
        "dq": (scale * (a @ k_h)).max().item(),
        "dk": (scale * (a.transpose(-2, -1) @ q64.abs())).max().item() * group,
        "dv": (w.transpose(-2, -1) @ g_out.abs()).max().item() * group,
    }


def _allowed(g: Grid, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., H, L, S) bool: where a query may attend (structure and mask)."""
    allowed = _structural(g.L, g.S, g.is_causal, g.window)
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > -math.inf)
    return allowed.expand(*g.B, g.H, g.L, g.S)


def _check_grid(backend, device, case, dtype, grads, weights=None):
    g = GRID[case]
    q64, k64, v64, kw = _inputs(g)
    need_weights = weights is not None
    kw |= {"need_weights": need_weights, **(weights or {})}

    if backend != "auto":  # skip what the backend refuses (the refusal tests cover those)
        leaves = [t.detach().to(device, dtype).requires_grad_(grads) for t in (q64, k64, v64)]
        why = backends()[backend].supports(make_request(*leaves, **_on(kw, device)))
        if why is not None:
            pytest.skip(f"{backend} does not serve this case: {why}")

    def ours(compute):
        def fn(q, k, v):
            out, w = softmax_attention(q, k, v, compute=compute, **kw)
            return out, (w if need_weights else None)

        return fn

    def theirs(q, k, v):
        kw_dev = _on(kw, device)
        before = [t.detach().clone() for t in (q, k, v, kw_dev["attn_mask"]) if t is not None]
        res = qkv.scaled_dot_product_attention(q, k, v, **kw_dev, backend=backend)
        after = [t.detach() for t in (q, k, v, kw_dev["attn_mask"]) if t is not None]
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b), f"{backend} modified its inputs"
        if not need_weights:
            return res, None
        assert isinstance(res, AttentionResult)
        assert res.backend in backends() and backend in ("auto", res.backend), res.backend
        return res.output, res.weights

    exact = _evaluate(ours(torch.float64), q64, k64, v64, torch.float64, "cpu", grads)
    got = _evaluate(theirs, q64, k64, v64, dtype, device, grads)
    assert set(got) == set(exact), f"{backend}: returned {sorted(got)}, expected {sorted(exact)}"
    if dtype != torch.float64:
        low = _evaluate(ours(torch.float32), q64, k64, v64, dtype, "cpu", grads)
        rounded = [t.to(dtype).double() for t in (q64, k64, v64)]
        exact_r = _evaluate(ours(torch.float64), *rounded, torch.float64, "cpu", grads)

    w_shape = exact["weights"].shape if need_weights else None
    if dtype != torch.float64:
        mag, sizes = _term_sizes(q64, k64, v64, kw, w_shape)
    allowed = _allowed(g, kw["attn_mask"])
    dead = ~allowed.any(-1)  # (..., H, L)
    for name, want in exact.items():
        have = got[name]
        assert have.dtype == dtype and have.shape == want.shape, (name, have.dtype, have.shape)
        assert torch.isfinite(have.double()).all(), f"{backend} {name}: non-finite values"
        if name in ("output", "dq"):
            rows = have[dead]
            assert torch.equal(rows, torch.zeros_like(rows)), f"{backend} {name}: empty rows"
        if name == "weights" and not kw.get("average_heads") and kw.get("weight_rows") is None:
            masked = have[~allowed]
            assert torch.equal(masked, torch.zeros_like(masked)), f"{backend}: masked weights"
        err = (have.double() - want).abs().max().item()
        size = max(1.0, want.abs().max().item())
        if dtype == torch.float64:
            assert err <= 1e-10 * size, f"{backend} {name} in float64: error {err:.3e}"
            continue
        # 2x the error of the formula run in this dtype, + what rounding the inputs costs,
        # + one rounding of the answer, + float32 arithmetic on the terms summed (the usual
        # 2e-5 for float32), which grows with the scores' size
        base = (low[name].double() - want).abs().max().item()
        floor = (exact_r[name] - want).abs().max().item()
        floor += torch.finfo(dtype).eps * want.abs().max().item()
        unit = torch.finfo(torch.float32).eps
        fixed = 2e-5 if dtype == torch.float32 else 64 * unit
        floor += (fixed + 8 * unit * mag) * max(size, sizes[name])
        assert err <= 2 * base + floor, (
            f"{backend} {name} in {dtype}: error {err:.3e} > 2 x {base:.3e} + {floor:.2e}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GRID))
@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICE)
def test_grid_outputs_and_gradients(backend, device, case, dtype):
    _check_grid(backend, device, case, dtype, grads=GRID[case].gradient_defined)


@pytest.mark.parametrize("grads", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "weights",
    [{}, {"weight_rows": [0, -1, 3]}, {"average_heads": True},
     {"weight_rows": [2, 2], "average_heads": True}],
    ids=["all", "rows", "average", "rows_average"],
)  # fmt: skip
@pytest.mark.parametrize(
    "case",
    [
        "L7",
        "float_mask",
        "float32_shift",
        "float32_min_row",
        "causal_L>S",
        "window_both_sides",
        "gqa",
    ],
)
@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICE)
def test_grid_weights(backend, device, case, weights, dtype, grads):
    """Weights (all rows, chosen rows, head averages) and, where served, their gradients."""
    if grads and not GRID[case].gradient_defined:
        pytest.skip(f"{case}: the gradient is not defined (see GRID)")
    _check_grid(backend, device, case, dtype, grads=grads, weights=weights)


# ------------------------------------------------------------ supports() and refusals


def _pool(device: str = "cpu"):
    """Valid calls of many kinds: (id, q, k, v, kwargs); q, k, v require grad for "*_grad"."""
    gen = torch.Generator().manual_seed(3)

    def t(*shape, dtype=torch.float32, grad=False):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    items = []
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        items.append((name, t(2, 2, 5, 8, dtype=dtype), t(2, 2, 6, 8, dtype=dtype),
                      t(2, 2, 6, 4, dtype=dtype), {}))  # fmt: skip
    q, k, v = t(1, 4, 5, 8), t(1, 2, 5, 8), t(1, 2, 5, 3)
    mask = torch.rand(5, 5, generator=gen).to(device) > 0.3
    bias = t(1, 4, 5, 5).detach()
    items += [
        ("weights", q, k, v, {"need_weights": True, "enable_gqa": True}),
        ("weights_rows_average", q, k, v,
         {"need_weights": True, "enable_gqa": True, "weight_rows": [0, 4], "average_heads": True}),
        ("gqa_causal_window", q, k, v, {"enable_gqa": True, "is_causal": True, "window": 2}),
        ("bool_mask", q, k, v, {"enable_gqa": True, "attn_mask": mask}),
        ("float_mask", q, k, v, {"enable_gqa": True, "attn_mask": bias}),
        ("dropout", q, k, v, {"enable_gqa": True, "dropout_p": 0.25}),
        ("causal_L>S", t(1, 2, 9, 8), t(1, 2, 4, 8), t(1, 2, 4, 8), {"is_causal": True}),
        ("wide_heads", t(1, 1, 3, 300), t(1, 1, 3, 300), t(1, 1, 3, 300), {}),
    ]  # fmt: skip
    qg, kg, vg = t(1, 2, 5, 8, grad=True), t(1, 2, 5, 8, grad=True), t(1, 2, 5, 8, grad=True)
    items += [
        ("plain_grad", qg, kg, vg, {}),
        ("weights_grad", qg, kg, vg, {"need_weights": True}),
        ("float_mask_grad", qg, kg, vg,
         {"attn_mask": t(1, 2, 5, 5).detach().requires_grad_(True)}),
        ("half_grad", *(x.detach().half().requires_grad_(True) for x in (qg, kg, vg)), {}),
    ]  # fmt: skip
    return items


def _reason(name: str, q, k, v, kwargs) -> str | None:
    b = backends()[name]
    return b.supports(make_request(q, k, v, **kwargs))


def test_registry_entries_are_well_formed():
    registered = backends()
    assert "reference" in registered and "auto" not in registered
    for name, b in registered.items():
        assert b.name == name
        assert callable(b.fn) and callable(b.supports) and callable(b.available)
        assert isinstance(b.available(), bool), name
        assert isinstance(b.description, str) and b.description.strip(), name
        assert "\n" not in b.description, name


@pytest.mark.parametrize("name", ALL_NAMES)
def test_supports_answers_none_or_a_one_line_reason(name):
    answers = []
    for case, q, k, v, kwargs in _pool():
        why = _reason(name, q, k, v, kwargs)
        answers.append(why)
        if why is not None:
            assert isinstance(why, str), (case, why)
            assert why.strip() and "\n" not in why, (case, why)
    if name == "reference":  # the specification serves every valid call
        assert answers == [None] * len(answers), answers


@pytest.mark.parametrize("name", ALL_NAMES)
def test_named_backend_that_cannot_serve_raises_with_name_and_reason(name):
    """Every refusal in the pool raises; refused work never silently runs elsewhere."""
    b = backends()[name]
    for case, q, k, v, kwargs in _pool():
        why = "available" if not b.available() else _reason(name, q, k, v, kwargs)
        if why is None:
            continue
        with pytest.raises(ValueError) as info:
            qkv.scaled_dot_product_attention(q, k, v, **kwargs, backend=name)
        message = str(info.value)
        assert repr(name) in message or name in message, (case, message)
        assert why in message, (case, why, message)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_refusal_is_honoured_by_name_and_by_auto(name, monkeypatch):
    """A backend whose supports() refuses is never run: by name it raises ValueError with
    its reason; "auto" picks another backend."""
    from qkv.backends import registry

    calls = []
    original = backends()[name]

    def fn(request):
        calls.append(request)
        return original.fn(request)

    reason = "refused by the contract test for this call"
    patched = dataclasses.replace(
        original, fn=fn, supports=lambda r: reason, available=lambda: True
    )
    monkeypatch.setitem(registry._REGISTRY, name, patched)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with pytest.raises(ValueError) as info:
        qkv.scaled_dot_product_attention(q, k, v, backend=name)
    assert name in str(info.value) and reason in str(info.value), str(info.value)
    for need_weights in (False, True):
        out = qkv.scaled_dot_product_attention(q, k, v, need_weights=need_weights)
        if need_weights:
            assert out.backend != name
    assert calls == [], f"{name} ran although it refused"


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICE)
def test_results_name_their_backend(backend, device):
    served = 0
    for case, q, k, v, kwargs in _pool(device):
        request = make_request(q, k, v, **kwargs)
        if backend == "auto":
            chosen = choose_backend(request)
            assert chosen.name in backends() and chosen.available(), case
            assert chosen.supports(request) is None, (case, chosen.name)
            name = chosen.name
        else:
            if _reason(backend, q, k, v, kwargs) is not None:
                continue
            name = backend
        served += 1
        result = backends()[name](request)
        assert isinstance(result, AttentionResult), (case, type(result))
        assert result.backend == name, (case, result.backend)
        if kwargs.get("need_weights"):
            public = qkv.scaled_dot_product_attention(q, k, v, **kwargs, backend=backend)
            assert public.backend == name, (case, public.backend)
    assert served, f"{backend} served none of the pool"


# ------------------------------------------------------------ repeatability


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICE)
def test_repeated_calls_are_bitwise_identical(backend, device):
    """Same call, same bits: outputs and gradients (2 * 1024**2 scores: threaded kernels,
    several query tiles adding into each key's gradient)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's CPU interpreter takes many minutes for 2 million scores")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 1024, 16, generator=gen).to(device) for _ in range(3))
    mask = (torch.rand(1, 1, 1024, 1024, generator=gen) > 0.2).to(device)
    grad_out = torch.randn(1, 2, 1024, 16, generator=gen).to(device)
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if backend != "auto" and _reason(backend, *leaves, {"attn_mask": mask}) is not None:
            pytest.skip(f"{backend} refuses this call")
        out = qkv.scaled_dot_product_attention(*leaves, attn_mask=mask, backend=backend)
        runs.append((out.detach(), *torch.autograd.grad(out, leaves, grad_out)))
    for other in runs[1:]:
        for name, a, b in zip(("output", "dq", "dk", "dv"), runs[0], other, strict=True):
            assert torch.equal(a, b), f"{backend}: {name} differs between identical calls"
