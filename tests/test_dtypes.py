"""Dtypes: float64, float32, bfloat16, float16 (issue 2, point 7 and its acceptance line).

* the output (and the weights) keep the input dtype;
* in fp16/bf16 every fast path's error against a float64 run is at most twice the
  error of the reference backend run in the same precision (support.assert_matches_reference);
* the reference computes its softmax in float32 for half inputs.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends import make_request
from support import (
    MASK_KINDS,
    assert_matches_reference,
    make_mask,
    make_qkv,
    refusal,
    registry_backends,
    skip_if_refused,
)

ALL = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)
# Every registered backend (+ "auto"); those not usable on the CPU are skipped.
BACKENDS = registry_backends()
# The fast paths: compared with the reference, so the reference itself is not among them.
FAST = registry_backends(exclude=("reference",))


def _fn(backend, **kwargs):
    return lambda q, k, v: qkv.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)


def _skip_if_refused(backend, q, k, v, dtype, **kwargs):
    """Skip when ``backend`` refuses q, k, v in ``dtype`` with gradients (as the checks run them)."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    skip_if_refused(backend, qd, kd, vd, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_output_keeps_input_dtype(dtype, backend):
    q, k, v = make_qkv(2, 4, 2, L=5, S=6, d_k=8, d_v=4, dtype=dtype)
    mask = make_mask("float", 2, 4, 5, 6)  # a float64 mask may accompany any input dtype
    skip_if_refused(backend, q, k, v, attn_mask=mask, enable_gqa=True)
    out = qkv.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True, backend=backend
    )
    assert out.dtype == dtype and out.shape == (2, 4, 5, 4)
    assert torch.isfinite(out).all()
    if refusal(backend, q, k, v, attn_mask=mask, enable_gqa=True, need_weights=True) is None:
        res = qkv.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True, backend=backend, need_weights=True
        )
        assert res.output.dtype == dtype and res.weights.dtype == dtype


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_modules_keep_dtype(dtype):
    x = torch.randn(2, 5, 8).to(dtype)
    mha = qkv.MultiHeadAttention(8, 2, num_kv_heads=1).to(dtype)
    out, w = mha(x, is_causal=True, need_weights=True)
    assert out.dtype == dtype and w.dtype == dtype and torch.isfinite(out).all()
    assert mha(x).dtype == dtype
    layer = qkv.SelfAttention(8, 4, 3).to(dtype)
    assert layer(x).dtype == dtype and layer(x, need_weights=True).weights.dtype == dtype
    assert qkv.simple_attention(x).dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_half_precision_error_within_twice_reference(kind, backend, dtype):
    B, H, L, S = 2, 4, 17, 23
    q, k, v = make_qkv(B, H, L=L, S=S, d_k=32)
    mask = make_mask(kind, B, H, L, S)
    _skip_if_refused(backend, q, k, v, dtype, attn_mask=mask)
    assert_matches_reference(_fn(backend, attn_mask=mask), q, k, v, dtype=dtype, attn_mask=mask)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("L,S", [(33, 33), (7, 40), (40, 7)])
def test_half_precision_causal_within_twice_reference(L, S, backend, dtype):
    q, k, v = make_qkv(1, 4, 2, L=L, S=S, d_k=64)
    kw = {"is_causal": True, "enable_gqa": True}
    _skip_if_refused(backend, q, k, v, dtype, **kw)
    assert_matches_reference(_fn(backend, **kw), q, k, v, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_full_precision_matches_reference(backend, dtype):
    q, k, v = make_qkv(2, 4, L=9, S=11, d_k=16)
    mask = make_mask("bool_heads", 2, 4, 9, 11)
    _skip_if_refused(backend, q, k, v, dtype, attn_mask=mask)
    assert_matches_reference(_fn(backend, attn_mask=mask), q, k, v, dtype=dtype, attn_mask=mask)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_reference_softmax_runs_in_float32(dtype):
    """Scores of half inputs are float32 products (never rounded to the half type, which
    could overflow float16), and the softmax runs in float32.

    Evidence: (1) the request's compute dtype is float32; (2) the returned log-sum-exp
    is float32 and agrees with a float64 log-sum-exp of the float32 scores far below
    half resolution; (3) each returned weight is the float32 softmax rounded once to the
    half type (a half softmax rounds several times: exp, sum, divide).
    """
    q, k, v = make_qkv(1, 2, L=16, S=64, d_k=16, dtype=dtype)
    q = q * 4  # large scores: a half-precision log-sum-exp would be off by ~1e-2
    assert make_request(q, k, v).compute_dtype == torch.float32
    res = qkv.scaled_dot_product_attention(q, k, v, need_weights=True, backend="reference")

    scores = (q.float() @ k.float().transpose(-2, -1)) * 0.25  # (1, 2, L, S) float32
    exact_lse = torch.logsumexp(scores.double(), dim=-1)
    assert res.lse.dtype == torch.float32
    lse_err = (res.lse.double() - exact_lse).abs().max().item()
    half_res = torch.finfo(dtype).eps * exact_lse.abs().max().item()
    assert lse_err < 1e-5 < half_res / 4, (lse_err, half_res)

    w32 = torch.softmax(scores, dim=-1)  # (1, 2, L, S) float32
    one_rounding = torch.finfo(dtype).eps / 2 * w32.abs() + 1e-7
    assert ((res.weights.float() - w32).abs() <= one_rounding).all()
    torch.testing.assert_close(res.output, w32.to(dtype) @ v, atol=0, rtol=0)
    # float32 rows sum to 1 before the cast; after it, within L roundings
    assert (w32.sum(-1) - 1).abs().max().item() < 1e-6


def test_float32_inputs_compute_in_float32_and_float64_in_float64():
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_qkv(1, 1, L=2, d_k=2, dtype=dtype)
        assert make_request(q, k, v).compute_dtype == dtype
