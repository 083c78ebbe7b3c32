"""Exact weights from the "flash" backend (issue 3, point 2).

The weights are recomputed tile by tile against the log-sum-exp the forward saved; they
must equal the reference's (1e-6 in float32), also for a subset of query rows and when
averaged over heads, and nothing of the full (B, H, L, S) size may be allocated when
less was asked for.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends.flash import flash_config
from support import MASK_KINDS, make_mask, make_qkv

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def weights(backend, q, k, v, **kwargs):
    return qkv.scaled_dot_product_attention(q, k, v, backend=backend, need_weights=True, **kwargs)


def compare(q, k, v, dtype, blocks=None, **kwargs):
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ref = weights("reference", q, k, v, **kwargs)
    with flash_config(**(blocks or {"block_q": 8, "block_k": 16})):
        got = weights("flash", q, k, v, **kwargs)
    assert got.backend == "flash" and got.weights.dtype == dtype
    assert got.weights.shape == ref.weights.shape
    err = (got.weights - ref.weights).abs().max().item()
    assert err <= TOL[dtype], f"weights differ by {err:.2e}"
    torch.testing.assert_close(got.output, ref.output, atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_full_weights_equal_reference(kind, dtype):
    q, k, v = make_qkv(2, 4, 2, L=29, S=45, d_k=16)
    mask = make_mask(kind, 2, 4, 29, 45)
    compare(q, k, v, dtype, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_rows_and_head_average(causal, average):
    q, k, v = make_qkv(2, 6, 3, L=40, d_k=8)
    mask = make_mask("bool_heads", 2, 6, 40, 40)
    rows = [39, 0, 17, 17, -3, 8]  # unsorted, repeated, negative (= 37)
    got = compare(
        q, k, v, torch.float32, attn_mask=mask, is_causal=causal, enable_gqa=True,
        weight_rows=rows, average_heads=average,
    )  # fmt: skip
    assert got.weights.shape == ((2, 6, 40) if average else (2, 6, 6, 40))


@pytest.mark.parametrize("window", [3, 12])
def test_window_and_unequal_lengths(window):
    q, k, v = make_qkv(1, 2, L=20, S=50, d_k=8)
    compare(q, k, v, torch.float32, is_causal=True, window=window, weight_rows=[0, 10, 19])
    compare(q, k, v, torch.float64, window=window, average_heads=True)


def test_weights_sum_to_one_or_zero():
    q, k, v = make_qkv(1, 2, L=30, S=10, d_k=8, dtype=torch.float32)
    with flash_config(block_q=8, block_k=4):
        res = weights("flash", q, k, v, is_causal=True)  # rows 0..19 see no key
    sums = res.weights.sum(-1)
    assert torch.equal(sums[..., :20], torch.zeros_like(sums[..., :20]))
    torch.testing.assert_close(sums[..., 20:], torch.ones_like(sums[..., 20:]), atol=1e-6, rtol=0)


def test_weights_with_gradients_go_to_a_backend_that_differentiates_them():
    """flash weights carry no gradient: flash refuses, and "auto" serves the request on a
    backend whose weights are differentiable (never silently dropping the gradient)."""
    q, k, v = make_qkv(1, 4, L=600, S=700, d_k=16, dtype=torch.float32, requires_grad=True)
    ref = weights("reference", q, k, v, weight_rows=[5, 599], average_heads=True)
    with pytest.raises(ValueError, match="not differentiable"):
        weights("flash", q, k, v, weight_rows=[5, 599], average_heads=True)
    auto = weights("auto", q, k, v, weight_rows=[5, 599], average_heads=True)
    assert auto.backend != "flash"
    with torch.no_grad():  # default tiles, no gradient: flash serves it
        got = weights("flash", q, k, v, weight_rows=[5, 599], average_heads=True)
    assert (got.weights - ref.weights).abs().max() <= 1e-6
    auto.weights.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_half_precision_weights():
    q, k, v = make_qkv(1, 2, L=33, d_k=16)
    exact = weights("reference", q, k, v).weights
    for dtype in (torch.bfloat16, torch.float16):
        ref = weights("reference", *(t.to(dtype) for t in (q, k, v))).weights
        got = weights("flash", *(t.to(dtype) for t in (q, k, v))).weights
        assert got.dtype == dtype
        err, ref_err = ((w.double() - exact).abs().max() for w in (got, ref))
        assert err <= 2 * ref_err + 1e-6


def _largest_allocation(fn) -> int:
    """Bytes of the largest single allocation any op makes while ``fn`` runs."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_only_what_was_asked_is_allocated():
    """2 rows averaged over 8 heads: no allocation comes near the (B, H, L, S) scores."""
    B, H, L = 1, 8, 512
    q, k, v = make_qkv(B, H, L=L, d_k=8, dtype=torch.float32)
    full_bytes = B * H * L * L * 4
    tile_bytes = H * 64 * 128 * 4  # one tile: all heads x 64 rows x 128 keys
    kw = {"weight_rows": [3, 400], "average_heads": True}

    def flash():
        with flash_config(block_q=64, block_k=128, threads=1):
            res = weights("flash", q, k, v, **kw)
        assert res.weights.shape == (1, 2, L)

    assert _largest_allocation(lambda: weights("reference", q, k, v, **kw)) >= full_bytes
    assert _largest_allocation(flash) <= tile_bytes <= full_bytes // 32
