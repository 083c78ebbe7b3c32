"""The mask helpers of qkv.masks against hand-built expectations (issue 2, point 4)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.masks import (
    causal_mask,
    combine_masks,
    key_padding_mask,
    lengths_to_padding_mask,
    sliding_window_mask,
    to_additive,
)
from support import make_qkv, refusal, registry_backends, skip_if_refused

T, F_ = True, False


def _b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_causal_square():
    assert torch.equal(causal_mask(3), _b([[T, F_, F_], [T, T, F_], [T, T, T]]))
    assert causal_mask(4).dtype == torch.bool and causal_mask(4).shape == (4, 4)


def test_causal_fewer_queries_than_keys_is_bottom_right():
    # L=2, S=5: the last query sits on the last key
    expected = _b([[T, T, T, T, F_], [T, T, T, T, T]])
    assert torch.equal(causal_mask(2, 5), expected)
    assert torch.equal(causal_mask(1, 4), _b([[T, T, T, T]]))  # one decoding step sees all


def test_causal_more_queries_than_keys_has_empty_top_rows():
    # L=5, S=2: offset -3, queries 0..2 see nothing
    expected = _b([[F_, F_], [F_, F_], [F_, F_], [T, F_], [T, T]])
    assert torch.equal(causal_mask(5, 2), expected)


def test_causal_matches_torch_tril_with_offset():
    for L, S in [(4, 9), (9, 4), (6, 6)]:
        assert torch.equal(causal_mask(L, S), torch.ones(L, S, dtype=torch.bool).tril(S - L))


def test_sliding_window_causal():
    expected = _b(
        [
            [T, F_, F_, F_, F_],
            [T, T, F_, F_, F_],
            [T, T, T, F_, F_],
            [F_, T, T, T, F_],
            [F_, F_, T, T, T],
        ]
    )
    assert torch.equal(sliding_window_mask(5, window=3), expected)
    # window 1: only itself; a window as long as the sequence: plain causal
    assert torch.equal(sliding_window_mask(4, window=1), torch.eye(4, dtype=torch.bool))
    assert torch.equal(sliding_window_mask(4, window=4), causal_mask(4))
    assert torch.equal(sliding_window_mask(4, window=100), causal_mask(4))


def test_sliding_window_causal_rectangular_is_bottom_right():
    # L=2, S=5, window 2: query 0 sits on key 3, query 1 on key 4
    assert torch.equal(
        sliding_window_mask(2, 5, window=2), _b([[F_, F_, T, T, F_], [F_, F_, F_, T, T]])
    )


def test_sliding_window_not_causal():
    expected = _b(
        [
            [T, T, F_, F_, F_],
            [T, T, T, F_, F_],
            [F_, T, T, T, F_],
            [F_, F_, T, T, T],
            [F_, F_, F_, T, T],
        ]
    )
    assert torch.equal(sliding_window_mask(5, window=2, causal=False), expected)
    assert torch.equal(
        sliding_window_mask(3, window=1, causal=False), torch.eye(3, dtype=torch.bool)
    )
    # symmetric for L == S
    m = sliding_window_mask(7, window=3, causal=False)
    assert torch.equal(m, m.T)


@pytest.mark.parametrize("window", [0, -1, 2.0, None, True])
def test_sliding_window_needs_positive_int(window):
    with pytest.raises(ValueError, match="window must be a positive integer"):
        sliding_window_mask(4, window=window)


@pytest.mark.parametrize("L,S", [(0, 3), (3, 0), (2.0, 3)])
def test_mask_sizes_must_be_positive(L, S):
    with pytest.raises(ValueError, match="mask sizes must be positive integers"):
        causal_mask(L, S)


def test_lengths_to_padding_mask():
    expected = _b([[T, T, F_, F_], [T, T, T, T], [F_, F_, F_, F_]])
    assert torch.equal(lengths_to_padding_mask([2, 4, 0]), expected)
    assert torch.equal(
        lengths_to_padding_mask(torch.tensor([1, 2]), S=3), _b([[T, F_, F_], [T, T, F_]])
    )
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S=3\], got \[4\]"):
        lengths_to_padding_mask([4], S=3)
    with pytest.raises(ValueError, match="lengths must be a 1-D integer tensor"):
        lengths_to_padding_mask(torch.tensor([1.0, 2.0]))


def test_key_padding_mask_bool_and_int():
    real = _b([[T, T, F_], [F_, T, T]])
    out = key_padding_mask(real)
    assert out.shape == (2, 1, 1, 3) and out.dtype == torch.bool
    assert torch.equal(out[:, 0, 0], real)
    # tokenizers return int64 0/1 attention masks: accepted, 1 = real token
    assert torch.equal(key_padding_mask(real.long()), out)
    assert torch.equal(key_padding_mask(real.to(torch.int32)), out)


def test_key_padding_mask_rejects_float_and_other_values():
    with pytest.raises(
        TypeError, match=r"key_padding_mask must be bool or 0/1 integers .* torch.float32"
    ):
        key_padding_mask(torch.ones(2, 3))
    with pytest.raises(ValueError, match="integer values must be 0 or 1"):
        key_padding_mask(torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"must have shape \(B, S\), got \(3,\)"):
        key_padding_mask(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a tensor, got list"):
        key_padding_mask([[1, 0]])


def test_to_additive():
    m = _b([[T, F_]])
    add = to_additive(m, torch.float64)
    assert add.dtype == torch.float64
    assert add[0, 0].item() == 0.0 and add[0, 1].item() == float("-inf")
    f = torch.tensor([[0.5, -1.0]])
    assert torch.equal(to_additive(f, torch.float64), f.double())


def test_combine_bool_bool_is_and():
    a = _b([[T, T], [F_, T]])
    b = _b([[T, F_], [T, T]])
    assert torch.equal(combine_masks(a, b), _b([[T, F_], [F_, T]]))
    assert torch.equal(combine_masks(a, None, b), combine_masks(a, b))  # None skipped
    assert combine_masks(None, None) is None
    assert combine_masks(a) is a
    # broadcasting like the inputs: (B, 1, 1, S) padding with an (L, S) causal mask
    pad = key_padding_mask(_b([[T, T, F_], [T, T, T]]))
    both = combine_masks(pad, causal_mask(3))
    assert both.shape == (2, 1, 3, 3)
    assert torch.equal(both[0, 0], _b([[T, F_, F_], [T, T, F_], [T, T, F_]]))
    assert torch.equal(both[1, 0], causal_mask(3))


def test_combine_bool_float_adds_and_forbids():
    allowed = _b([[T, F_, T]])
    bias = torch.tensor([[0.5, 2.0, float("-inf")]], dtype=torch.float64)
    out = combine_masks(allowed, bias)
    assert out.dtype == torch.float64  # the float mask's dtype wins
    assert out[0, 0].item() == 0.5
    assert out[0, 1].item() == float("-inf")  # forbidden by the bool mask
    assert out[0, 2].item() == float("-inf")  # forbidden by the float mask
    # two float masks add
    assert torch.equal(combine_masks(bias, bias)[0, :1], torch.tensor([1.0], dtype=torch.float64))


def test_combined_mask_gives_same_attention_as_both_applied():
    q, k, v = make_qkv(1, 2, L=4, d_k=8)
    bias = torch.randn(2, 4, 4, dtype=torch.float64)
    via_helper = qkv.scaled_dot_product_attention(
        q, k, v, attn_mask=combine_masks(bias, causal_mask(4)), backend="reference"
    )
    via_flag = qkv.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    torch.testing.assert_close(via_helper, via_flag, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", registry_backends())
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("L,S", [(6, 6), (3, 8), (8, 3)])
def test_window_argument_equals_explicit_mask(L, S, window, causal, backend):
    q, k, v = make_qkv(2, 2, L=L, S=S, d_k=8)
    skip_if_refused(backend, q, k, v, window=window, is_causal=causal)
    got = qkv.scaled_dot_product_attention(
        q, k, v, window=window, is_causal=causal, backend=backend
    )
    mask = sliding_window_mask(L, S, window=window, causal=causal)
    expected = qkv.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    kw = {"window": window, "is_causal": causal, "need_weights": True}
    if refusal(backend, q, k, v, **kw) is None:
        _, w = qkv.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        assert torch.all(w[..., ~mask] == 0)


def test_window_combines_with_user_mask():
    q, k, v = make_qkv(1, 2, L=6, d_k=8)
    user = torch.rand(6, 6) > 0.3
    got = qkv.scaled_dot_product_attention(q, k, v, attn_mask=user, window=3, is_causal=True)
    explicit = user & sliding_window_mask(6, window=3)
    expected = qkv.scaled_dot_product_attention(q, k, v, attn_mask=explicit, backend="reference")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
