"""Incremental decoding with qkv.KVCache equals one causal pass (issue 2, acceptance 5).

Decoding feeds the sequence in pieces: each piece's queries attend to everything
cached so far plus themselves. Because qkv aligns causal masks bottom-right, the
outputs must equal those of one causal pass over the whole sequence (fp64, 1e-10).
"""

from __future__ import annotations

import pytest
import torch

import qkv

TOL = 1e-10
BACKENDS = ("reference", "torch", "auto")


def _layer(num_kv_heads=None, backend="auto", seed=0):
    torch.manual_seed(seed)
    return qkv.MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, backend=backend).double().eval()


def _decode(layer, x, chunks, *, real=None, **kwargs):
    """Feed x (B, L, d_model) in pieces of the given sizes through one cache."""
    cache = qkv.KVCache()
    outs, start = [], 0
    for n in chunks:
        stop = start + n
        kpm = None if real is None else real[:, :stop]  # covers cached + new keys
        outs.append(
            layer(x[:, start:stop], key_padding_mask=kpm, is_causal=True, cache=cache, **kwargs)
        )
        start = stop
    assert start == x.shape[1] and len(cache) == x.shape[1]
    return outs, cache


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("chunks", [[1] * 8, [3, 1, 4], [8], [5, 3]], ids=str)
def test_incremental_equals_full_causal_pass(chunks, num_kv_heads, backend):
    layer = _layer(num_kv_heads, backend)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, is_causal=True)
        outs, cache = _decode(layer, x, chunks)
        # the cache holds exactly the projected keys and values of the whole sequence
        H_kv = num_kv_heads or 4
        k_full = layer.k_proj(x).view(2, 8, H_kv, 4).transpose(1, 2)  # (B, H_kv, S, d_k)
        v_full = layer.v_proj(x).view(2, 8, H_kv, 4).transpose(1, 2)  # (B, H_kv, S, d_v)
    assert _max_err(torch.cat(outs, dim=1), full) <= TOL
    assert cache.keys.shape == (2, H_kv, 8, 4)
    assert _max_err(cache.keys, k_full) <= TOL and _max_err(cache.values, v_full) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_incremental_with_key_padding_mask(num_kv_heads, backend):
    """Left padding (row 1 starts with pads: its first queries see nothing) and right padding."""
    layer = _layer(num_kv_heads, backend)
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    real = torch.ones(3, 8, dtype=torch.bool)
    real[1, :3] = False  # left-padded: queries 0..2 have no allowed key -> zero context
    real[2, 6:] = False  # right-padded
    with torch.no_grad():
        full = layer(x, key_padding_mask=real, is_causal=True)
        for chunks in ([1] * 8, [3, 1, 4]):
            outs, _ = _decode(layer, x, chunks, real=real)
            assert _max_err(torch.cat(outs, dim=1), full) <= TOL
    # the dead queries of row 1 produce out_proj's bias only
    assert _max_err(full[1, :3], layer.out_proj.bias.expand(3, -1)) <= TOL


def test_incremental_weights_match_full_pass():
    """The weights of each decoding step are the rows of the full causal weight matrix."""
    layer = _layer(2, "reference")
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        _, w_full = layer(x, is_causal=True, need_weights=True, average_weights=False)
        cache = qkv.KVCache()
        for t in range(6):
            _, w = layer(
                x[:, t : t + 1],
                is_causal=True,
                cache=cache,
                need_weights=True,
                average_weights=False,
            )
            assert w.shape == (1, 4, 1, t + 1)
            assert _max_err(w[..., 0, :], w_full[..., t, : t + 1]) <= TOL


def test_functional_decoding_with_cache():
    """The cache also works directly with scaled_dot_product_attention (GQA, one head of kv)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64)  # (B, H, L, d_k)
    k = torch.randn(2, 1, 7, 8, generator=g, dtype=torch.float64)  # (B, H_kv, S, d_k)
    v = torch.randn(2, 1, 7, 5, generator=g, dtype=torch.float64)  # (B, H_kv, S, d_v)
    full = qkv.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cache = qkv.KVCache(max_length=7)
    outs = []
    for a, b in ((0, 2), (2, 3), (3, 7)):
        keys, values = cache.update(k[:, :, a:b], v[:, :, a:b])
        outs.append(
            qkv.scaled_dot_product_attention(
                q[:, :, a:b], keys, values, is_causal=True, enable_gqa=True
            )
        )
    assert _max_err(torch.cat(outs, dim=2), full) <= TOL


def test_cache_grows_reset_and_detaches():
    cache = qkv.KVCache()
    assert len(cache) == 0 and cache.keys is None and cache.values is None
    k = torch.randn(1, 2, 20, 4, requires_grad=True)
    v = torch.randn(1, 2, 20, 3)
    for t in range(20):  # past the initial capacity, so storage must grow and keep old data
        keys, values = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert keys.shape == (1, 2, 20, 4) and values.shape == (1, 2, 20, 3)
    assert torch.equal(keys, k.detach()) and torch.equal(values, v)
    assert not keys.requires_grad  # decoding is inference: the cache holds no graph
    cache.reset()
    assert len(cache) == 0 and cache.keys is None
    cache.update(torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4))  # new shapes after reset
    assert cache.keys.shape == (3, 1, 2, 4)


def test_cache_max_length_exceeded():
    cache = qkv.KVCache(max_length=4)
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"max_length=4 exceeded: 3 cached \+ 2 new"):
        cache.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    assert len(cache) == 3  # a refused update leaves the cache as it was
    cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))  # exactly full is fine
    assert len(cache) == 4


@pytest.mark.parametrize(
    "k_shape,v_shape",
    [
        ((2, 2, 1, 4), (2, 2, 1, 4)),  # batch changed
        ((1, 3, 1, 4), (1, 3, 1, 4)),  # H_kv changed
        ((1, 2, 1, 5), (1, 2, 1, 4)),  # d_k changed
        ((1, 2, 1, 4), (1, 2, 1, 6)),  # d_v changed
    ],
)
def test_cache_shape_mismatch_between_updates(k_shape, v_shape):
    cache = qkv.KVCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"cache holds \(B, H_kv, d_k\)=\(1, 2, 4\)"):
        cache.update(torch.randn(k_shape), torch.randn(v_shape))
    assert len(cache) == 3


@pytest.mark.parametrize(
    "k_shape,v_shape",
    [((1, 2, 3), (1, 2, 3)), ((1, 2, 3, 4), (1, 2, 2, 4)), ((1, 2, 3, 4), (1, 1, 3, 4))],
)
def test_cache_update_needs_matching_4d_k_and_v(k_shape, v_shape):
    with pytest.raises(ValueError, match=r"k \(B, H_kv, S_new, d_k\) and v"):
        qkv.KVCache().update(torch.randn(k_shape), torch.randn(v_shape))


def test_cache_dtype_mismatch():
    cache = qkv.KVCache()
    cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(TypeError, match=r"cache holds torch.float32 .* update is torch.float64"):
        cache.update(torch.randn(1, 2, 1, 4).double(), torch.randn(1, 2, 1, 4).double())
    with pytest.raises(TypeError, match="share a dtype"):
        cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4).double())
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        cache.update(torch.ones(1, 2, 1, 4, dtype=torch.long), torch.randn(1, 2, 1, 4))


@pytest.mark.parametrize("max_length", [0, -1, 2.5, True])
def test_cache_max_length_must_be_positive_int(max_length):
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        qkv.KVCache(max_length=max_length)


def test_module_cache_from_another_layer_is_refused():
    """A cache filled by a layer with other kv heads cannot be reused silently."""
    cache = qkv.KVCache()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        _layer(None)(x, is_causal=True, cache=cache)  # H_kv = 4
        with pytest.raises(ValueError, match="cache holds"):
            _layer(2)(x[:, :1], is_causal=True, cache=cache)  # H_kv = 2
        with pytest.raises(TypeError, match=r"cache must be a qkv\.KVCache"):
            _layer(None)(x, cache={"k": None})
        # a padding mask must cover all cached + new keys, not only the new ones
        with pytest.raises(
            ValueError, match=r"key_padding_mask must have shape \(B, S\) = \(1, 4\)"
        ):
            _layer(None)(
                x[:, :1],
                key_padding_mask=torch.ones(1, 1, dtype=torch.bool),
                is_causal=True,
                cache=cache,
            )
        with pytest.raises(ValueError, match="attn_mask of shape"):
            _layer(None)(x[:, :1], attn_mask=torch.ones(1, 1, dtype=torch.bool), cache=cache)
        with pytest.raises(ValueError, match="ambiguous when L=1 != S=4"):
            _layer(None)(
                x[:, :1], attn_mask=torch.ones(1, 4, dtype=torch.bool), is_causal=True, cache=cache
            )
        assert len(cache) == 3  # refused calls leave the cache untouched
        # the same mask without is_causal is fine, and the call then extends the cache
        _layer(None)(x[:, :1], attn_mask=torch.ones(1, 4, dtype=torch.bool), cache=cache)
        assert len(cache) == 4
