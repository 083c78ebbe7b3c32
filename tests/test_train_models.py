"""The experiment's models: shapes, causality, and which parameters each variant has."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.train.models import (
    DecoderOnly,
    EncoderDecoder,
    ModelConfig,
    attention_parameter_count,
    build_model,
)
from qkv.train.variants import VARIANTS, make_attention, projection_names

D, H, V, N = 32, 4, 23, 2  # d_model, heads, vocabulary, layers


def _model(kind: str, variant: str) -> DecoderOnly | EncoderDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(kind, V, variant, d_model=D, num_heads=H, num_layers=N, max_len=24)
    return build_model(cfg).double().eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_shapes_and_weights(variant):
    m = _model("decoder", variant)
    x = torch.randint(0, V, (3, 11))
    assert m(x).shape == (3, 11, V)
    out = m(x, need_weights=True)
    assert out.logits.shape == (3, 11, V)
    assert len(out.self_weights) == N
    for w in out.self_weights:
        assert w.shape == (3, H, 11, 11)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, H, 11, dtype=w.dtype))
        assert (w.triu(1) == 0).all()  # nothing above the diagonal: causal


@pytest.mark.parametrize("variant", VARIANTS)
def test_encdec_shapes_and_padding(variant):
    m = _model("encdec", variant)
    src = torch.randint(3, V, (2, 9))
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 6:] = False
    tgt = torch.randint(3, V, (2, 5))
    out = m(src, tgt, src_padding=pad, need_weights=True)
    assert out.logits.shape == (2, 5, V)
    assert [w.shape for w in out.encoder_weights] == [(2, H, 9, 9)] * N
    assert [w.shape for w in out.cross_weights] == [(2, H, 5, 9)] * N
    for w in out.cross_weights + out.encoder_weights:
        assert (w[1, ..., 6:] == 0).all()  # padded source positions get no weight
    # Changing the padded source tokens changes nothing.
    src2 = src.clone()
    src2[1, 6:] = 3
    torch.testing.assert_close(m(src2, tgt, src_padding=pad), out.logits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_outputs_do_not_depend_on_future_tokens(kind, variant):
    m = _model(kind, variant)
    x = torch.randint(3, V, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(3, V, (2, 5))  # change the future from position 7 on
    src = torch.randint(3, V, (2, 6))
    run = (lambda t: m(t)) if kind == "decoder" else (lambda t: m(src, t))
    a, b = run(x), run(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-6  # and the future does change


def test_encoder_is_bidirectional():
    m = _model("encdec", "trainable")
    src = torch.randint(3, V, (1, 8))
    tgt = torch.randint(3, V, (1, 4))
    src2 = src.clone()
    src2[0, -1] = (src[0, -1] - 2) % (V - 3) + 3  # another token at the last source position
    mem_a, mem_b = m.encode(src), m.encode(src2)
    assert (mem_a[0, 0] - mem_b[0, 0]).abs().max() > 1e-6  # the first position sees the last
    assert (m(src, tgt) - m(src2, tgt)).abs().max() > 1e-6


def test_parameter_count_per_variant():
    counts = {}
    for kind in ("decoder", "encdec"):
        layers = N if kind == "decoder" else 3 * N  # encoder self + decoder self + cross
        for variant in VARIANTS:
            m = _model(kind, variant)
            n_proj = len(projection_names(variant))
            assert attention_parameter_count(m) == layers * n_proj * D * D
            counts[kind, variant] = sum(p.numel() for p in m.parameters())
        # Everything else is shared: the totals differ by the projections alone.
        assert counts[kind, "qk"] - counts[kind, "fixed"] == layers * 2 * D * D
        assert counts[kind, "trainable"] - counts[kind, "qk"] == layers * 2 * D * D
    fixed = make_attention("fixed", D, H, causal=True)
    assert list(fixed.parameters()) == []
    assert all(isinstance(getattr(fixed, n), torch.nn.Identity) for n in ("q_proj", "v_proj"))


def test_fixed_attention_is_the_seeds_baseline_per_head():
    # q = k = v = x split into heads, softmax(q kᵀ / sqrt(d_k)) v, heads concatenated.
    layer = make_attention("fixed", 8, 2, causal=False).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    heads = x.view(2, 5, 2, 4).transpose(1, 2)  # (B, H, L, d_k)
    want = torch.softmax(heads @ heads.transpose(-1, -2) / 2.0, -1) @ heads
    torch.testing.assert_close(layer(x), want.transpose(1, 2).reshape(2, 5, 8))
    # With one head and scale 1 it is exactly qkv.simple_attention.
    one = make_attention("fixed", 8, 1, causal=True).double()
    scaled = x * 8**0.25  # cancel the 1/sqrt(d_k) scale: (x s)(x s)ᵀ / sqrt(8) = x xᵀ
    torch.testing.assert_close(one(scaled) / 8**0.25, qkv.simple_attention(x, is_causal=True))


def test_qk_passes_values_unchanged():
    layer = make_attention("qk", 8, 2, causal=False).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    res = layer(x, need_weights=True, average_weights=False)
    heads = x.view(1, 4, 2, 4).transpose(1, 2)  # (B, H, L, d_v): the input itself
    want = (res.weights @ heads).transpose(1, 2).reshape(1, 4, 8)
    torch.testing.assert_close(res.output, want)


def test_trainable_is_qkv_multihead_attention():
    layer = make_attention("trainable", 8, 2, causal=True)
    assert type(layer) is qkv.MultiHeadAttention
    assert projection_names("trainable") == ("q_proj", "k_proj", "v_proj", "out_proj")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="attention variant"):
        ModelConfig("decoder", 10, "learned")
    with pytest.raises(ValueError, match="model kind"):
        ModelConfig("encoder", 10)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig("decoder", 10, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig("decoder", 10, d_model=0)
    m = _model("decoder", "fixed")
    with pytest.raises(ValueError, match="max_len"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(1, 3))
