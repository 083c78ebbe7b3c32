"""The compiled CPU flash kernel (qkv.backends.flash.compiled) against a plain reference.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key length · d_k, d_v widths.

The reference is matmul-softmax-matmul in float64 with the mask, band and GQA expanded;
in float16/bfloat16 the kernel's error against it must stay within twice the error of
the same plain computation done in that dtype (float32 softmax), plus a small floor.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from qkv.backends.flash import compiled

pytestmark = pytest.mark.skipif(
    not compiled.available(), reason=f"compiled flash kernel unavailable: {compiled.build_error()}"
)

HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- reference


def band_allowed(L: int, S: int, lo, hi) -> torch.Tensor:
    """(L, S) bool: key j allowed for query i iff lo <= j - i - (S - L) <= hi."""
    d = torch.arange(S)[None, :] - torch.arange(L)[:, None] - (S - L)
    ok = torch.ones(L, S, dtype=torch.bool)
    if lo is not None:
        ok &= d >= lo
    if hi is not None:
        ok &= d <= hi
    return ok


def reference(q, k, v, mask=None, lo=None, hi=None, scale=None, compute=torch.float64):
    """Plain attention. q (B, H, L, d_k), k (B, H_kv, S, d_k), v (B, H_kv, S, d_v);
    mask broadcastable to (B, H, L, S). compute=float64: everything in float64;
    a 16-bit dtype: matmuls in that dtype, softmax in float32 (the low-precision bar).
    Returns out (B, H, L, d_v), lse (B, H, L), p (B, H, L, S)."""
    _, H, L, dk = q.shape
    S = k.shape[2]
    g = H // k.shape[1]
    soft = torch.float64 if compute == torch.float64 else torch.float32
    q, k, v = (x.to(compute) for x in (q, k, v))
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(dk) if scale is None else scale
    s = (q @ k.transpose(-1, -2)).to(soft) * scale
    s = s.masked_fill(~band_allowed(L, S, lo, hi), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(soft)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return (p.to(compute) @ v), lse, p


def make_qkv(B, H, Hkv, L, S, dk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, dk, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, dk, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, dv, generator=g).to(dtype)
    return q, k, v


def make_mask(kind, shape, L, S, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        return torch.rand(shape, generator=g) > 0.25
    return torch.randn(shape, generator=g) * 2


def expand(mask, B, H, L, S):
    return None if mask is None else mask.expand(B, H, L, S)


def tol_check(got, ref64, ref_low, dtype, what):
    """got vs the float64 reference; 16-bit dtypes get 2x the plain 16-bit error."""
    err = (got.double() - ref64.double()).abs().max().item() if got.numel() else 0.0
    if dtype == torch.float64:
        bound = 1e-10
    elif dtype == torch.float32:
        bound = 2e-5 * max(1.0, ref64.abs().max().item())
    else:
        low_err = (ref_low.double() - ref64.double()).abs().max().item() if got.numel() else 0.0
        bound = 2 * low_err + 0.25 * torch.finfo(dtype).eps
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


def low_grads(q, k, v, dout, mask, lo, hi, scale, compute):
    qs, ks, vs = (x.detach().to(compute).requires_grad_() for x in (q, k, v))
    out, _, _ = reference(qs, ks, vs, mask, lo, hi, scale, compute=compute)
    out.backward(dout.to(compute))
    return qs.grad, ks.grad, vs.grad


def check_case(
    dtype,
    B,
    H,
    Hkv,
    L,
    S,
    dk,
    dv,
    lo=None,
    hi=None,
    mask_kind=None,
    mask_shape=None,
    scale=None,
    grads=True,
    half_dot=None,
):
    q, k, v = make_qkv(B, H, Hkv, L, S, dk, dv, dtype)
    mask = make_mask(mask_kind, mask_shape or (L, S), L, S)
    out, lse = compiled.forward(q, k, v, expand(mask, B, H, L, S), lo, hi, scale, half_dot=half_dot)
    assert out.dtype == dtype and out.shape == (B, H, L, dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not out.isnan().any() and not lse.isnan().any()
    ref_o, ref_lse, _ = reference(q, k, v, mask, lo, hi, scale)
    low = dtype if dtype in HALF else None
    low_o = reference(q, k, v, mask, lo, hi, scale, compute=low)[0] if low else None
    tol_check(out, ref_o, low_o, dtype, "out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "lse = -inf exactly for rows with no key"
    assert (out[empty] == 0).all()
    lse_tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (
        (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= lse_tol
        if (~empty).any()
        else True
    )
    if not grads:
        return
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    dq, dk_, dv_ = compiled.backward(
        q, k, v, out, dout, lse, expand(mask, B, H, L, S), lo, hi, scale
    )
    ref_g = low_grads(q, k, v, dout, mask, lo, hi, scale, torch.float64)
    low_g = low_grads(q, k, v, dout, mask, lo, hi, scale, low) if low else (None,) * 3
    for name, got, r64, rlow in zip(("dq", "dk", "dv"), (dq, dk_, dv_), ref_g, low_g, strict=True):
        assert got.dtype == dtype and got.shape == r64.shape
        assert not got.isnan().any()
        tol_check(got, r64, rlow, dtype, name)


# --------------------------------------------------------------------------- build


def test_vector_width_matches_capability():
    cap = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX512": 16, "AVX2": 8}.get(cap)
    if expected is None:
        pytest.skip(f"capability {cap}")
    assert compiled.vec_width() == expected


def test_build_dir_and_helpers():
    assert compiled.build_error() is None
    d = compiled.extension_dir()
    assert d.is_dir() and any(d.glob("*.so"))
    assert isinstance(compiled.has_bf16_dot(), bool) and isinstance(compiled.has_fp16_dot(), bool)


def test_two_checkouts_do_not_share_a_build_folder(tmp_path, monkeypatch):
    """The same sources at two paths get two build folders: ninja's build file records
    absolute paths, so a shared folder made each checkout rebuild over the other."""
    copies = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for src in compiled._sources():
            (folder / src.name).write_bytes(src.read_bytes())
        copies.append(sorted(folder.iterdir()))
    keys = []
    for files in copies:
        monkeypatch.setattr(compiled, "_sources", lambda files=files: files)
        keys.append(compiled._build_config()[0])
    assert keys[0] != keys[1]
    monkeypatch.setattr(compiled, "_sources", lambda: copies[0])
    assert compiled._build_config()[0] == keys[0]  # stable for one checkout


def test_no_compile_env_falls_back(tmp_path):
    code = (
        "from qkv.backends.flash import compiled as c\n"
        "assert not c.available() and 'QKV_NO_COMPILE' in c.build_error()\n"
        "assert c.load() is None\n"
    )
    env = {**os.environ, "QKV_NO_COMPILE": "1", "QKV_EXTENSIONS_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not any(tmp_path.iterdir()), "nothing built when disabled"


# --------------------------------------------------------------------------- forward/backward

GRID = [
    # dtype, B, H, Hkv, L, S, dk, dv, lo, hi, mask kind, mask shape
    (torch.float64, 2, 4, 2, 97, 97, 32, 48, None, None, None, None),
    (torch.float32, 2, 4, 2, 97, 97, 32, 48, None, None, None, None),
    (torch.float32, 1, 4, 1, 65, 130, 64, 64, None, 0, "bool", (65, 130)),  # GQA 4, L < S
    (torch.float32, 2, 2, 2, 130, 65, 80, 40, None, 0, None, None),  # L > S: empty rows
    (torch.float32, 2, 2, 1, 63, 63, 16, 16, -15, 0, "float", (2, 1, 1, 63)),  # window causal
    (torch.float32, 1, 2, 2, 64, 64, 16, 16, -9, 9, "bool", (1, 2, 64, 64)),  # window both sides
    (torch.float32, 2, 4, 4, 7, 513, 32, 32, None, None, "float", (2, 4, 1, 513)),
    (torch.float32, 1, 1, 1, 1, 1, 8, 8, None, None, None, None),
    (torch.float32, 1, 2, 1, 1, 511, 128, 128, None, 0, None, None),
    (torch.float32, 1, 1, 1, 1025, 1025, 16, 8, None, 0, None, None),
    (torch.float64, 1, 4, 2, 65, 33, 24, 40, -7, 3, "float", (1, 4, 65, 33)),
    (torch.float64, 2, 2, 1, 97, 512, 16, 16, None, 0, "bool", (2, 1, 1, 512)),
    (torch.bfloat16, 2, 4, 2, 97, 97, 32, 48, None, 0, "float", (97, 97)),
    (torch.bfloat16, 1, 4, 1, 64, 200, 64, 64, None, None, "bool", (1, 4, 64, 200)),
    (torch.float16, 2, 2, 2, 65, 65, 80, 40, -20, 0, "float", (2, 2, 1, 65)),
    (torch.float16, 1, 4, 2, 130, 100, 32, 32, None, 0, None, None),
]


@pytest.mark.parametrize(
    "case", GRID, ids=lambda c: f"{str(c[0])[6:]}-L{c[4]}-S{c[5]}-g{c[2] // c[3]}-{c[10]}"
)
def test_forward_backward_grid(case):
    dtype, B, H, Hkv, L, S, dk, dv, lo, hi, mk, ms = case
    check_case(dtype, B, H, Hkv, L, S, dk, dv, lo, hi, mk, ms)


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_scales(scale):
    check_case(torch.float32, 1, 2, 1, 33, 70, 16, 16, None, 0, "float", (33, 70), scale=scale)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("half_dot", [False, True])
def test_half_paths(dtype, half_dot):
    if half_dot and not (
        compiled.has_bf16_dot() if dtype == torch.bfloat16 else compiled.has_fp16_dot()
    ):
        pytest.skip("no 16-bit dot instructions on this CPU")
    check_case(
        dtype,
        1,
        4,
        2,
        129,
        257,
        64,
        64,
        None,
        0,
        "float",
        (129, 257),
        grads=False,
        half_dot=half_dot,
    )


BRGEMM_CASES = [
    # B, H, Hkv, L, S, dk, dv, lo, hi, mask kind, mask shape, scale
    (1, 4, 2, 300, 300, 64, 64, -100, 0, None, None, None),  # band not 64-aligned
    (2, 2, 2, 37, 5, 16, 8, None, None, None, None, None),  # S < one packed chunk
    (1, 2, 1, 130, 67, 32, 48, None, 0, "bool", (1, 2, 130, 67), None),  # L > S: empty rows
    (1, 2, 2, 70, 600, 64, 32, None, None, "float", (70, 600), None),  # S > one key tile
    (1, 2, 2, 33, 70, 16, 16, None, 0, None, None, -0.5),  # negative scale
]


@pytest.mark.parametrize("case", BRGEMM_CASES, ids=lambda c: f"L{c[3]}-S{c[4]}-{c[9]}")
@pytest.mark.parametrize("dtype", HALF)
def test_half_dot_edges(dtype, case, monkeypatch):
    """The 16-bit product paths (oneDNN brgemm where the CPU supports it, else MKL's
    CBLAS) on chunk/tile boundaries, and the two agree when both are available."""
    if not (compiled.has_bf16_dot() if dtype == torch.bfloat16 else compiled.has_fp16_dot()):
        pytest.skip("no 16-bit dot instructions on this CPU")
    B, H, Hkv, L, S, dk, dv, lo, hi, mk, ms, scale = case
    check_case(dtype, B, H, Hkv, L, S, dk, dv, lo, hi, mk, ms, scale, grads=False, half_dot=True)
    q, k, v = make_qkv(B, H, Hkv, L, S, dk, dv, dtype)
    mask = expand(make_mask(mk, ms or (L, S), L, S), B, H, L, S)
    out, lse = compiled.forward(q, k, v, mask, lo, hi, scale, half_dot=True)
    monkeypatch.setenv("QKV_FLASH_NO_BRGEMM", "1")
    out2, lse2 = compiled.forward(q, k, v, mask, lo, hi, scale, half_dot=True)
    assert (out.float() - out2.float()).abs().max().item() <= 0.02
    fin = torch.isfinite(lse2)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - lse2[fin]).abs().max().item() <= 1e-4 if fin.any() else True


@pytest.mark.parametrize("dtype", HALF)
def test_half_dot_backward_op(dtype):
    """The backward's 16-bit GEMM path, called through the op directly (compiled.backward
    takes it only where the CPU has float-accumulating 16-bit dot products)."""
    if not (compiled.has_bf16_dot() if dtype == torch.bfloat16 else compiled.has_fp16_dot()):
        pytest.skip("no 16-bit dot instructions on this CPU")
    B, H, Hkv, L, S, d = 1, 4, 2, 97, 130, 32
    q, k, v = make_qkv(B, H, Hkv, L, S, d, d, dtype)
    mask = make_mask("bool", (L, S), L, S)
    full = expand(mask, B, H, L, S)
    out, lse = compiled.forward(q, k, v, full, None, 0)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    ops = compiled.load()
    got = ops.backward(
        q, k, v, out, dout, lse, full, -compiled.UNBOUNDED, 0, 1 / math.sqrt(d), True
    )
    ref_g = low_grads(q, k, v, dout, mask, None, 0, None, torch.float64)
    low_g = low_grads(q, k, v, dout, mask, None, 0, None, dtype)
    for name, g, r64, rlow in zip(("dq", "dk", "dv"), got, ref_g, low_g, strict=True):
        assert g.dtype == dtype and not g.isnan().any()
        tol_check(g, r64, rlow, dtype, name)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("big", [-1e5, torch.finfo(torch.float32).min])
def test_huge_negative_float_mask_in_half(dtype, big):
    """A float mask is added in float32: -1e5 and float32's min behave like -inf."""
    B, H, L, S = 1, 2, 16, 40
    q, k, v = make_qkv(B, H, H, L, S, 16, 16, dtype)
    mask = torch.zeros(L, S)
    mask[:, ::3] = big
    out, lse = compiled.forward(q, k, v, mask.expand(B, H, L, S))
    ref_o, ref_lse, _ = reference(q, k, v, mask == 0)
    assert not out.isnan().any() and out.abs().max() > 0
    tol_check(out, ref_o, reference(q, k, v, mask == 0, compute=dtype)[0], dtype, "out")
    assert (lse.double() - ref_lse).abs().max() < 1e-3


def test_fully_masked_rows_are_zero():
    B, H, L, S = 2, 2, 33, 40
    q, k, v = make_qkv(B, H, H, L, S, 16, 16, torch.float32)
    mask = torch.rand(B, 1, L, S) > 0.5
    mask[:, :, ::4] = False  # every fourth row sees nothing
    m = mask.expand(B, H, L, S)
    out, lse = compiled.forward(q, k, v, m)
    assert (out[:, :, ::4] == 0).all() and torch.isneginf(lse[:, :, ::4]).all()
    dout = torch.randn_like(out)
    dq, dk, dv = compiled.backward(q, k, v, out, dout, lse, m)
    assert (dq[:, :, ::4] == 0).all()
    assert all(not g.isnan().any() for g in (dq, dk, dv))
    w = compiled.weights(q, k, lse, m)
    assert (w[:, :, ::4] == 0).all() and not w.isnan().any()
    # A float mask of -inf everywhere in a row behaves the same.
    fm = torch.zeros(L, S).masked_fill(~mask[0, 0], -math.inf).expand(B, H, L, S)
    out2, _ = compiled.forward(q, k, v, fm)
    assert (out2[0, :, ::4] == 0).all() and not out2.isnan().any()


def test_strided_inputs():
    """(B, L, H, d) tensors viewed as (B, H, L, d), and a non-contiguous last dim."""
    B, H, L, S, d = 2, 4, 50, 60, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, L, H, d, generator=g).transpose(1, 2)
    k = torch.randn(B, S, 2, d, generator=g).transpose(1, 2)
    v = torch.randn(B, 2, d, S, generator=g).transpose(2, 3)  # last dim strided
    out, _ = compiled.forward(q, k, v, hi=0)
    ref_o, _, _ = reference(q, k, v, hi=0)
    assert (out.double() - ref_o).abs().max() < 1e-5


def test_need_lse_false():
    q, k, v = make_qkv(1, 2, 2, 10, 10, 8, 8, torch.float32)
    out, lse = compiled.forward(q, k, v, need_lse=False)
    assert lse is None
    assert torch.equal(out, compiled.forward(q, k, v)[0])


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weights(dtype):
    B, H, Hkv, L, S = 2, 4, 2, 70, 90
    q, k, v = make_qkv(B, H, Hkv, L, S, 24, 24, dtype)
    mask = make_mask("float", (B, 1, L, S), L, S)
    m = expand(mask, B, H, L, S)
    _, lse = compiled.forward(q, k, v, m, -30, 0)
    _, _, p = reference(q, k, v, mask, -30, 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    w = compiled.weights(q, k, lse, m, -30, 0)
    assert w.dtype == acc and w.shape == (B, H, L, S)
    assert (w.double() - p).abs().max() < tol
    sums = w.double().sum(-1)
    nonempty = p.sum(-1) > 0
    assert (sums[nonempty] - 1).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    rows = torch.tensor([0, 5, 69, 33, 5])
    wr = compiled.weights(q, k, lse, m, -30, 0, rows=rows)
    assert wr.shape == (B, H, 5, S) and (wr.double() - p[:, :, rows]).abs().max() < tol
    wa = compiled.weights(q, k, lse, m, -30, 0, rows=rows, average_heads=True)
    assert wa.shape == (B, 5, S) and (wa.double() - p[:, :, rows].mean(1)).abs().max() < tol


# --------------------------------------------------------------------------- autograd


class _Attention(torch.autograd.Function):
    """Wraps the C++ forward/backward. q (B, H, L, d_k), k, v (B, H_kv, S, d)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, lo, hi, scale):
        out, lse = compiled.forward(q, k, v, mask, lo, hi, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (mask, lo, hi, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = compiled.backward(q, k, v, out, dout.contiguous(), lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


@pytest.mark.parametrize(
    "lo,hi,mask_kind", [(None, None, None), (None, 0, "float"), (-3, 2, "bool")]
)
def test_gradcheck_fp64(lo, hi, mask_kind):
    B, H, Hkv, L, S = 1, 2, 1, 9, 11
    q, k, v = (x.requires_grad_() for x in make_qkv(B, H, Hkv, L, S, 5, 3, torch.float64))
    mask = expand(make_mask(mask_kind, (L, S), L, S), B, H, L, S)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.clone()
        mask[..., :, 0] = True  # keep every row non-empty: gradcheck needs smooth rows
    assert torch.autograd.gradcheck(
        lambda a, b, c: _Attention.apply(a, b, c, mask, lo, hi, 0.7), (q, k, v)
    )


@pytest.mark.parametrize("B,Hkv", [(1, 1), (2, 4)])
def test_backward_is_deterministic(B, Hkv):
    """B * H_kv = 1 forces key splits with per-split dq buffers; 8 runs one item per head."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = make_qkv(B, 2 * Hkv, Hkv, 300, 1100, 32, 32, torch.float32)
        out, lse = compiled.forward(q, k, v, hi=0)
        dout = torch.randn_like(out)
        first = compiled.backward(q, k, v, out, dout, lse, hi=0)
        for _ in range(2):
            again = compiled.backward(q, k, v, out, dout, lse, hi=0)
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    finally:
        torch.set_num_threads(old)


def test_torch_op_registered_with_fake():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, 4, torch.float32)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        out, lse = torch.ops.qkv_flash.forward(fq, fk, fv, None, -compiled.UNBOUNDED, 0, 0.5)
        assert out.shape == (1, 2, 8, 4) and lse.shape == (1, 2, 8)


# --------------------------------------------------------------------------- slow sweep


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "L,S", [(63, 64), (64, 65), (511, 512), (512, 513), (513, 511), (1025, 97)]
)
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("band", [(None, None), (None, 0), (-31, 0), (-31, 31)])
def test_sweep(dtype, L, S, ratio, band):
    check_case(
        dtype,
        1,
        4,
        4 // ratio,
        L,
        S,
        32,
        48,
        *band,
        "bool",
        (1, 1, L, S),
        grads=dtype != torch.float64 or L < 600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_other_isa_builds(tmp_path, capability):
    """The AVX2 and plain builds (what AVX2-only / other CPUs get) compile and agree."""
    code = (
        "import torch\n"
        "from qkv.backends.flash import compiled as c\n"
        "assert c.available(), c.build_error()\n"
        "q, k, v = (torch.randn(1, 4, 100, 32) for _ in range(3))\n"
        "o, _ = c.forward(q, k, v, hi=0)\n"
        "r = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)\n"
        "assert (o - r).abs().max() < 1e-5\n"
        "print(c.vec_width())\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "QKV_EXTENSIONS_DIR": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert int(res.stdout.split()[-1]) == 8
