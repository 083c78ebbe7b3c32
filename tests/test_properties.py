"""Property tests with hypothesis (issue 2, acceptance 4).

* permuting the tokens of unmasked self-attention permutes its outputs;
* weight rows sum to 1, or to 0 for a row with no allowed key;
* causal output at position i does not change when tokens after i change;
* no NaN, in outputs or gradients, for any all-masked row, in every backend.

Examples are few and small (deadline off) so the file runs in a few seconds.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import qkv
from support import refusal, registry_backend_names

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
# Every registered backend usable on the CPU in float64 (+ "auto"): new ones join in.
BACKENDS = registry_backend_names(dtype=torch.float64)

sizes = st.integers(min_value=1, max_value=9)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _perm(seed: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(L=sizes, d=st.integers(1, 6), seed=seeds)
def test_simple_attention_is_permutation_equivariant(L, d, seed):
    x = _randn(seed, 2, L, d)
    p = _perm(seed + 1, L)
    out = qkv.simple_attention(x)
    out_p = qkv.simple_attention(x[:, p])
    torch.testing.assert_close(out_p, out[:, p], atol=1e-12, rtol=0)


@SETTINGS
@given(
    L=sizes,
    heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1)]),
    seed=seeds,
    backend=st.sampled_from(BACKENDS),
)
def test_multihead_is_permutation_equivariant(L, heads, seed, backend):
    H, H_kv = heads
    torch.manual_seed(seed)
    layer = qkv.MultiHeadAttention(8, H, num_kv_heads=H_kv, backend=backend).double()
    x = _randn(seed, 2, L, 8)
    p = _perm(seed + 1, L)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[:, p]), layer(x)[:, p], atol=1e-12, rtol=0)
        # cross-attention: permuting the keys/values together changes nothing at all
        mem = _randn(seed + 2, 2, 5, 8)
        pm = _perm(seed + 3, 5)
        torch.testing.assert_close(layer(x, mem[:, pm]), layer(x, mem), atol=1e-12, rtol=0)


def _random_mask(seed: int, B: int, H: int, L: int, S: int, dead: list[int], as_float: bool):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(B, H, L, S, generator=g) > 0.5
    for row in dead:
        allowed[..., row % L, :] = False  # forced dead rows
    if not as_float:
        return allowed
    bias = torch.randn(B, H, L, S, generator=g, dtype=torch.float64)
    return bias.masked_fill(~allowed, float("-inf"))


@SETTINGS
@given(
    L=sizes,
    S=sizes,
    seed=seeds,
    dead=st.lists(st.integers(0, 8), max_size=3),
    as_float=st.booleans(),
    causal=st.booleans(),
)
def test_weight_rows_sum_to_one_or_zero(L, S, seed, dead, as_float, causal):
    q, k, v = _randn(seed, 1, 2, L, 4), _randn(seed + 1, 1, 2, S, 4), _randn(seed + 2, 1, 2, S, 3)
    mask = _random_mask(seed, 1, 2, L, S, dead, as_float)
    if causal:
        # combine by hand (is_causal with a mask is refused when L != S)
        mask = qkv.masks.combine_masks(mask, qkv.masks.causal_mask(L, S))
    out, w = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, need_weights=True)
    allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
    live = allowed.any(dim=-1)  # (1, 2, L)
    sums = w.sum(dim=-1)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), atol=1e-12, rtol=0)
    assert torch.equal(sums[~live], torch.zeros_like(sums[~live]))
    assert torch.equal(w[~allowed], torch.zeros_like(w[~allowed]))  # masked entries exactly 0
    assert (w >= 0).all()
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))


@SETTINGS
@given(
    L=st.integers(2, 9),
    pos=st.integers(0, 7),
    seed=seeds,
    backend=st.sampled_from(BACKENDS),
    window=st.sampled_from([None, 1, 3]),
)
def test_causal_output_ignores_the_future(L, pos, seed, backend, window):
    i = pos % (L - 1)  # tokens i+1 .. L-1 are changed
    q, k, v = _randn(seed, 1, 2, L, 4), _randn(seed + 1, 1, 2, L, 4), _randn(seed + 2, 1, 2, L, 4)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t, s in ((q2, 3), (k2, 4), (v2, 5)):
        t[..., i + 1 :, :] = _randn(seed + s, 1, 2, L - i - 1, 4)
    kw = {"is_causal": True, "window": window, "backend": backend}
    assume(refusal(backend, q, k, v, is_causal=True, window=window) is None)
    a = qkv.scaled_dot_product_attention(q, k, v, **kw)
    b = qkv.scaled_dot_product_attention(q2, k2, v2, **kw)
    torch.testing.assert_close(a[..., : i + 1, :], b[..., : i + 1, :], atol=1e-12, rtol=0)
    assert not torch.allclose(a[..., i + 1 :, :], b[..., i + 1 :, :])  # the future did change

    torch.manual_seed(seed)
    layer = qkv.MultiHeadAttention(8, 2, causal=True, backend=backend).double()
    x = _randn(seed + 6, 1, L, 8)
    x2 = x.clone()
    x2[:, i + 1 :] = _randn(seed + 7, 1, L - i - 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:, : i + 1], layer(x2)[:, : i + 1], atol=1e-12, rtol=0)


@SETTINGS
@given(
    B=st.integers(1, 2),
    L=sizes,
    S=sizes,
    seed=seeds,
    dead=st.lists(st.integers(0, 8), min_size=1, max_size=3),
    as_float=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    gqa=st.booleans(),
)
def test_all_masked_rows_never_give_nan(B, L, S, seed, dead, as_float, backend, dtype, gqa):
    H, H_kv = (4, 2) if gqa else (2, 2)
    q = _randn(seed, B, H, L, 4).to(dtype).requires_grad_(True)
    k = _randn(seed + 1, B, H_kv, S, 4).to(dtype).requires_grad_(True)
    v = _randn(seed + 2, B, H_kv, S, 3).to(dtype).requires_grad_(True)
    mask = _random_mask(seed, B, H, L, S, dead, as_float)
    assume(refusal(backend, q, k, v, attn_mask=mask, enable_gqa=gqa) is None)
    out = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, backend=backend)
    dead_rows = torch.tensor(sorted({r % L for r in dead}))
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., dead_rows, :], torch.zeros_like(out[..., dead_rows, :]))
    out.backward(torch.ones_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[..., dead_rows, :], torch.zeros_like(q.grad[..., dead_rows, :]))


@SETTINGS
@given(L=sizes, seed=seeds, backend=st.sampled_from(BACKENDS))
def test_fully_padded_sequence_in_module_gives_no_nan(L, seed, backend):
    torch.manual_seed(seed)
    layer = qkv.MultiHeadAttention(8, 2, backend=backend).double()
    x = _randn(seed, 2, L, 8).requires_grad_(True)
    real = torch.ones(2, L, dtype=torch.bool)
    real[1] = False  # the second sequence is all padding
    out = layer(x, key_padding_mask=real, is_causal=bool(seed % 2))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all()
