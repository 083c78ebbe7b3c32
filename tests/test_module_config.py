"""MultiHeadAttention built from its AttentionConfig: projections, intermediates, backend."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.config import PROJECTIONS
from qkv.modules import AttentionIntermediates, MultiHeadAttention

SETTINGS = [
    {},
    {"num_kv_heads": 2, "causal": True},
    {"kdim": 6, "vdim": 10, "bias": False},
    {"dropout": 0.1, "backend": "reference"},
    {"projections": "qk", "bias": False},
    {"projections": "fixed"},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_from_config_equals_keyword_constructor(settings):
    cfg = qkv.AttentionConfig(8, 4, **settings)
    torch.manual_seed(0)
    by_keywords = MultiHeadAttention(8, 4, **settings)
    torch.manual_seed(0)
    by_config = MultiHeadAttention.from_config(cfg)
    assert by_config.config is cfg and by_keywords.config == cfg
    a, b = by_keywords.state_dict(), by_config.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert repr(by_keywords) == repr(by_config)
    q = torch.randn(2, 5, 8)
    kv = torch.randn(2, 3, settings.get("kdim", 8))
    v = torch.randn(2, 3, settings.get("vdim", 8)) if "vdim" in settings else None
    torch.testing.assert_close(
        by_keywords.eval()(q, kv, v), by_config.eval()(q, kv, v), rtol=0, atol=0
    )


def test_from_config_refuses_other_types():
    with pytest.raises(TypeError, match=r"cfg must be a qkv\.AttentionConfig"):
        MultiHeadAttention.from_config({"d_model": 8, "num_heads": 2})


def test_construction_draws_the_same_numbers_whatever_the_projections():
    # Variants seeded alike share the rest of a model's initial weights.
    after = []
    for p in PROJECTIONS:
        torch.manual_seed(0)
        MultiHeadAttention(8, 2, projections=p)
        after.append(torch.rand(1))
    assert all(torch.equal(after[0], t) for t in after)


@pytest.mark.parametrize(
    ("projections", "learned"),
    [
        ("fixed", ()),
        ("qk", ("q_proj", "k_proj")),
        ("trainable", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ],
)
def test_projections_decide_the_learned_parameters(projections, learned):
    layer = MultiHeadAttention(8, 2, bias=False, projections=projections)
    assert layer.projections == projections == layer.config.projections
    assert layer.config.learned_projections == learned
    names = {n.split(".")[0] for n, p in layer.named_parameters() if p.requires_grad}
    assert names == set(learned)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(getattr(layer, name), torch.nn.Identity) == (name not in learned)
    assert sum(p.numel() for p in layer.parameters()) == len(learned) * 8 * 8


def test_fixed_projections_attend_over_the_input_split_into_heads():
    layer = MultiHeadAttention(8, 2, projections="fixed").double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h = x.view(2, 5, 2, 4).transpose(1, 2)  # (B, H, L, d_k)
    w = (h @ h.transpose(-2, -1) / 2.0).softmax(-1)  # (B, H, L, S)
    expect = (w @ h).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(layer(x), expect)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"num_kv_heads": 2}, "num_kv_heads"),
        ({"kdim": 6}, "kdim"),
        ({"vdim": 6}, "vdim"),
    ],
)
@pytest.mark.parametrize("projections", ["fixed", "qk"])
def test_identity_projections_refuse_width_changes(settings, named, projections):
    with pytest.raises(ValueError, match=f"projections='{projections}'.*{named}"):
        qkv.AttentionConfig(8, 4, projections=projections, **settings)


@pytest.mark.parametrize("bad", ["all", "", None, 3, ["qk"]])
def test_projections_must_name_a_setting(bad):
    with pytest.raises(ValueError, match="projections must be one of"):
        qkv.AttentionConfig(8, 2, projections=bad)


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_kv_heads": 1, "causal": True}, {"projections": "qk"}, {"projections": "fixed"}],
)
def test_forward_intermediates_match_a_manual_computation(settings):
    torch.manual_seed(1)
    layer = MultiHeadAttention(8, 4, **settings).double().eval()
    B, L, H, H_kv, d = 2, 5, 4, layer.config.kv_heads, 2
    x = torch.randn(B, L, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = layer.forward_intermediates(x, key_padding_mask=mask)
    assert isinstance(out, AttentionIntermediates)
    q = layer.q_proj(x).view(B, L, H, d).transpose(1, 2)  # (B, H, L, d_k)
    k = layer.k_proj(x).view(B, L, H_kv, d).transpose(1, 2)  # (B, H_kv, S, d_k)
    v = layer.v_proj(x).view(B, L, H_kv, d).transpose(1, 2)  # (B, H_kv, S, d_v)
    torch.testing.assert_close(out.q, q)
    torch.testing.assert_close(out.k, k)
    torch.testing.assert_close(out.v, v)
    kh, vh = (t.repeat_interleave(H // H_kv, dim=1) for t in (k, v))  # (B, H, S, d)
    scores = q @ kh.transpose(-2, -1) / d**0.5  # (B, H, L, S)
    allowed = mask[:, None, None, :]
    if layer.config.causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(out.weights, weights)
    torch.testing.assert_close(out.context, weights @ vh)
    assert out.output.shape == (B, L, 8)
    # Asking for weights may pick another backend than a plain call, so compare the
    # output bit for bit with the call that asks for them, and closely with the plain one.
    same = layer(x, key_padding_mask=mask, need_weights=True, average_weights=False)
    torch.testing.assert_close(out.output, same.output, rtol=0, atol=0)
    torch.testing.assert_close(out.weights, same.weights, rtol=0, atol=0)
    torch.testing.assert_close(out.output, layer(x, key_padding_mask=mask))
    merged = out.context.transpose(1, 2).reshape(B, L, 8)
    torch.testing.assert_close(out.output, layer.out_proj(merged))


def test_forward_intermediates_with_a_cache_keep_the_cached_keys():
    torch.manual_seed(2)
    layer = MultiHeadAttention(8, 2, causal=True).eval()
    x = torch.randn(1, 6, 8)
    cache = qkv.KVCache(16)
    layer(x[:, :4], cache=cache)
    step = layer.forward_intermediates(x[:, 4:], cache=cache)
    full = layer.forward_intermediates(x)
    assert step.k.shape == (1, 2, 6, 4) and step.weights.shape == (1, 2, 2, 6)
    torch.testing.assert_close(step.output, full.output[:, 4:])
    torch.testing.assert_close(step.weights, full.weights[:, :, 4:])


def test_set_backend_is_validated_and_keeps_the_rest():
    layer = MultiHeadAttention(8, 2, causal=True, projections="qk")
    before = layer.config
    assert layer.set_backend("reference") is layer
    assert layer.backend == layer.config.backend == "reference"
    assert layer.config == qkv.AttentionConfig(
        8, 2, causal=True, projections="qk", backend="reference"
    )
    with pytest.raises(ValueError, match="no-such-backend"):
        layer.set_backend("no-such-backend")
    with pytest.raises(TypeError, match="backend must be a string"):
        layer.set_backend(None)
    assert layer.backend == "reference"  # a refused name changes nothing
    assert before.backend == "auto"  # configs stay frozen: a new one was made
    with pytest.raises(AttributeError):
        layer.config = before  # the layer owns its settings; set_backend changes them
    x = torch.randn(1, 3, 8)
    assert layer(x, need_weights=True).backend == "reference"


def test_forward_intermediates_refuses_the_weights_flags_and_unknown_options():
    layer = MultiHeadAttention(8, 2)
    x = torch.randn(1, 3, 8)
    for bad in ({"need_weights": False}, {"average_weights": True}, {"mask": None}):
        with pytest.raises(TypeError, match="forward_intermediates got unexpected arguments"):
            layer.forward_intermediates(x, **bad)
