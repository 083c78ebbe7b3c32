"""The "flash" backend against the reference: outputs and gradients (issue 3, point 1).

Small tiles (``flash_config``) make short sequences cross many tiles, so every path of
the kernels (several key tiles per row, partial last tiles, band-cut tiles, skipped tiles,
rows empty in one tile or in all) is exercised in well under a second per case.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends import make_request
from qkv.backends.flash import FlashConfig, flash_config, tile_sizes
from qkv.backends.flash import loops as flash_kernels
from qkv.backends.flash.tiles import Tiling
from support import MASK_KINDS, assert_matches_reference, make_mask, make_qkv

SMALL = {"block_q": 8, "block_k": 16}


@pytest.fixture(autouse=True)
def _loops():
    """These tests pin the tiles of the PyTorch-level loops (the compiled kernel has
    tests/test_flash_compiled.py, and the registry grids run "flash" on both)."""
    with flash_config(compiled=False):
        yield


def flash(**kwargs):
    """The flash backend as ``fn(q, k, v)`` for assert_matches_reference."""
    return lambda q, k, v: qkv.scaled_dot_product_attention(q, k, v, backend="flash", **kwargs)


def check_against_reference(q, k, v, *, dtype=torch.float64, blocks=SMALL, **kwargs):
    with flash_config(**blocks):
        return assert_matches_reference(flash(**kwargs), q, k, v, dtype=dtype, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_kinds(kind, causal, dtype):
    B, H, H_kv, L = 2, 4, 2, 37
    q, k, v = make_qkv(B, H, H_kv, L=L, d_k=16, d_v=8)
    mask = make_mask(kind, B, H, L, L)
    check_against_reference(q, k, v, dtype=dtype, attn_mask=mask, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_half_precision_within_twice_reference(kind, causal, dtype):
    B, H, H_kv, L = 2, 4, 2, 45
    q, k, v = make_qkv(B, H, H_kv, L=L, d_k=16, d_v=8)
    mask = make_mask(kind, B, H, L, L)
    check_against_reference(q, k, v, dtype=dtype, attn_mask=mask, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_half_precision_inference_path(kind, dtype):
    """Without gradients, half inputs take the fast path (half-precision tile softmax)."""
    B, H, L = 2, 4, 60
    q, k, v = make_qkv(B, H, L=L, d_k=16)
    mask = make_mask(kind, B, H, L, L)
    for causal in (False, True):
        with flash_config(**SMALL):
            assert_matches_reference(
                flash(attn_mask=mask, is_causal=causal), q, k, v, dtype=dtype, grads=False,
                attn_mask=mask, is_causal=causal,
            )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_default_tiles(dtype):
    """Default tile sizes with several key tiles per row (S > 512)."""
    q, k, v = make_qkv(1, 2, L=64, S=1100, d_k=32)
    check_against_reference(q, k, v, dtype=dtype, blocks={})
    check_against_reference(q, k, v, dtype=dtype, blocks={}, is_causal=True)
    with flash_config():
        assert_matches_reference(flash(), q, k, v, dtype=dtype, grads=False)


@pytest.mark.parametrize("H_kv", [8, 4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_ratios(H_kv, causal):
    q, k, v = make_qkv(1, 8, H_kv, L=21, S=30, d_k=8)
    check_against_reference(q, k, v, dtype=torch.float32, is_causal=causal, enable_gqa=H_kv != 8)


def test_gqa_does_not_repeat_kv(monkeypatch):
    """Grouped heads are stacked as matmul rows: nothing repeats K/V per query head."""

    def forbidden(*args, **kwargs):
        raise AssertionError("K/V were repeated per head")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", forbidden)
    monkeypatch.setattr(torch, "repeat_interleave", forbidden)
    q, k, v = make_qkv(1, 8, 2, L=20, d_k=8, requires_grad=True)
    with flash_config(**SMALL):
        out = qkv.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="flash")
    out.sum().backward()
    assert k.grad.shape == k.shape


@pytest.mark.parametrize("L", [1, 7, 97, 1025])
def test_odd_lengths_default_tiles(L):
    q, k, v = make_qkv(1, 2, L=L, d_k=16)
    check_against_reference(q, k, v, dtype=torch.float32, blocks={}, is_causal=L != 97)


@pytest.mark.parametrize("L", [15, 16, 17])
@pytest.mark.parametrize("S", [31, 32, 33])
@pytest.mark.parametrize("causal", [False, True])
def test_block_boundaries(L, S, causal):
    """Lengths one less than, equal to and one more than a tile (16 rows, 32 keys)."""
    q, k, v = make_qkv(1, 2, L=L, S=S, d_k=8)
    check_against_reference(q, k, v, blocks={"block_q": 16, "block_k": 32}, is_causal=causal)
    check_against_reference(
        q, k, v, blocks={"block_q": 16, "block_k": 32}, is_causal=causal, window=5
    )


@pytest.mark.parametrize("L, S", [(5, 40), (40, 5), (17, 64), (64, 17), (1, 33), (33, 1)])
@pytest.mark.parametrize("window", [None, 1, 6])
def test_causal_and_window_with_unequal_lengths(L, S, window):
    """Bottom-right alignment; with L > S the top rows see no key (zeros, finite grads)."""
    q, k, v = make_qkv(2, 2, L=L, S=S, d_k=8)
    check_against_reference(q, k, v, is_causal=True, window=window)
    if window is not None:
        check_against_reference(q, k, v, is_causal=False, window=window)


@pytest.mark.parametrize("window", [1, 3, 16, 100])
def test_sliding_window_with_masks(window):
    q, k, v = make_qkv(2, 4, 2, L=50, d_k=8)
    mask = make_mask("bool_heads", 2, 4, 50, 50)
    check_against_reference(q, k, v, attn_mask=mask, window=window, is_causal=True, enable_gqa=True)
    check_against_reference(q, k, v, attn_mask=mask, window=window, enable_gqa=True)


def test_dv_differs_from_dk_and_scale():
    q, k, v = make_qkv(2, 3, L=19, S=41, d_k=24, d_v=5)
    check_against_reference(q, k, v, dtype=torch.float32, scale=0.3)
    check_against_reference(q, k, v, dtype=torch.bfloat16, scale=0.3)


def test_extra_batch_dims_and_3d_inputs():
    q, k, v = make_qkv(6, 4, 2, L=20, S=23, d_k=8)
    q, k, v = (t.unflatten(0, (2, 3)) for t in (q, k, v))  # (2, 3, H, L, d)
    mask = torch.rand(3, 1, 20, 23, generator=torch.Generator().manual_seed(3)) > 0.4
    check_against_reference(q, k, v, attn_mask=mask, enable_gqa=True)
    q3, k3, v3 = make_qkv(1, 4, L=20, d_k=8)
    check_against_reference(
        q3[0], k3[0], v3[0], is_causal=True
    )  # (H, L, d): no batch dimension at all


def test_non_contiguous_inputs():
    q, k, v = make_qkv(2, 4, L=30, d_k=8)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, is_causal=True)


def test_all_rows_masked_gives_zeros_and_zero_grads():
    q, k, v = make_qkv(2, 2, L=9, S=20, d_k=8, dtype=torch.float32, requires_grad=True)
    mask = torch.zeros(2, 1, 9, 20, dtype=torch.bool)
    with flash_config(**SMALL):
        with torch.no_grad():  # flash weights carry no gradient, so it serves them without
            res = qkv.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, backend="flash", need_weights=True
            )
        out = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="flash")
    assert torch.equal(res.output, torch.zeros_like(res.output))
    assert torch.equal(res.weights, torch.zeros_like(res.weights))
    assert torch.isneginf(res.lse).all()
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_float_mask_with_large_values_and_neg_inf_rows():
    q, k, v = make_qkv(1, 2, L=12, S=40, d_k=8)
    mask = torch.randn(1, 2, 12, 40, dtype=torch.float64) * 30  # scores far from 0
    mask[..., 3, :] = float("-inf")
    mask[..., 5, :20] = float("-inf")  # row empty in the first key tiles only
    check_against_reference(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_many_key_tiles_merge_in_groups(monkeypatch, dtype):
    """Rows with more key tiles than one merge group (here 3 tiles) carry their result."""
    monkeypatch.setattr(flash_kernels, "_GROUP", 3)
    q, k, v = make_qkv(2, 4, 2, L=20, S=150, d_k=8)
    mask = make_mask("bool", 2, 4, 20, 150)
    mask[..., 4, :140] = False  # a row whose only keys sit in the last group
    kw = {"attn_mask": mask, "enable_gqa": True}
    check_against_reference(q, k, v, dtype=dtype, **kw)
    with flash_config(**SMALL):
        assert_matches_reference(flash(**kw), q, k, v, dtype=dtype, grads=False, **kw)


def test_lse_matches_reference():
    q, k, v = make_qkv(2, 4, 2, L=33, S=50, d_k=8)
    mask = make_mask("bool", 2, 4, 33, 50)
    kw = {"attn_mask": mask, "enable_gqa": True, "need_weights": True}
    ref = qkv.scaled_dot_product_attention(q, k, v, backend="reference", **kw)
    with flash_config(**SMALL):
        got = qkv.scaled_dot_product_attention(q, k, v, backend="flash", **kw)
    assert got.lse.shape == (2, 4, 33) and got.backend == "flash"
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-12, rtol=0)


def test_tiles_slice_the_callers_mask_without_copying(monkeypatch):
    """A broadcast mask stays a view: every tile reads the caller's storage."""
    seen = []
    original = Tiling.mask_tile

    def spy(self, *args):
        tile = original(self, *args)
        seen.append(tile)
        return tile

    monkeypatch.setattr(Tiling, "mask_tile", spy)
    base = torch.rand(1, 1, 1, 48) > 0.3  # key padding, shared by batch, heads, rows
    mask = base.expand(2, 4, 30, 48)  # a broadcast view of size B * H * L * S
    q, k, v = make_qkv(2, 4, L=30, S=48, d_k=8, requires_grad=True)
    with flash_config(**SMALL):
        out = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="flash")
    out.sum().backward()
    assert seen
    for tile in seen:
        assert tile.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert tile.shape[-1] <= 16


def test_causal_skips_tiles_above_the_diagonal():
    r = make_request(*make_qkv(1, 1, L=64, d_k=4), is_causal=True)
    t = Tiling(r, 16, 16)
    visited = {(i0, kb.j0) for i0, _ in t.query_blocks() for kb in t.key_blocks(i0, i0 + 16)}
    assert visited == {(i, j) for i in range(0, 64, 16) for j in range(0, i + 1, 16)}
    band = [kb.band for kb in t.key_blocks(32, 48)]
    assert band == [False, False, True]  # only the diagonal tile needs a mask
    rw = make_request(*make_qkv(1, 1, L=64, d_k=4), is_causal=True, window=8)
    tw = Tiling(rw, 16, 16)
    assert [(kb.j0, kb.j1) for kb in tw.key_blocks(32, 48)] == [(25, 41), (41, 48)]


def test_query_blocks_with_no_key_are_skipped():
    r = make_request(*make_qkv(1, 1, L=40, S=8, d_k=4), is_causal=True)
    t = Tiling(r, 16, 16)
    assert t.key_blocks(0, 16) == []  # rows 0..15 see keys j <= i - 32: none
    assert t.key_blocks(32, 40) != []


# ----------------------------------------------------------------- worker threads


@pytest.mark.parametrize("heads", [1, 4])
def test_worker_threads_match_the_calling_thread(heads):
    """Items run on 3 worker threads give what one thread gives (and the reference).

    heads=1: 8 head chunks, so each thread owns whole chunks (shared dK, dV);
    heads=4: 2 chunks for 3 threads, so items are query blocks and each thread adds
    into its own dK, dV, summed at the end.
    """
    q, k, v = make_qkv(1, 8, 4, L=40, S=50, d_k=8, requires_grad=True)
    mask = make_mask("bool_heads", 1, 8, 40, 50)
    kw = {"attn_mask": mask, "enable_gqa": True, "window": 25}
    runs = []
    for threads in (1, 3):
        with flash_config(block_q=16, block_k=32, heads=heads, threads=threads):
            out = qkv.scaled_dot_product_attention(q, k, v, backend="flash", **kw)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        runs.append((out, *grads))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with flash_config(block_q=16, block_k=32, heads=heads, threads=3):
        check_against_reference(q, k, v, blocks={}, **kw)


def test_worker_threads_leave_the_callers_thread_count_alone():
    before = torch.get_num_threads()
    q, k, v = make_qkv(1, 2, L=40, d_k=8)
    with flash_config(block_q=8, threads=2):
        qkv.scaled_dot_product_attention(q, k, v, backend="flash")
    assert torch.get_num_threads() == before


def test_errors_in_worker_threads_reach_the_caller(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("tile failed")

    monkeypatch.setattr(flash_kernels, "_scores", broken)
    q, k, v = make_qkv(1, 4, L=40, d_k=8)
    with flash_config(block_q=8, threads=2), pytest.raises(RuntimeError, match="tile failed"):
        qkv.scaled_dot_product_attention(q, k, v, backend="flash")


# ----------------------------------------------------------------- dropout


def _dropout_reference(q, k, v, p, seed, blocks, **kwargs):
    """The reference with the flash kernel's own dropout tiles, assembled densely."""
    r = make_request(q, k, v, dropout_p=p, **kwargs)
    t = Tiling(r, blocks["block_q"], blocks["block_k"], heads=r.H_kv)
    keep = torch.zeros(t.N, t.g, t.L, t.S, dtype=q.dtype)  # (N, g, L, S)
    for i0, i1 in t.query_blocks():
        for kb in t.key_blocks(i0, i1):
            shape = (t.H_kv, t.g * (i1 - i0), kb.j1 - kb.j0)
            for b in range(t.N // t.H_kv):
                n = slice(b * t.H_kv, (b + 1) * t.H_kv)
                heads = slice(0, t.H_kv)  # the test runs with heads=H_kv tiles
                tile = flash_kernels._keep_scale(seed, b, heads, i0, kb.j0, shape, p, t, q.dtype)
                keep[n, :, i0:i1, kb.j0 : kb.j1] = tile.view(-1, t.g, i1 - i0, kb.j1 - kb.j0).to(
                    q.dtype
                )
    res = qkv.scaled_dot_product_attention(
        q, k, v, backend="reference", need_weights=True, **kwargs
    )
    weights = res.weights.reshape(t.N, t.g, t.L, t.S)
    return ((weights * keep) @ v.reshape(t.N, 1, t.S, -1)).reshape(res.output.shape)


def test_dropout_matches_reference_with_the_same_tiles(monkeypatch):
    q, k, v = make_qkv(2, 4, 2, L=30, S=37, d_k=8, requires_grad=True)
    seed = 1234
    monkeypatch.setattr(torch, "randint", lambda *a, **kw: torch.tensor(seed))
    kw = {"is_causal": True, "enable_gqa": True}
    with flash_config(**SMALL, heads=2):
        out = qkv.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="flash", **kw)
    monkeypatch.undo()
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    expected = _dropout_reference(qr, kr, vr, 0.3, seed, SMALL, **kw)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout)
    for got, want in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-11, rtol=0)
    dropped = (out.detach() - qkv.scaled_dot_product_attention(q, k, v, **kw)).abs().max()
    assert dropped > 0.01  # dropout was applied, not ignored


def test_dropout_is_repeatable_and_has_unbiased_mean():
    q, k, v = make_qkv(1, 2, L=16, S=40, d_k=8, dtype=torch.float32)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(qkv.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="flash"))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(2)
    mean = (
        sum(
            qkv.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="flash")
            for _ in range(400)
        )
        / 400
    )
    exact = qkv.scaled_dot_product_attention(q, k, v, backend="flash")
    assert (mean - exact).abs().max() < 0.1  # E[dropout(w)] = w; 400 draws: sd ~0.03


def test_dropout_gradcheck():
    q, k, v = make_qkv(1, 1, L=5, S=7, d_k=3, requires_grad=True)

    def fn(q, k, v):
        with torch.random.fork_rng():
            torch.manual_seed(7)  # the same dropout tiles on every call
            with flash_config(block_q=2, block_k=3):  # several tiles, several seeds
                return qkv.scaled_dot_product_attention(
                    q, k, v, dropout_p=0.4, is_causal=True, backend="flash"
                )

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ----------------------------------------------------------------- config and limits


def test_config_validation_and_override():
    with pytest.raises(ValueError, match=r"FlashConfig\.block_q must be a positive integer"):
        FlashConfig(block_q=0)
    with pytest.raises(ValueError, match=r"FlashConfig\.block_k must be a positive integer"):
        FlashConfig(block_k=2.5)
    with pytest.raises(TypeError, match="unknown fields"), flash_config(block_size=3):
        pass
    threads = torch.get_num_threads()
    r = make_request(*make_qkv(1, 8, L=4096, d_k=64))
    assert tile_sizes(r) == (128, 4096, 1, threads)  # one tile per row: 2**19 scores
    rc = make_request(*make_qkv(1, 8, L=4096, d_k=64), is_causal=True)
    assert tile_sizes(rc) == (256, 512, 2, threads)  # 2 heads x 256 x 512 = 2**18 scores
    with flash_config(block_q=64, block_k=100, threads=1):
        assert tile_sizes(r) == (64, 100, 8, 1)  # heads capped at H_kv = 8
        with flash_config(FlashConfig(block_q=32, heads=3)):
            assert tile_sizes(r) == (32, 4096, 3, threads)
    assert tile_sizes(rc) == (256, 512, 2, threads)
    short = make_request(*make_qkv(1, 1, L=5, S=9, d_k=4))
    assert tile_sizes(short) == (5, 9, 1, 1)  # tiny: no worker threads


def test_float_mask_requiring_grad_is_refused():
    q, k, v = make_qkv(1, 2, L=5, d_k=4)
    mask = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"backend 'flash' cannot serve.*float attn_mask"):
        qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="flash")
    with torch.no_grad():  # no gradient wanted: flash serves it
        qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="flash")


def test_listed_as_a_backend():
    assert "flash" in qkv.backends()
    assert "linear memory" in qkv.backends()["flash"]
