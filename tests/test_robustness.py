"""Regressions found by independent peer tests and fuzzing (issue 9), one class per mechanism.

Each test names the defect it pins down; all of them failed before the fix.
"""

from __future__ import annotations

import logging

import pytest
import torch

import qkv
from qkv.backends import backends, make_request
from qkv.backends.flash import flash_config
from support import make_qkv, max_err

HALF = (torch.float16, torch.bfloat16)


def _usable(name: str, request) -> bool:
    b = backends()[name]
    return b.available() and b.supports(request) is None


def _exact(q, k, v, mask=None, scale=None):
    """float64 softmax(q kᵀ scale + mask) v, written out here (independent of qkv)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s + mask.double()
    return torch.softmax(s, dim=-1) @ v


# ----------------------------------------------------------- 1. float-mask policy


@pytest.mark.parametrize("dtype", HALF)
def test_float32_bias_is_added_in_float32_on_every_backend(dtype):
    """A float32 bias near 100 must not be rounded to bfloat16/float16 by any backend."""
    q, k, v = make_qkv(1, 2, L=9, S=11, d_k=16, dtype=torch.float64)
    bias = 100 + torch.rand(1, 2, 9, 11, dtype=torch.float64) * 3
    bias32 = bias.float()
    exact = _exact(q, k, v, bias32)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    ref_err = max_err(
        qkv.scaled_dot_product_attention(ql, kl, vl, attn_mask=bias32, backend="reference"), exact
    )
    for name in [*backends(), "auto"]:
        if name != "auto" and not _usable(name, make_request(ql, kl, vl, attn_mask=bias32)):
            continue
        out = qkv.scaled_dot_product_attention(ql, kl, vl, attn_mask=bias32, backend=name)
        assert max_err(out, exact) <= 2 * ref_err + 1e-6, name


def test_torch_backend_refuses_a_float_mask_it_would_round():
    q, k, v = make_qkv(1, 1, L=4, S=4, d_k=8, dtype=torch.bfloat16)
    bias = torch.full((4, 4), 100.3)
    why = backends()["torch"].supports(make_request(q, k, v, attn_mask=bias))
    assert why is not None and "round" in why
    with pytest.raises(ValueError, match="torch"):
        qkv.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="torch")
    # An exactly representable mask is still served by SDPA.
    exact = torch.zeros(4, 4).masked_fill(torch.eye(4, dtype=torch.bool), float("-inf"))
    assert backends()["torch"].supports(make_request(q, k, v, attn_mask=exact)) is None


@pytest.mark.parametrize("fill", [-1e5, torch.finfo(torch.float32).min])
def test_float16_huge_negative_row_is_a_shift_not_a_dead_row(fill):
    """A float32 mask row of -1e5 (or float32's min) is added in float32: the row gets the
    softmax of its shifted scores (uniform once float32 absorbs the scores), not zeros."""
    q, k, v = make_qkv(1, 2, L=5, S=6, d_k=8, dtype=torch.float16)
    mask = torch.zeros(5, 6)
    mask[2] = fill
    # What float32 arithmetic gives: the mask added to float32 scores.
    s = (q.double() @ k.double().transpose(-2, -1) / 8**0.5).float() + mask
    expected = torch.softmax(s.double(), dim=-1) @ v.double()
    for name in [*backends(), "auto"]:
        if name != "auto" and not _usable(name, make_request(q, k, v, attn_mask=mask)):
            continue
        out = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=name)
        assert out[..., 2, :].abs().sum() > 0, name
        assert max_err(out, expected) < 5e-3, name


# ------------------------------------------------ 2. no fp16 overflow of q·k


@pytest.mark.parametrize("name", ["reference", "flash", "auto"])
def test_float16_unscaled_score_above_65504_does_not_overflow(name):
    q = torch.full((1, 1, 3, 64), 40.0, dtype=torch.float16)
    out = qkv.scaled_dot_product_attention(q, q, q, backend=name)
    assert torch.equal(out, q)


def test_float16_overflow_in_weights_paths():
    x = torch.full((3, 64), 40.0, dtype=torch.float16)
    out, w = qkv.simple_attention(x, scale=1 / 8, need_weights=True)
    assert torch.isfinite(out).all() and torch.equal(out, x)
    layer = qkv.SelfAttention(64, 64).half()
    torch.nn.init.eye_(layer.q_proj.weight)
    torch.nn.init.eye_(layer.k_proj.weight)
    torch.nn.init.eye_(layer.v_proj.weight)
    out, w = layer(x, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()


# ------------------------------------- 3. weights with gradients are never dropped


def test_flash_refuses_weights_that_need_gradients():
    q, k, v = make_qkv(1, 2, L=8, d_k=8, dtype=torch.float32, requires_grad=True)
    why = backends()["flash"].supports(make_request(q, k, v, need_weights=True))
    assert why is not None and "differentiable" in why


def test_auto_weights_carry_their_gradient_at_long_lengths(caplog):
    """L = 512 crosses the size from which "auto" used to route weights to "flash"."""
    q, k, v = make_qkv(1, 1, L=512, d_k=8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name in ("auto", "reference"):
        qc = q.detach().clone().requires_grad_(True)
        res = qkv.scaled_dot_product_attention(qc, k, v, need_weights=True, backend=name)
        (res.weights[..., :5, :].pow(2).sum()).backward()
        grads[name] = qc.grad
    assert max_err(grads["auto"], grads["reference"]) < 1e-12


# ------------------------------------------------ 4. deterministic flash backward


def test_flash_backward_is_bitwise_reproducible_with_threads():
    q, k, v = make_qkv(1, 1, L=300, S=300, d_k=16, dtype=torch.float32, requires_grad=True)
    runs = []
    with flash_config(block_q=32, block_k=64, threads=2):
        for _ in range(4):
            out = qkv.scaled_dot_product_attention(q, k, v, backend="flash")
            dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
            runs.append((dq, dk, dv))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------- 5. float64 dropout precision


def test_flash_dropout_keep_factor_is_float64_in_float64():
    from qkv.backends.flash import loops
    from qkv.backends.flash.tiles import Tiling

    q, k, v = make_qkv(1, 1, L=4, d_k=4, dtype=torch.float64)
    t = Tiling(make_request(q, k, v, dropout_p=0.3), 4, 4)
    keep = loops._keep_scale(7, 0, slice(0, 1), 0, 0, (1, 4, 4), 0.3, t, torch.float64)
    assert keep.dtype == torch.float64
    kept = keep[keep > 0]
    assert kept.numel() and torch.equal(kept, torch.full_like(kept, 1 / 0.7))


# ------------------------------------------- 6. triton interpreter and bfloat16


def test_triton_refuses_bfloat16_on_the_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter serves CPU tensors
    q, k, v = make_qkv(1, 1, L=4, d_k=16, dtype=torch.bfloat16)
    why = backends()["triton"].supports(make_request(q, k, v))
    assert why is not None and "bfloat16" in why
    assert backends()["triton"].supports(make_request(*(t.float() for t in (q, k, v)))) is None


# ------------------------------------------------- 9. refused calls and the cache


@pytest.mark.parametrize(
    "kwargs, backend",
    [({"is_causal": 1}, "auto"), ({"need_weights": True}, "torch")],
)
def test_refused_call_leaves_the_kv_cache_unchanged(kwargs, backend):
    torch.manual_seed(0)
    layer = qkv.MultiHeadAttention(16, 4, causal=True, backend=backend).eval()
    cache = qkv.KVCache()
    x = torch.randn(1, 3, 16)
    layer(x, cache=cache)
    before = cache.keys.clone(), cache.values.clone()
    with pytest.raises((TypeError, ValueError)):
        layer(x, cache=cache, **kwargs)
    assert len(cache) == 3
    assert torch.equal(cache.keys, before[0]) and torch.equal(cache.values, before[1])
    # ... and the next valid call continues from there.
    layer(torch.randn(1, 1, 16), cache=cache)
    assert len(cache) == 4


# ----------------------------------------- 10. huge weight requests refused up front


def test_huge_weight_request_is_refused_before_any_work():
    q = torch.randn(1, 8, 40960, 8).expand(64, 8, 40960, 8)  # no memory for the inputs
    with pytest.raises(ValueError, match=r"need_weights.*weight_rows.*average_heads"):
        qkv.scaled_dot_product_attention(q, q, q, need_weights=True)
    # Asking for less is served.
    small = q[:1, :1, :64]
    res = qkv.scaled_dot_product_attention(small, small, small, need_weights=True, weight_rows=[0])
    assert res.weights.shape == (1, 1, 1, 64)


# ------------------------------------------------------ 12. validation gaps


@pytest.mark.parametrize("rows", ["0", [10**30], object(), [1.0], [[0]], [], torch.tensor([0.5])])
def test_bad_weight_rows_name_the_argument(rows):
    q, k, v = make_qkv(1, 1, L=4, d_k=4)
    with pytest.raises((TypeError, ValueError), match="weight_rows"):
        qkv.scaled_dot_product_attention(q, k, v, need_weights=True, weight_rows=rows)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_meta_tensors_name_the_argument(which):
    tensors = dict(zip("qkv", make_qkv(1, 1, L=4, d_k=4), strict=True))
    tensors[which] = torch.empty(1, 1, 4, 4, device="meta", dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"\b{which}\b.*meta"):
        qkv.scaled_dot_product_attention(tensors["q"], tensors["k"], tensors["v"])


def test_all_meta_inputs_name_the_argument():
    q = torch.empty(1, 1, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"^q is a meta tensor"):
        qkv.scaled_dot_product_attention(q, q, q)


def test_self_attention_mask_must_be_a_tensor():
    with pytest.raises(TypeError, match="attn_mask"):
        qkv.SelfAttention(4, 4)(torch.randn(3, 4), attn_mask=[[True] * 3] * 3)


def test_auto_logs_when_it_skips_flash_for_weights_with_grad(caplog):
    q, k, v = make_qkv(1, 1, L=600, d_k=4, dtype=torch.float32, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="qkv"):
        res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True)
    assert res.backend == "reference"
