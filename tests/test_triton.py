"""The ``"triton"`` backend against the reference: outputs, gradients, weights, limits.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.

Without a CUDA device the kernels run in Triton's CPU interpreter on CPU tensors:
``TRITON_INTERPRET=1`` is set for this module only (and restored afterwards, so
other test modules see the process as it was), and the kernels module is rebuilt
for that mode if something imported it before. On a CUDA machine the same tests run
the compiled kernels on the GPU, and the ``gpu`` tests add bf16 and larger shapes.
The interpreter handles float32 and float16 (it mishandles bfloat16), and is slow:
shapes stay small (16 x 16 tiles, so L, S up to 40 cover full, partial and skipped
tiles); the wider sweep is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import qkv
from support import MASK_KINDS, assert_matches_reference, make_mask, make_qkv, max_err

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="module")
def _triton_mode():
    """Interpreter on CPU machines, compiled kernels on CUDA ones; env restored after."""
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        # One tile per kernel variant: correctness does not need tuning, and timing
        # four candidates of every shape/mask variant would dominate a GPU test run.
        mp.setenv("QKV_TRITON_AUTOTUNE", "0")
        yield


def _device() -> torch.device:
    from qkv.backends.triton.config import interpreting

    return torch.device("cuda" if CUDA and not interpreting() else "cpu")


def _on(t, device):
    return None if t is None else t.to(device)


def triton_fn(attn_mask=None, **kwargs):
    """``fn(q, k, v)`` running the triton backend on the test device, returning CPU."""

    def fn(q, k, v):
        dev = _device()
        out = qkv.scaled_dot_product_attention(
            q.to(dev), k.to(dev), v.to(dev), attn_mask=_on(attn_mask, dev), backend="triton",
            **kwargs,
        )  # fmt: skip
        return out.cpu()

    return fn


def check_against_reference(
    q, k, v, dtype, attn_mask=None, grads=True, **kwargs
) -> dict[str, float]:
    """Triton vs the reference (outputs and, with ``grads``, dq, dk, dv)."""
    fn = triton_fn(attn_mask=attn_mask, **kwargs)
    return assert_matches_reference(
        fn, q, k, v, dtype=dtype, grads=grads, attn_mask=attn_mask, **kwargs
    )


# --------------------------------------------------------------------------- outputs + grads

# (name, make_qkv kwargs, sdpa kwargs): each exercises a different tile-range path.
CASES = [
    ("plain_odd_width", dict(B=2, H=2, L=33, d_k=24), {}),
    ("causal", dict(B=1, H=2, L=33, d_k=16), dict(is_causal=True)),
    ("causal_L<S", dict(B=1, H=2, L=7, S=37, d_k=40, d_v=16), dict(is_causal=True)),
    ("causal_L>S_empty_rows", dict(B=1, H=2, L=37, S=7, d_k=16), dict(is_causal=True)),
    ("window_causal", dict(B=1, H=2, L=40, d_k=16), dict(is_causal=True, window=5)),
    ("window_two_sided", dict(B=1, H=2, L=12, S=35, d_k=16), dict(window=4)),
    ("gqa_causal", dict(B=1, H=4, H_kv=2, L=20, d_k=16), dict(is_causal=True, enable_gqa=True)),
    ("decode_L1", dict(B=2, H=2, L=1, S=33, d_k=16), dict(is_causal=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("name", "shape", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, shape, kwargs, dtype):
    q, k, v = make_qkv(**shape)
    check_against_reference(q, k, v, dtype, **kwargs)


@pytest.mark.parametrize("kind", [k for k in MASK_KINDS if k != "none"])
def test_masks_with_gqa(kind):
    """Every mask kind (with an empty row), read through broadcast strides, with GQA."""
    B, H, H_kv, L, S = 2, 4, 2, 7, 20
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, d_k=16, d_v=24)
    mask = make_mask(kind, B, H, L, S)
    check_against_reference(q, k, v, torch.float32, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_fp16_with_causal(kind):
    B, H, L = 2, 2, 20
    q, k, v = make_qkv(B=B, H=H, L=L, d_k=16)
    check_against_reference(
        q, k, v, torch.float16, attn_mask=make_mask(kind, B, H, L, L), is_causal=True
    )


def test_batch_dims_and_broadcast_masks():
    """Several leading dims (flattened for the kernels), none at all, and masks that
    broadcast over some of them."""
    q, k, v = make_qkv(B=2 * 3, H=2, L=9, S=18, d_k=16)
    q, k, v = (t.reshape(2, 3, *t.shape[1:]) for t in (q, k, v))  # (2, 3, H, L|S, d)
    m1 = torch.rand(2, 1, 1, 9, 18) > 0.3  # broadcast over the second batch dim and H
    m2 = torch.rand(1, 3, 2, 1, 18) > 0.2  # broadcast over the first batch dim and L
    for m in (m1, m2):
        check_against_reference(q, k, v, torch.float32, attn_mask=m, grads=False)
    q1, k1, v1 = (t[0, 0] for t in (q, k, v))  # (H, L|S, d): no batch dims
    check_against_reference(q1, k1, v1, torch.float32, attn_mask=m1[0, 0, 0], is_causal=False)


def test_all_masked_rows_zero_output_finite_grads():
    B, H, L, S = 2, 2, 9, 17
    q, k, v = make_qkv(B=B, H=H, L=L, S=S, d_k=16, requires_grad=True)
    mask = make_mask("padding", B, H, L, S)  # batch 0 has no key at all
    mask = mask & make_mask("broadcast_2d", B, H, L, S)  # and row L // 2 is empty everywhere
    dev = _device()
    qd, kd, vd = (t.detach().float().to(dev).requires_grad_(True) for t in (q, k, v))
    res = qkv.scaled_dot_product_attention(
        qd, kd, vd, attn_mask=mask.to(dev), backend="triton", need_weights=False
    )
    res.sum().backward()
    out = res.detach().cpu()
    assert out[0].abs().max() == 0
    assert out[:, :, L // 2].abs().max() == 0
    for g in (qd.grad, kd.grad, vd.grad):
        assert torch.isfinite(g).all()
    assert qd.grad.cpu()[0].abs().max() == 0  # an empty row's query gets no gradient
    assert kd.grad.cpu()[0].abs().max() == 0 and vd.grad.cpu()[0].abs().max() == 0
    assert out[1, :, 0].abs().max() > 0  # live rows are not zeroed


# --------------------------------------------------------------------------- weights and LSE


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(is_causal=True),
        dict(is_causal=True, weight_rows=[0, 5, 8], average_heads=True),
        dict(window=3, weight_rows=[4, 1]),
        dict(mask="float", average_heads=True),
        dict(mask="bool"),
    ],
    ids=["causal", "rows_avg", "window_rows", "float_avg", "bool_dead_row"],
)
def test_weights_and_lse_from_saved_lse(kwargs):
    kwargs = dict(kwargs)
    B, H, H_kv, L, S = 2, 4, 2, 9, 21
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, d_k=24, dtype=torch.float32)
    mask = make_mask(kwargs.pop("mask"), B, H, L, S) if "mask" in kwargs else None
    ref = qkv.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True, need_weights=True, backend="reference", **kwargs
    )
    dev = _device()
    got = qkv.scaled_dot_product_attention(
        q.to(dev), k.to(dev), v.to(dev), attn_mask=_on(mask, dev), enable_gqa=True,
        need_weights=True, backend="triton", **kwargs,
    )  # fmt: skip
    assert got.backend == "triton"
    assert got.weights.shape == ref.weights.shape
    assert max_err(got.weights.cpu(), ref.weights) < 2e-6
    assert max_err(got.output.cpu(), ref.output) < 2e-5
    # LSE: natural log, -inf exactly where the reference has an empty row.
    lse, ref_lse = got.lse.cpu(), ref.lse
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert max_err(lse[finite], ref_lse[finite]) < 2e-5


# --------------------------------------------------------------------------- limits and wiring


def test_refuses_what_it_does_not_implement():
    q, k, v = make_qkv(B=1, H=2, L=5, d_k=16, dtype=torch.float32)
    dev = _device()
    q, k, v = q.to(dev), k.to(dev), v.to(dev)

    def reason(**kw):
        with pytest.raises(ValueError, match="backend 'triton' cannot serve") as info:
            qkv.scaled_dot_product_attention(q, k, v, backend="triton", **kw)
        return str(info.value)

    assert "dropout" in reason(dropout_p=0.1)
    q64 = q.double()
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        qkv.scaled_dot_product_attention(q64, k.double(), v.double(), backend="triton")
    wide = torch.zeros(1, 2, 5, 264, device=dev)
    with pytest.raises(ValueError, match="up to 256"):
        qkv.scaled_dot_product_attention(wide, wide, wide, backend="triton")
    qg = q.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="not differentiable"):
        qkv.scaled_dot_product_attention(qg, k, v, need_weights=True, backend="triton")
    fmask = torch.zeros(5, 5, device=dev, requires_grad=True)
    assert "attn_mask" in reason(attn_mask=fmask)


def test_auto_never_picks_triton_for_cpu_tensors(caplog):
    """Even with the interpreter on, ``auto`` leaves CPU tensors to CPU backends, and
    says nothing about triton (it is not a candidate there, so nothing was skipped)."""
    q, k, v = make_qkv(B=1, H=2, L=5, d_k=16, dtype=torch.float32)
    with caplog.at_level("INFO", logger="qkv"):
        res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True)
    assert res.backend != "triton"
    assert "triton" not in caplog.text


@pytest.mark.skipif(CUDA, reason="checks the CPU-only wiring")
def test_available_only_with_interpreter_on_cpu(monkeypatch):
    backend = qkv.get_backend("triton")
    assert backend.available()  # the module fixture turned the interpreter on
    assert "triton" in qkv.backends()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not backend.available()
    assert "triton" not in qkv.backends()
    q, k, v = make_qkv(B=1, H=1, L=3, d_k=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="not available here"):
        qkv.scaled_dot_product_attention(q, k, v, backend="triton")


def test_kernels_rebuilt_when_the_mode_changes(monkeypatch):
    """``triton.jit`` fixes the mode when it decorates: the loader rebuilds the module
    if it was imported under the other setting (e.g. before this test module ran)."""
    from qkv.backends.triton import autograd

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autograd.load_kernels().INTERPRETED is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autograd.load_kernels().INTERPRETED is True
    monkeypatch.undo()
    autograd.load_kernels()  # back to this module's mode


def test_masks_are_read_through_strides_not_copied():
    from qkv.backends.triton.autograd import prepare_mask

    pad = torch.rand(3, 1, 1, 20) > 0.5  # (B, 1, 1, S)
    arg = prepare_mask(pad, (3,), 4, 7, 20)
    assert arg.strides == (20, 0, 0, 1) and arg.kind == 1
    assert arg.tensor.data_ptr() == pad.data_ptr()  # bool viewed as uint8, same memory
    two_d = torch.zeros(7, 20)  # (L, S) float, no batch dims in the mask
    arg = prepare_mask(two_d, (3,), 4, 7, 20)
    assert arg.strides == (0, 0, 20, 1) and arg.kind == 2
    assert arg.tensor.data_ptr() == two_d.data_ptr()
    expanded = torch.ones(1, 20, dtype=torch.bool).expand(7, 20)  # stride 0 over L
    assert prepare_mask(expanded, (2, 3), 4, 7, 20).strides == (0, 0, 0, 1)


def test_autotune_candidates_follow_head_width_and_length(monkeypatch):
    """The pruning hook Triton calls (positional args in ``named_args``, the rest as
    keywords): candidates of the call's width, no tiles taller than the sequence."""
    from qkv.backends.triton import config

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QKV_TRITON_AUTOTUNE", raising=False)
    configs = config.tile_configs("fwd")
    hook = config.prune("fwd")
    tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cs}  # noqa: E731
    long = hook(configs, {"TUNE_L": 8192}, BLOCK_DK=128, BLOCK_DV=128, TUNE_S=8192)
    assert tiles(long) == {(t.block_m, t.block_n, t.num_warps) for t in config._table("fwd", 128)}
    short = hook(configs, {}, BLOCK_DK=64, BLOCK_DV=32, TUNE_L=1, TUNE_S=4096)
    assert short and all(c.kwargs["BLOCK_M"] <= 64 for c in short)  # decoding: no 128-row tiles
    monkeypatch.setenv("QKV_TRITON_AUTOTUNE", "0")  # no timing: the table's first tile
    (first,) = hook(configs, {"TUNE_L": 8192}, BLOCK_DK=128, BLOCK_DV=128, TUNE_S=8192)
    assert tiles([first]) == {(128, 64, 8)}
    assert config.padded_width(40) == 64 and config.padded_width(8) == 16
    with pytest.raises(ValueError, match="power of two"):
        config.TileConfig(48, 64, 4, 2)


def test_importing_qkv_does_not_import_triton():
    code = "import sys, qkv; qkv.backends(); print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- H100 builds

_COMMON = dict(PRECISION="tf32", BLOCK_M=64, BLOCK_N=32)
BUILDS = [
    # Every feature at once, odd widths (40 -> 64, 24 -> 32 padded), float16.
    ("attn_fwd", "fp16", dict(D_K=40, D_V=24, BLOCK_DK=64, BLOCK_DV=32, CAUSAL=True,
                              WINDOWED=True, MASK_KIND=2, **_COMMON)),
    ("attn_bwd_dkdv", "bf16", dict(D_K=128, D_V=128, BLOCK_DK=128, BLOCK_DV=128, CAUSAL=True,
                                   WINDOWED=False, MASK_KIND=1, PRECISION="tf32", BLOCK_M=32,
                                   BLOCK_N=64)),  # keys are the MMA rows here: 64 for wgmma
    ("attn_bwd_dq", "bf16", dict(D_K=80, D_V=64, BLOCK_DK=128, BLOCK_DV=64, CAUSAL=False,
                                 WINDOWED=True, MASK_KIND=1, **_COMMON)),
    ("attn_weights", "bf16", dict(D_K=64, BLOCK_DK=64, CAUSAL=True, WINDOWED=False,
                                  MASK_KIND=2, AVERAGE=True, PRECISION="tf32", BLOCK_M=64,
                                  BLOCK_N=64)),  # the launcher's GPU tile
]  # fmt: skip


def test_compiled_kernels_build_for_h100():
    """The interpreter never compiles: build the real kernels for sm_90 (no GPU needed)
    and check they use Hopper tensor cores (wgmma) and asynchronous copies.

    In a fresh process without TRITON_INTERPRET: Triton builds its own standard
    library once, compiled or interpreted, when it is first imported, and this process
    may have imported it for the interpreter.
    """
    code = (
        "import json, sys\n"
        "from dataclasses import asdict\n"
        "from qkv.backends.triton import aot\n"
        "if not aot.tools_present():\n"
        "    print('NO-TOOLS'); sys.exit()\n"
        "for kernel, dtype, const in json.loads(sys.argv[1]):\n"
        "    rep = aot.build(kernel, dtype=dtype, num_warps=4, num_stages=2, **const)\n"
        "    print(json.dumps(asdict(rep)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(BUILDS)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.strip() == "NO-TOOLS":
        pytest.skip("this Triton install has no NVIDIA ptxas/cuobjdump")
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(reports) == len(BUILDS)
    for (kernel, _, _), rep in zip(BUILDS, reports, strict=True):
        assert rep["wgmma"] > 0, kernel
        if kernel != "attn_weights":  # one pass over keys: nothing to pipeline
            assert rep["cp_async"] > 0, kernel
        assert rep["shared_bytes"] <= 227 * 1024, kernel


# --------------------------------------------------------------------------- wider sweeps


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d_k", [16, 40, 64, 80, 128])
@pytest.mark.parametrize(("L", "S"), [(1, 1), (17, 17), (48, 48), (50, 19), (19, 50)])
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(is_causal=True), dict(is_causal=True, window=7), dict(mask="bool_heads")],
    ids=["full", "causal", "window", "mask"],
)
def test_sweep(d_k, L, S, kwargs, dtype):
    kwargs = dict(kwargs)
    q, k, v = make_qkv(B=1, H=2, H_kv=1, L=L, S=S, d_k=d_k, seed=d_k + L)
    if "mask" in kwargs:
        kwargs["attn_mask"] = make_mask(kwargs.pop("mask"), 1, 2, L, S)
    check_against_reference(q, k, v, dtype, enable_gqa=True, **kwargs)


@pytest.mark.slow
def test_head_width_256():
    q, k, v = make_qkv(B=1, H=1, L=20, d_k=256, d_v=200)
    check_against_reference(q, k, v, torch.float32, is_causal=True)


# --------------------------------------------------------------------------- GPU only


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d_k", [64, 96, 128, 256])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(is_causal=True),
        dict(is_causal=True, window=100),
        dict(mask="bool"),
        dict(mask="float"),
        dict(mask="padding"),
    ],
    ids=["full", "causal", "window", "bool", "float", "padding"],
)
def test_gpu_matches_reference(dtype, d_k, kwargs):
    kwargs = dict(kwargs)
    B, H, H_kv, L, S = 2, 8, 2, 300, 517
    q, k, v = make_qkv(B=B, H=H, H_kv=H_kv, L=L, S=S, d_k=d_k, seed=d_k)
    if "mask" in kwargs:
        kwargs["attn_mask"] = make_mask(kwargs.pop("mask"), B, H, L, S)
    check_against_reference(q, k, v, dtype, enable_gqa=True, **kwargs)


@pytest.mark.gpu
@gpu
def test_gpu_auto_uses_triton_and_long_sequences():
    q, k, v = (t.cuda() for t in make_qkv(B=1, H=4, L=4096, d_k=128, dtype=torch.bfloat16))
    res = qkv.scaled_dot_product_attention(q, k, v, is_causal=True, need_weights=True,
                                           weight_rows=[0, 4095])  # fmt: skip
    assert res.backend == "triton"
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True
        )
    assert max_err(res.output, ref) < 2e-2
    assert torch.allclose(
        res.weights.float().sum(-1), torch.ones(1, 4, 2, device="cuda"), atol=1e-2
    )
