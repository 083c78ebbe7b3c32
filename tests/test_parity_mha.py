"""Parity of qkv.MultiHeadAttention with torch.nn.MultiheadAttention (issue 2, acceptance 2).

torch's module is built with ``batch_first=True``, its weights are copied into qkv's
four projections, and outputs, averaged and per-head weights and all gradients are
compared in float64. Remember the two mask conventions differ: qkv's key_padding_mask
marks REAL tokens with True; torch's marks PADDING with True, so torch gets ``~mask``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import qkv

TOL = 1e-10
BACKENDS = ("reference", "torch", "auto")


def _pair(d_model=12, num_heads=3, *, kdim=None, vdim=None, bias=True, backend="auto"):
    """A torch MHA and a qkv MHA with identical weights (float64, eval mode)."""
    ref = nn.MultiheadAttention(
        d_model, num_heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True
    ).double()
    ours = qkv.MultiHeadAttention(
        d_model, num_heads, kdim=kdim, vdim=vdim, bias=bias, backend=backend
    ).double()
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            w_q, w_k, w_v = ref.in_proj_weight.chunk(3, dim=0)  # 3 x (d_model, d_model)
        else:
            w_q, w_k, w_v = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
        ours.q_proj.weight.copy_(w_q)
        ours.k_proj.weight.copy_(w_k)
        ours.v_proj.weight.copy_(w_v)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        if bias:
            b_q, b_k, b_v = ref.in_proj_bias.chunk(3)
            # torch initialises in_proj_bias to zeros: randomise so biases are really tested
            for ours_b, b in (
                (ours.q_proj.bias, b_q),
                (ours.k_proj.bias, b_k),
                (ours.v_proj.bias, b_v),
            ):
                b.normal_()
                ours_b.copy_(b)
            ref.out_proj.bias.normal_()
            ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ref.eval(), ours.eval()


def _with_backend(module: qkv.MultiHeadAttention, backend: str) -> qkv.MultiHeadAttention:
    """A copy of ``module`` (same weights) that runs on ``backend``."""
    c = module.config
    twin = qkv.MultiHeadAttention(
        c.d_model, c.num_heads, kdim=c.kdim, vdim=c.vdim, bias=c.bias, backend=backend
    ).double()
    twin.load_state_dict(module.state_dict())
    return twin.eval()


def _inputs(B=2, L=5, S=None, d_model=12, kdim=None, vdim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = L if S is None else S
    x = torch.randn(B, L, d_model, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, kdim or d_model, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, vdim or d_model, generator=g, dtype=torch.float64)
    return x, k, v


def _close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_output_and_grads(backend, bias):
    ref, ours = _pair(bias=bias, backend=backend)
    x, _, _ = _inputs()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    expected, _ = ref(x1, x1, x1, need_weights=False)
    got = ours(x2)
    _close(got, expected)
    g = torch.randn_like(got)
    expected.backward(g)
    got.backward(g)
    _close(x2.grad, x1.grad)
    # every parameter gradient, torch's packed in_proj split three ways
    gq, gk, gv = ref.in_proj_weight.grad.chunk(3)
    for p, gr in ((ours.q_proj.weight, gq), (ours.k_proj.weight, gk), (ours.v_proj.weight, gv)):
        _close(p.grad, gr)
    _close(ours.out_proj.weight.grad, ref.out_proj.weight.grad)
    if bias:
        _close(
            torch.cat([ours.q_proj.bias.grad, ours.k_proj.bias.grad, ours.v_proj.bias.grad]),
            ref.in_proj_bias.grad,
        )


@pytest.mark.parametrize("average", [True, False])
def test_weights_averaged_and_per_head(average):
    ref, ours = _pair(num_heads=4)
    x, _, _ = _inputs(L=6)
    expected, w_expected = ref(x, x, x, need_weights=True, average_attn_weights=average)
    got, w = ours(x, need_weights=True, average_weights=average)
    assert w.shape == ((2, 6, 6) if average else (2, 4, 6, 6))
    _close(got, expected)
    _close(w, w_expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask_is_inverted_torch_mask(backend):
    ref, ours = _pair(backend=backend)
    x, _, _ = _inputs(B=3, L=6)
    real = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.bool
    )  # qkv: True = real token
    expected, w_expected = ref(x, x, x, key_padding_mask=~real, average_attn_weights=False)
    got = ours(x, key_padding_mask=real)
    _close(got, expected)
    if backend != "torch":  # the torch backend cannot return weights (tested in test_errors)
        _, w = ours(x, key_padding_mask=real, need_weights=True, average_weights=False)
        _close(w, w_expected)
        assert torch.all(w.masked_select(~real[:, None, None, :]) == 0)
    # integer 0/1 masks (as tokenizers return them) mean the same thing
    _close(ours(x, key_padding_mask=real.long()), expected)


def test_fully_padded_sequence_is_zero_where_torch_is_nan():
    """The documented difference: torch gives NaN for a sequence with no real key."""
    ref, ours = _pair()
    x, _, _ = _inputs(B=2, L=4)
    real = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    # torch's weights path (need_weights=True) divides 0 by 0 for the empty sequence
    expected, w_expected = ref(x, x, x, key_padding_mask=~real, need_weights=True)
    assert torch.isnan(expected[1]).all() and torch.isnan(w_expected[1]).all()
    for backend in BACKENDS:
        got = _with_backend(ours, backend)(x, key_padding_mask=real)
        _close(got[0], expected[0])
        # zero context vectors, so the output is out_proj's bias alone
        _close(got[1], ours.out_proj.bias.expand(4, -1))
    got, w = ours(x, key_padding_mask=real, need_weights=True)
    _close(w[0], w_expected[0])
    assert torch.equal(w[1], torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdim,vdim", [(12, 12), (7, 12), (12, 5), (7, 5)])
def test_cross_attention_kdim_vdim(kdim, vdim, backend):
    ref, ours = _pair(kdim=kdim, vdim=vdim, backend=backend)
    if (kdim, vdim) != (12, 12):
        assert not ref._qkv_same_embed_dim  # the separate-weights path is exercised
    x, k, v = _inputs(L=4, S=9, kdim=kdim, vdim=vdim)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, 6:] = False
    expected, w_expected = ref(x, k, v, key_padding_mask=~real)
    got = ours(x, k, v, key_padding_mask=real)
    _close(got, expected)
    if backend != "torch":
        _, w = ours(x, k, v, key_padding_mask=real, need_weights=True)
        _close(w, w_expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_via_attn_mask(backend):
    ref, ours = _pair(backend=backend)
    x, _, _ = _inputs(L=7)
    future = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)  # torch: True = blocked
    expected, w_expected = ref(x, x, x, attn_mask=future, average_attn_weights=False)
    _close(ours(x, is_causal=True), expected)
    _close(ours(x, attn_mask=~future), expected)  # qkv: True = may attend
    causal_module = qkv.MultiHeadAttention(12, 3, causal=True, backend=backend).double().eval()
    causal_module.load_state_dict(ours.state_dict())
    _close(causal_module(x), expected)
    if backend != "torch":
        _, w = ours(x, is_causal=True, need_weights=True, average_weights=False)
        _close(w, w_expected)
        assert torch.all(w.masked_select(future) == 0)


def test_float_attn_mask_and_padding_together():
    ref, ours = _pair()
    x, _, _ = _inputs(L=5)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(5, 5, generator=g, dtype=torch.float64)  # additive, same convention
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    # torch wants both masks of one kind: its padding mask as an additive float mask
    pad = torch.zeros(2, 5, dtype=torch.float64).masked_fill(~real, float("-inf"))
    expected, w_expected = ref(x, x, x, attn_mask=bias, key_padding_mask=pad)
    got, w = ours(x, attn_mask=bias, key_padding_mask=real, need_weights=True)
    _close(got, expected)
    _close(w, w_expected)


def test_self_attention_module_matches_formula():
    """qkv.SelfAttention is the seeds' single head: softmax(Q Kᵀ / sqrt(d_k)) V."""
    torch.manual_seed(0)
    layer = qkv.SelfAttention(6, 4, 3).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    W_q, W_k, W_v = (p.weight.T for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    Q, K, V = x @ W_q, x @ W_k, x @ W_v  # (B, L, d_k), (B, L, d_k), (B, L, d_v)
    weights = torch.softmax(Q @ K.transpose(-2, -1) / math.sqrt(4), dim=-1)  # (B, L, L)
    expected = weights @ V  # (B, L, d_v)
    out, w = layer(x, need_weights=True)
    _close(out, expected)
    _close(w, weights)
    _close(layer(x), expected)  # fast path, no weights
    _close(layer(x[0]), expected[0])  # unbatched (L, d_in)
    assert layer.q_proj.bias is None  # the seeds' formulation has no biases

    causal = qkv.SelfAttention(6, 4, 3, causal=True).double()
    causal.load_state_dict(layer.state_dict())
    blocked = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    scores = (Q @ K.transpose(-2, -1) / 2.0).masked_fill(blocked, float("-inf"))
    _close(causal(x), torch.softmax(scores, dim=-1) @ V)


def test_simple_attention_is_the_untrained_baseline():
    """q = k = v = x, unscaled dot products, softmax, weighted sum of inputs."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    w_expected = torch.softmax(x @ x.transpose(-2, -1), dim=-1)
    out, w = qkv.simple_attention(x, need_weights=True)
    _close(w, w_expected)
    _close(out, w_expected @ x)
    _close(qkv.simple_attention(x), w_expected @ x)
    _close(qkv.simple_attention(x, scale=0.5), torch.softmax(0.5 * x @ x.mT, dim=-1) @ x)
