"""Bad input gets a clear error (issue 2, point 8 and its acceptance line).

Each test checks the exception type AND that the message names the problem (the
argument, and the shapes or values involved). A few cases also check that PyTorch
refuses the same input, so qkv is never more permissive than its peer.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qkv
from qkv.backends import dispatch
from support import make_qkv

sdpa = qkv.scaled_dot_product_attention


def qkv_(B=2, H=4, H_kv=None, L=5, S=None, d_k=8, d_v=None, dtype=torch.float32):
    return make_qkv(B, H, H_kv, L, S, d_k, d_v, dtype=dtype)


# ---------------------------------------------------------------- shapes of q, k, v


def test_q_k_width_mismatch():
    q, _, v = qkv_()
    k = torch.randn(2, 4, 5, 6)
    with pytest.raises(ValueError, match=r"q and k must have the same width d_k.*d_k=8.*d_k=6"):
        sdpa(q, k, v)
    with pytest.raises(RuntimeError):  # torch refuses it too
        F.scaled_dot_product_attention(q, k, v)


def test_k_v_length_mismatch():
    q, k, _ = qkv_()
    v = torch.randn(2, 4, 6, 8)
    with pytest.raises(ValueError, match=r"k and v must have the same length S.*S=5.*S=6"):
        sdpa(q, k, v)


def test_k_v_head_mismatch():
    q, k, _ = qkv_(H_kv=2)
    v = torch.randn(2, 1, 5, 8)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads H_kv"):
        sdpa(q, k, v, enable_gqa=True)


def test_heads_not_a_multiple_of_kv_heads():
    q, k, v = qkv_(H=4, H_kv=3)
    with pytest.raises(ValueError, match=r"query heads H=4 must be a multiple of .* H_kv=3"):
        sdpa(q, k, v, enable_gqa=True)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_grouped_heads_need_enable_gqa():
    q, k, v = qkv_(H=4, H_kv=2)
    with pytest.raises(ValueError, match=r"H=4 heads but k/v have H_kv=2; pass enable_gqa=True"):
        sdpa(q, k, v)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)


def test_batch_dims_must_match_exactly():
    q, k, v = qkv_()
    with pytest.raises(ValueError, match=r"share their leading \(batch\) dimensions"):
        sdpa(q, k[:1], v[:1])  # torch would broadcast batch 1; qkv never broadcasts q/k/v
    with pytest.raises(ValueError, match="share their leading"):
        sdpa(q, k[0], v[0])


@pytest.mark.parametrize("bad", ["2d", "empty"])
def test_rank_and_empty_dims(bad):
    q, k, v = qkv_()
    if bad == "2d":
        with pytest.raises(ValueError, match=r"q must have shape \(\.\.\., heads, length, width\)"):
            sdpa(q[0, 0], k, v)
    else:
        with pytest.raises(ValueError, match=r"k has an empty dimension: shape \(2, 4, 0, 8\)"):
            sdpa(q, k[:, :, :0], v[:, :, :0])


def test_not_tensors():
    q, k, v = qkv_()
    with pytest.raises(TypeError, match=r"v must be a torch\.Tensor, got list"):
        sdpa(q, k, v.tolist())


# ---------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtypes(dtype):
    q, k, v = qkv_()
    with pytest.raises(
        TypeError, match=rf"k must be float16, bfloat16, float32 or float64, got {dtype}"
    ):
        sdpa(q, k.to(dtype), v)
    with pytest.raises(TypeError, match=rf"x must be float16.*got {dtype}"):
        qkv.simple_attention(torch.ones(3, 4).to(dtype))
    with pytest.raises(TypeError, match=rf"query must be float16.*got {dtype}"):
        qkv.MultiHeadAttention(8, 2)(torch.ones(1, 3, 8).to(dtype))


def test_mixed_dtypes():
    q, k, v = qkv_()
    with pytest.raises(
        TypeError, match=r"q and v must share a dtype.*torch.float32.*torch.float64"
    ):
        sdpa(q, k, v.double())
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v.double())
    layer = qkv.MultiHeadAttention(8, 2)  # float32 weights
    with pytest.raises(TypeError, match="must share a dtype"):
        layer(torch.randn(1, 3, 8), torch.randn(1, 3, 8).double())


def test_mixed_devices():
    """A second device is simulated with "meta" (shapes only, no data)."""
    q, k, v = qkv_()
    with pytest.raises(ValueError, match=r"q and k must be on one device.*cpu.*meta"):
        sdpa(q, k.to("meta"), v)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k.to("meta"), v)
    mask = torch.ones(5, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="attn_mask is on meta but the queries are on cpu"):
        sdpa(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "mask_shape,why",
    [
        ((5, 6), "last dim is not S"),
        ((2, 5), "a (B, S) padding mask passed as attn_mask (B=2, L=S=5)"),
        ((3, 4, 5, 5), "batch 3 vs 2"),
        ((2, 3, 5, 5), "heads 3 vs 4"),
        ((4, 5), "L=4 rows for 5 queries"),
        ((5, 1), "one key column: qkv never broadcasts over keys"),
        ((1, 2, 4, 5, 5), "more dims than (B, H, L, S)"),
        ((5,), "1-D"),
    ],
)
def test_mask_that_does_not_broadcast(mask_shape, why):
    q, k, v = qkv_()
    mask = torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(
        ValueError,
        match=rf"attn_mask of shape \({mask_shape[0]},.*does not broadcast to .*\(2, 4, 5, 5\)",
    ):
        sdpa(q, k, v, attn_mask=mask)


def test_padding_mask_as_attn_mask_points_to_the_helper():
    q, k, v = qkv_(L=3, S=7)
    padding = torch.ones(2, 7, dtype=torch.bool)  # (B, S)
    with pytest.raises(
        ValueError, match=r"for a \(B, S\) padding mask use qkv.masks.key_padding_mask"
    ):
        sdpa(q, k, v, attn_mask=padding)
    sdpa(q, k, v, attn_mask=qkv.masks.key_padding_mask(padding))  # the right way works
    layer = qkv.MultiHeadAttention(8, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 3\) does not broadcast"):
        layer(x, attn_mask=torch.ones(2, 3, dtype=torch.bool))
    # checked before it is combined with the padding mask (no raw broadcasting error)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 3\) does not broadcast"):
        layer(
            x,
            attn_mask=torch.ones(4, 3, dtype=torch.bool),
            key_padding_mask=torch.ones(2, 3).bool(),
        )


def test_mask_dtype():
    q, k, v = qkv_()
    with pytest.raises(TypeError, match=r"attn_mask must be bool .* or float .* got torch.int64"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.long))


@pytest.mark.parametrize("kpm", ["shape", "float", "values", "rank"])
def test_module_key_padding_mask(kpm):
    layer = qkv.MultiHeadAttention(8, 2)
    x = torch.randn(2, 3, 8)
    if kpm == "shape":
        with pytest.raises(
            ValueError, match=r"key_padding_mask must have shape \(B, S\) = \(2, 3\), got \(2, 4\)"
        ):
            layer(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    elif kpm == "float":
        with pytest.raises(TypeError, match="key_padding_mask must be bool or 0/1 integers"):
            layer(x, key_padding_mask=torch.ones(2, 3))
    elif kpm == "values":
        with pytest.raises(ValueError, match="key_padding_mask integer values must be 0 or 1"):
            layer(x, key_padding_mask=torch.full((2, 3), 2))
    else:
        with pytest.raises(
            ValueError, match=r"key_padding_mask must have shape \(B, S\), got \(2, 1, 3\)"
        ):
            layer(x, key_padding_mask=torch.ones(2, 1, 3, dtype=torch.bool))


# ---------------------------------------------------------------- is_causal with a mask


@pytest.mark.parametrize("float_mask", [False, True])
def test_causal_with_mask_is_ambiguous_when_lengths_differ(float_mask):
    q, k, v = qkv_(L=3, S=7)
    mask = torch.rand(3, 7) > 0.3
    if float_mask:
        mask = qkv.masks.to_additive(mask)
    with pytest.raises(
        ValueError, match=r"is_causal=True with an explicit attn_mask is ambiguous when L=3 != S=7"
    ):
        sdpa(q, k, v, attn_mask=mask, is_causal=True)
    layer = qkv.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="ambiguous when L=3 != S=7"):
        layer(torch.randn(2, 3, 8), torch.randn(2, 7, 8), attn_mask=mask, is_causal=True)
    # the documented way out: put the causal part into the mask
    explicit = qkv.masks.combine_masks(mask, qkv.masks.causal_mask(3, 7))
    sdpa(q, k, v, attn_mask=explicit)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("float_mask", [False, True])
def test_causal_with_mask_is_allowed_when_square_and_intersects(float_mask, backend):
    q, k, v = qkv_(L=6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask = qkv.masks.to_additive(allowed, torch.float64) if float_mask else allowed
    got = sdpa(q, k, v, attn_mask=mask, is_causal=True, backend=backend)
    both = allowed & torch.ones(6, 6, dtype=torch.bool).tril()  # hand-built intersection
    expected = sdpa(q, k, v, attn_mask=both, backend="reference")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # and it really differs from either mask alone
    assert not torch.allclose(got, sdpa(q, k, v, attn_mask=mask, backend=backend))
    assert not torch.allclose(got, sdpa(q, k, v, is_causal=True, backend=backend))


# ---------------------------------------------------------------- scalars


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, math.nan, math.inf, -math.inf])
def test_scale_must_be_positive_and_finite(scale):
    q, k, v = qkv_()
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got"):
        sdpa(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        qkv.simple_attention(q[0], scale=scale)


@pytest.mark.parametrize("scale", [True, "0.5", torch.tensor(0.5)])
def test_scale_must_be_a_number(scale):
    q, k, v = qkv_()
    with pytest.raises(TypeError, match=r"scale must be a positive number or None, got"):
        sdpa(q, k, v, scale=scale)


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, math.nan])
def test_dropout_outside_unit_interval(p):
    q, k, v = qkv_()
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\), got"):
        sdpa(q, k, v, dropout_p=p)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got"):
        qkv.MultiHeadAttention(8, 2, dropout=p)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got"):
        qkv.SelfAttention(8, 4, dropout=p)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        qkv.AttentionConfig(8, 2, dropout=p)


def test_dropout_peer_consistency():
    q, k, v = qkv_()
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="dropout_p must be a number in"):
        sdpa(q, k, v, dropout_p=None)


def test_is_causal_must_be_bool():
    q, k, v = qkv_()
    with pytest.raises(TypeError, match="is_causal must be a bool, got int"):
        sdpa(q, k, v, is_causal=1)


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_window_must_be_positive_int(window):
    q, k, v = qkv_()
    with pytest.raises(ValueError, match="window must be a positive integer"):
        sdpa(q, k, v, window=window)


def test_weight_rows():
    q, k, v = qkv_()
    with pytest.raises(ValueError, match="weight_rows was given but need_weights=False"):
        sdpa(q, k, v, weight_rows=[0])
    with pytest.raises(ValueError, match=r"weight_rows must be indices in \[0, L=5\), got \[5\]"):
        sdpa(q, k, v, weight_rows=[5], need_weights=True)
    with pytest.raises(ValueError, match="weight_rows must be a 1-D sequence of query indices"):
        sdpa(q, k, v, weight_rows=[0.5], need_weights=True)


# ---------------------------------------------------------------- modules


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by num_heads=3"):
        qkv.MultiHeadAttention(10, 3)
    with pytest.raises(AssertionError, match="divisible"):  # torch refuses it too
        nn.MultiheadAttention(10, 3)


def test_heads_not_multiple_of_kv_heads_in_module():
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        qkv.MultiHeadAttention(8, 4, num_kv_heads=3)


@pytest.mark.parametrize("arg", ["d_model", "num_heads", "num_kv_heads", "kdim", "vdim"])
@pytest.mark.parametrize("value", [0, -4, 2.0])
def test_module_sizes_must_be_positive_ints(arg, value):
    kwargs = {"d_model": 8, "num_heads": 2} | {arg: value}
    with pytest.raises(ValueError, match=rf"{arg} must be a positive integer, got {value!r}"):
        qkv.AttentionConfig(**kwargs)


def test_module_unknown_backend():
    with pytest.raises(
        ValueError, match=r"unknown backend 'fast'; known backends: auto, .*reference"
    ):
        qkv.MultiHeadAttention(8, 2, backend="fast")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 8), r"query must have shape \(B, length, 8\), got \(3, 8\)"),
        ((1, 2, 3, 8), r"query must have shape \(B, length, 8\), got \(1, 2, 3, 8\)"),
        ((1, 3, 7), r"query must have shape \(B, length, 8\), got \(1, 3, 7\)"),
    ],
)
def test_multihead_wrong_input_rank_or_width(shape, match):
    with pytest.raises(ValueError, match=match):
        qkv.MultiHeadAttention(8, 2)(torch.randn(shape))


def test_multihead_key_value_shapes():
    layer = qkv.MultiHeadAttention(8, 2, kdim=5, vdim=3)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"key must have shape \(2, length, 5\), got \(2, 6, 8\)"):
        layer(x, torch.randn(2, 6, 8), torch.randn(2, 6, 3))
    with pytest.raises(
        ValueError, match=r"value must have shape \(2, length, 3\), got \(1, 6, 3\)"
    ):
        layer(x, torch.randn(2, 6, 5), torch.randn(1, 6, 3))
    with pytest.raises(
        ValueError, match=r"key \(2, 6, 5\) and value \(2, 7, 3\) differ in length S"
    ):
        layer(x, torch.randn(2, 6, 5), torch.randn(2, 7, 3))


@pytest.mark.parametrize("shape", [(8,), (1, 2, 3, 8)])
def test_self_attention_wrong_rank(shape):
    with pytest.raises(
        ValueError, match=re.escape(f"x must have shape (B, L, 8) or (L, 8), got {shape}")
    ):
        qkv.SelfAttention(8, 4)(torch.randn(shape))


def test_simple_attention_input():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., L, d_model\)"):
        qkv.simple_attention(torch.randn(4))
    with pytest.raises(TypeError, match="scale must be a positive number"):
        qkv.simple_attention(torch.randn(3, 4), scale=None)


# ---------------------------------------------------------------- backends


def test_unknown_backend():
    q, k, v = qkv_()
    with pytest.raises(
        ValueError, match=r"unknown backend 'flashy'; known backends: auto, .*reference.*torch"
    ):
        sdpa(q, k, v, backend="flashy")
    with pytest.raises(TypeError, match="backend must be a string, got NoneType"):
        sdpa(q, k, v, backend=None)


def test_named_backend_that_cannot_serve_raises():
    q, k, v = qkv_()
    with pytest.raises(ValueError, match=r"backend 'torch' cannot serve this request: .*weights"):
        sdpa(q, k, v, backend="torch", need_weights=True)
    layer = qkv.MultiHeadAttention(8, 2, backend="torch")
    with pytest.raises(ValueError, match="backend 'torch' cannot serve this request"):
        layer(torch.randn(1, 3, 8), need_weights=True)


def test_auto_falls_back_to_reference_and_logs_once(caplog, monkeypatch):
    """The built-in pair: "torch" cannot return weights, so "auto" uses "reference".

    PREFERENCE is pinned to the two built-ins so the test does not depend on which
    faster backends other parts of qkv register.
    """
    monkeypatch.setattr(dispatch, "PREFERENCE", ["torch", "reference"])
    monkeypatch.setattr(dispatch, "_logged", set())  # forget what earlier tests logged
    q, k, v = qkv_()
    with caplog.at_level(logging.INFO, logger="qkv"):
        res = sdpa(q, k, v, need_weights=True)
        assert res.backend == "reference" and res.weights is not None  # nothing dropped
        sdpa(q, k, v, need_weights=True)
        sdpa(q, k, v, need_weights=True, is_causal=True)
    records = [r for r in caplog.records if r.name == "qkv"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    assert "not using 'torch'" in records[0].getMessage()
    assert "weights" in records[0].getMessage() and "'reference'" in records[0].getMessage()
    # without weights, auto takes the fast path and logs nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qkv"):
        out = sdpa(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert not caplog.records


def test_auto_never_drops_weights_whatever_is_registered():
    """With the real preference list, a weights request still gets weights."""
    q, k, v = qkv_(dtype=torch.float64)
    res = sdpa(q, k, v, need_weights=True, is_causal=True)
    assert res.backend != "torch" and res.weights is not None
    _, expected = sdpa(q, k, v, need_weights=True, is_causal=True, backend="reference")
    torch.testing.assert_close(res.weights, expected, atol=1e-10, rtol=0)


def test_backend_names_cannot_be_reused():
    with pytest.raises(ValueError, match="backend name 'reference' is already taken"):
        qkv.register_backend("reference", supports=lambda r: None, description="dup")(lambda r: r)
    with pytest.raises(ValueError, match="backend name 'auto' is already taken"):
        qkv.register_backend("auto", supports=lambda r: None, description="dup")(lambda r: r)
