"""qkv as a transformers attention implementation (``attn_implementation="qkv"``).

Tiny random models built with ``from_config`` (no network): each runs once on "eager"
and once on "qkv" with the same weights, and outputs, attention weights and greedy
generations must agree; spies on :func:`qkv.functional.scaled_dot_product_attention`
show *how* the request reached qkv (structure rather than dense masks, GQA heads not
repeated, sliding windows as ``window=``).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="qkv.hf needs transformers")

from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen3Config,
)
from transformers import masking_utils as mu  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

import qkv  # noqa: E402
import qkv.functional as qkv_functional  # noqa: E402
import qkv.hf  # noqa: E402
from qkv.hf import qkv_attention_forward, qkv_mask  # noqa: E402

VOCAB = 100


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
    )


def mistral_config() -> MistralConfig:
    # A window shorter than the inputs, so the window changes the result.
    return MistralConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        sliding_window=3,
    )


def gpt2_config() -> GPT2Config:
    # Per-layer scaling makes the model's `scaling=` differ from 1/sqrt(d_k).
    return GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=VOCAB,
        scale_attn_by_inverse_layer_idx=True,
    )


def bert_config() -> BertConfig:
    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )


def qwen3_config() -> Qwen3Config:
    # RMS-normalised queries and keys per head, MQA-like grouping (4 query heads per
    # key/value head) and a head width that is not hidden_size / heads.
    return Qwen3Config(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
    )


def gemma3_config() -> Gemma3TextConfig:
    # Local (sliding-window) and global layers in one model, a query scale that is not
    # 1/sqrt(d_k) (query_pre_attn_scalar), and no softcapping (which qkv refuses).
    return Gemma3TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=3,
        intermediate_size=128,
        vocab_size=VOCAB,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        max_position_embeddings=64,
    )


CONFIGS = {
    "llama": (llama_config, AutoModelForCausalLM),
    "mistral": (mistral_config, AutoModelForCausalLM),
    "gpt2": (gpt2_config, AutoModelForCausalLM),
    "bert": (bert_config, AutoModel),
    "qwen3": (qwen3_config, AutoModelForCausalLM),
    "gemma3": (gemma3_config, AutoModelForCausalLM),
}
DECODERS = ("llama", "mistral", "gpt2", "qwen3", "gemma3")
N_LAYERS = {kind: make().num_hidden_layers for kind, (make, _) in CONFIGS.items()}

_pairs: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}


def pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager model, qkv model) with identical random weights, in eval mode (cached)."""
    if kind not in _pairs:
        make_config, auto = CONFIGS[kind]
        torch.manual_seed(0)
        eager = auto.from_config(copy.deepcopy(make_config()), attn_implementation="eager")
        fast = auto.from_config(copy.deepcopy(make_config()), attn_implementation="qkv")
        fast.load_state_dict(eager.state_dict())
        _pairs[kind] = (eager.eval(), fast.eval())
    return _pairs[kind]


def batch(padding: str, B: int = 3, L: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and attention mask (B, L); rows 1.. are padded on ``padding``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(1, B):
        n = 2 * b  # a different amount of padding per row
        if padding == "left":
            mask[b, :n] = 0
        elif padding == "right":
            mask[b, L - n :] = 0
    return ids, mask


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class Spy:
    """Records every call that reaches qkv's functional attention (arguments and backend)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = qkv_functional.scaled_dot_product_attention

        def spy(q, k, v, **kwargs):
            result = original(q, k, v, **kwargs)
            backend = result.backend if kwargs.get("need_weights") else None
            self.calls.append({"q": q, "k": k, "v": v, "result_backend": backend, **kwargs})
            return result

        monkeypatch.setattr(qkv_functional, "scaled_dot_product_attention", spy)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


# ---------------------------------------------------------------- registration


def test_importing_qkv_does_not_import_transformers():
    code = "import sys, qkv; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registers_attention_and_mask_function():
    assert "qkv" in ALL_ATTENTION_FUNCTIONS
    assert "qkv" in mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert mu.ALL_MASK_ATTENTION_FUNCTIONS["qkv"] is qkv_mask


def test_without_mask_function_the_mask_is_lost(spy):
    """An attention function registered alone gets attention_mask=None: padding is lost,
    and so is causality over a static cache (the query would see the cache's unfilled
    slots). This is why qkv.hf registers a mask function too: with it both match eager
    (test_outputs_match_eager, test_generate_matches_eager)."""
    AttentionInterface.register("qkv_nomask", qkv_attention_forward)
    try:
        eager, _ = pair("llama")
        bare = AutoModelForCausalLM.from_config(
            copy.deepcopy(llama_config()), attn_implementation="qkv_nomask"
        ).eval()
        bare.load_state_dict(eager.state_dict())
        ids, mask = batch("left")
        with torch.no_grad():
            expected = eager(ids, attention_mask=mask).logits
            got = bare(ids, attention_mask=mask).logits
        assert all(c["key_padding_mask"] is None and c["attn_mask"] is None for c in spy.calls)
        real = mask.bool()
        assert (got - expected)[real].abs().max() > 1e-3

        ids, mask = batch("none", B=2, L=6)
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
        with torch.no_grad():
            expected = eager.generate(ids, cache_implementation="static", **kwargs)
            got = bare.generate(ids, cache_implementation="static", **kwargs)
        assert not torch.equal(got, expected)
    finally:
        del AttentionInterface._global_mapping["qkv_nomask"]


# ---------------------------------------------------------------- forward parity


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_outputs_match_eager(kind, padding):
    eager, fast = pair(kind)
    ids, mask = batch(padding)
    with torch.no_grad():
        expected = main_output(eager(ids, attention_mask=mask))
        got = main_output(fast(ids, attention_mask=mask))
    # Query rows that are padding see no key at all in a decoder with left padding:
    # eager spreads them uniformly, qkv returns zeros. Nothing real reads them.
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_attention_weights_match_eager_from_the_fast_kernel(kind, padding, spy):
    """output_attentions=True: exact weights from "flash", GPT-2 included (its model
    code drops the flag; qkv reads transformers' output collector instead)."""
    eager, fast = pair(kind)
    ids, mask = batch(padding)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, output_attentions=True).attentions
        got = fast(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(expected) == N_LAYERS[kind]
    real = mask.bool()
    for w_fast, w_eager in zip(got, expected, strict=True):
        assert w_fast.shape == w_eager.shape
        for b in range(ids.shape[0]):
            rows = real[b]
            torch.testing.assert_close(w_fast[b][:, rows], w_eager[b][:, rows], atol=1e-6, rtol=0)
    assert [c["result_backend"] for c in spy.calls] == ["flash"] * N_LAYERS[kind]


def test_from_pretrained_loads_onto_qkv(tmp_path):
    eager, _ = pair("llama")
    eager.save_pretrained(tmp_path)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="qkv").eval()
    assert fast.config._attn_implementation == "qkv"
    ids, _ = batch("none")
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, eager(ids).logits, atol=1e-5, rtol=0)


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in training mode with every dropout at 0, so eager and qkv see the same
    function (their dropout masks could never match) while autograd runs as in training."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def training_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(ids, attention_mask=mask)
    if hasattr(out, "logits"):
        # Next-token loss where both the input and the target are real tokens: a
        # padding query row sees no key at all, and eager and qkv fill it differently
        # (uniform weights vs zeros); nothing real reads it, so no loss may either.
        real = (mask[:, :-1] * mask[:, 1:]).bool()
        labels = ids[:, 1:].masked_fill(~real, -100)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, labels.reshape(-1))
    real = mask.bool()  # an encoder: any smooth function of the real tokens' states
    return out.last_hidden_state[real].pow(2).mean()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_training_step_gradients_match_eager(kind):
    eager, fast = (without_dropout(copy.deepcopy(m)) for m in pair(kind))
    ids, mask = batch("left" if kind in DECODERS else "right")
    loss_eager = training_loss(eager, ids, mask)
    loss_fast = training_loss(fast, ids, mask)
    torch.testing.assert_close(loss_fast, loss_eager, atol=1e-5, rtol=0)
    loss_eager.backward()
    loss_fast.backward()
    checked = 0
    for (name, p_eager), p_fast in zip(eager.named_parameters(), fast.parameters(), strict=True):
        if p_eager.grad is None:  # e.g. an unused pooler
            assert p_fast.grad is None, name
            continue
        torch.testing.assert_close(p_fast.grad, p_eager.grad, atol=1e-5, rtol=0, msg=name)
        checked += 1
    assert checked > 0
    # One optimiser step on each: the updated models still agree.
    for model in (eager, fast):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        torch.testing.assert_close(
            training_loss(fast, ids, mask), training_loss(eager, ids, mask), atol=1e-5, rtol=0
        )


def test_real_encoder_weights_match_eager():
    """Trained weights (all-MiniLM-L6-v2, shipped by the `model` extra), padded batch."""
    from qkv.pretrained import WeightsNotInstalledError, model_dir

    try:
        path = model_dir("all-MiniLM-L6-v2")
    except WeightsNotInstalledError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 weights not installed: {exc}")
    eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    fast = AutoModel.from_pretrained(path, attn_implementation="qkv").eval()
    ids, mask = batch("right", L=12)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, output_attentions=True)
        got = fast(ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    torch.testing.assert_close(
        got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=0
    )
    # Trained weights give larger scores than random ones: float32 eager itself is about
    # 2e-6 from a float64 run here (and qkv as close), so 1e-6 would test rounding.
    for w_fast, w_eager in zip(got.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(w_fast[0], w_eager[0], atol=1e-5, rtol=0)


def test_weights_only_computed_when_asked(spy):
    _, fast = pair("gpt2")
    ids, mask = batch("none")
    with torch.no_grad():
        out = fast(ids, attention_mask=mask)
    assert out.attentions is None
    assert not any(c["need_weights"] for c in spy.calls)


def test_packed_sequences_fall_back_to_the_dense_mask(spy):
    """position_ids that restart mark packed sequences: a pattern qkv has no structure
    for, so transformers hands over the full mask, and the result still matches."""
    eager, fast = pair("llama")
    ids, _ = batch("none", B=1, L=8)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        expected = eager(ids, position_ids=position_ids, use_cache=False).logits
        got = fast(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(c["attn_mask"] is not None and c["attn_mask"].ndim == 4 for c in spy.calls)
    assert not any(c["is_causal"] for c in spy.calls)


# ---------------------------------------------------------------- how requests arrive


def test_plain_causal_arrives_as_is_causal_and_gqa_unrepeated(spy):
    _, fast = pair("llama")
    ids, mask = batch("none")
    with torch.no_grad():
        fast(ids, attention_mask=mask)
    assert len(spy.calls) == 2
    for c in spy.calls:
        assert c["is_causal"] and c["attn_mask"] is None and c["key_padding_mask"] is None
        assert c["q"].shape[1] == 4 and c["k"].shape[1] == c["v"].shape[1] == 2  # H_kv heads
        assert c["enable_gqa"]


def test_padding_arrives_as_key_padding(spy):
    _, fast = pair("llama")
    ids, mask = batch("left")
    with torch.no_grad():
        fast(ids, attention_mask=mask)
    for c in spy.calls:
        assert c["is_causal"] and c["attn_mask"] is None
        assert torch.equal(c["key_padding_mask"], mask.bool())


def test_sliding_window_arrives_as_window(spy):
    _, fast = pair("mistral")
    ids, mask = batch("right")
    with torch.no_grad():
        fast(ids, attention_mask=mask)
    for c in spy.calls:
        assert c["window"] == 3 and c["is_causal"] and c["attn_mask"] is None


def test_encoder_is_not_causal(spy):
    _, fast = pair("bert")
    ids, mask = batch("right")
    with torch.no_grad():
        fast(ids, attention_mask=mask)
    assert spy.calls and not any(c["is_causal"] for c in spy.calls)
    assert all(c["key_padding_mask"] is not None for c in spy.calls)


def test_is_causal_keyword_overrides_the_module():
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    out, _ = qkv_attention_forward(module, q, k, v, None, is_causal=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    out, _ = qkv_attention_forward(module, q, k, v, None)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=0)


def test_scaling_and_dropout_are_passed_through(spy):
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    out, _ = qkv_attention_forward(module, q, k, v, None, scaling=0.1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=0)
    assert spy.calls[-1]["scale"] == 0.1

    spy.calls.clear()
    config = llama_config()
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_config(config, attn_implementation="qkv")
    ids, mask = batch("none")
    model.train()
    model(ids, attention_mask=mask)
    assert {c["dropout_p"] for c in spy.calls} == {0.5}
    spy.calls.clear()
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert {c["dropout_p"] for c in spy.calls} == {0.0}


# ---------------------------------------------------------------- the mask function


def test_mask_function_returns_structure_or_dense():
    causal = mu.causal_mask_function
    assert qkv_mask(2, 4, 4, mask_function=causal) is None
    pad = torch.tensor([[True] * 4, [False, True, True, True]])
    assert torch.equal(qkv_mask(2, 4, 4, mask_function=causal, attention_mask=pad), pad)
    # Static-cache prefill: 4 queries, a cache of 10 slots, 6 unfilled: only 4 keys kept.
    short = qkv_mask(2, 4, 10, q_offset=torch.tensor(0), mask_function=causal)
    assert short.shape == (2, 4) and bool(short.all())
    # Decoding step 6 into the same cache: keys 0..6 kept.
    assert qkv_mask(1, 1, 10, q_offset=6, mask_function=causal).shape == (1, 7)
    sliding = mu.sliding_window_causal_mask_function(3)
    assert qkv_mask(1, 5, 5, mask_function=sliding, local_size=3) is None
    # No structure for chunked attention: the dense mask, equal to sdpa's.
    chunked = mu.chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long))
    dense = qkv_mask(1, 5, 5, mask_function=chunked, local_size=2)
    expected = mu.sdpa_mask(1, 5, 5, mask_function=chunked, allow_is_causal_skip=False)
    assert torch.equal(dense, expected)
    # A caller that needs a tensor (allow_is_causal_skip=False) gets one.
    assert qkv_mask(1, 4, 4, mask_function=causal, allow_is_causal_skip=False).shape == (
        1,
        1,
        4,
        4,
    )


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", DECODERS)
def test_generate_matches_eager(kind, cache):
    eager, fast = pair(kind)
    ids, mask = batch("left", B=2, L=6)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        cache_implementation=cache,
    )
    with torch.no_grad():
        expected = eager.generate(ids, **kwargs)
        got = fast.generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_static_cache_prefill_drops_unfilled_slots(spy):
    """transformers' static cache is top-left aligned (S = cache size > L); qkv's causal
    is bottom-right: the unfilled slots are cut so both agree, and causal stays
    structural instead of becoming a dense mask."""
    _, fast = pair("llama")
    ids, mask = batch("none", B=2, L=5)
    with torch.no_grad():
        fast.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            cache_implementation="static",
        )
    prefill = [c for c in spy.calls if c["q"].shape[2] == 5]
    assert len(prefill) == 2
    for c in prefill:
        assert c["k"].shape[2] == 5 and c["is_causal"] and c["attn_mask"] is None


# ---------------------------------------------------------------- fewer weights


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_weight_subset_matches_eager_slice(kind, spy):
    eager, fast = pair(kind)
    ids, mask = batch("right")
    rows = [0, 2, -1]
    with torch.no_grad():
        full = eager(ids, attention_mask=mask, output_attentions=True).attentions
        with qkv.hf.weights(rows=rows, layers=[-1], average_heads=True):
            sub = fast(ids, attention_mask=mask, output_attentions=True).attentions
        with qkv.hf.weights(rows=[1]):
            one_row = fast(ids, attention_mask=mask, output_attentions=True).attentions
        with qkv.hf.weights(layers=0):
            first = fast(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(sub) == 1 and sub[0].shape == (3, 1, 3, 9)
    # Compare real query rows only (right padding: the last row of batch rows 1, 2 is a pad).
    expected = full[1].mean(1, keepdim=True)[:, :, rows]
    torch.testing.assert_close(sub[0][0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sub[0][:, :, :2], expected[:, :, :2], atol=1e-6, rtol=0)
    assert len(one_row) == 2
    for w, w_eager in zip(one_row, full, strict=True):
        torch.testing.assert_close(w, w_eager[:, :, [1]], atol=1e-6, rtol=0)
    assert len(first) == 1
    torch.testing.assert_close(first[0][0], full[0][0], atol=1e-6, rtol=0)
    # The subset is computed by the kernel, not sliced from a full pass.
    subset_calls = [c for c in spy.calls if c["need_weights"] and c["average_heads"]]
    assert subset_calls and all(c["weight_rows"] == (0, 2, -1) for c in subset_calls)
    assert all(c["result_backend"] == "flash" for c in subset_calls)


def test_weight_selection_is_validated():
    with pytest.raises(ValueError, match="rows"), qkv.hf.weights(rows=[]):
        pass
    with pytest.raises(TypeError, match="layers"), qkv.hf.weights(layers=1.5):
        pass


# ---------------------------------------------------------------- backends


def test_backend_is_selectable_globally_and_per_model(spy):
    name = qkv.hf.register("qkv_reference_test", backend="reference")
    try:
        eager, _ = pair("llama")
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(llama_config()), attn_implementation=name
        ).eval()
        model.load_state_dict(eager.state_dict())
        ids, mask = batch("left")
        with torch.no_grad():
            expected = eager(ids, attention_mask=mask).logits
            out = model(ids, attention_mask=mask, output_attentions=True)
        assert {c["backend"] for c in spy.calls} == {"reference"}
        assert {c["result_backend"] for c in spy.calls} == {"reference"}
        torch.testing.assert_close(
            out.logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0
        )

        spy.calls.clear()
        qkv.hf.use(model, backend="flash")  # per model: beats the registered default
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert {c["backend"] for c in spy.calls} == {"flash"}

        spy.calls.clear()
        qkv.hf.use(model, backend=None)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert {c["backend"] for c in spy.calls} == {"reference"}
    finally:
        qkv.hf.unregister(name)
    assert name not in ALL_ATTENTION_FUNCTIONS
    assert name not in mu.ALL_MASK_ATTENTION_FUNCTIONS


def test_use_switches_an_eager_model_to_qkv(spy):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        copy.deepcopy(llama_config()), attn_implementation="eager"
    ).eval()
    ids, mask = batch("none")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        qkv.hf.use(model, backend="reference")
        got = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "qkv"
    assert {c["backend"] for c in spy.calls} == {"reference"}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unknown_backend_fails_early():
    with pytest.raises(ValueError):
        qkv.hf.register("qkv_bad_backend", backend="no-such-backend")
    assert "qkv_bad_backend" not in ALL_ATTENTION_FUNCTIONS


# ---------------------------------------------------------------- what qkv refuses


@pytest.mark.parametrize(
    ("keyword", "value", "feature"),
    [
        ("softcap", 30.0, "softcapping"),
        ("s_aux", torch.zeros(4), "sinks"),
        ("sinks", torch.zeros(4), "sinks"),
        ("position_bias", torch.zeros(1, 4, 5, 5), "position bias"),
    ],
)
def test_unsupported_model_features_raise(keyword, value, feature):
    module = torch.nn.Module()
    q, k, v = (torch.randn(1, 4, 5, 8) for _ in range(3))
    with pytest.raises(NotImplementedError, match=feature):
        qkv_attention_forward(module, q, k, v, None, **{keyword: value})


def test_softcapping_model_raises():
    config = transformers.Gemma2Config(
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=VOCAB,
        attn_logit_softcapping=50.0,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="qkv").eval()
    ids, mask = batch("none")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="softcapping"):
        model(ids, attention_mask=mask)


# ---------------------------------------------------------------- qkv explain --model DIR


def word_tokenizer(words: list[str]):
    """A fast word-level tokenizer over ``words`` (no download), as transformers saves it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


# bert: a BERT folder whose tokenizer is not WordPiece goes to transformers too.
@pytest.mark.parametrize("kind", ["llama", "qwen3", "bert"])
def test_explain_reads_any_local_transformers_folder(kind, tmp_path, capsys):
    from qkv.cli.app import main

    words = ["the", "cat", "sat", "on", "mat", "because", "it", "was", "tired"]
    eager, _ = pair(kind)
    eager.save_pretrained(tmp_path / "model")
    word_tokenizer(words).save_pretrained(tmp_path / "model")
    argv = ["explain", "the cat sat on the mat because it was tired", "--focus", "it"]
    code = main([*argv, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    n = N_LAYERS[kind]
    assert f"{n} layers" in out.out and f"layer {n}" in out.out
    assert (tmp_path / "out" / "explorer.html").is_file()


def test_explain_folder_without_safetensors_is_a_one_line_error(tmp_path, capsys):
    from qkv.cli.app import main

    eager, _ = pair("llama")
    eager.config.save_pretrained(tmp_path)  # config.json only
    assert main(["explain", "a b", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "safetensors" in err and "Traceback" not in err


def test_explain_folder_without_a_tokenizer_is_a_one_line_error(tmp_path, capsys):
    from qkv.cli.app import main

    eager, _ = pair("llama")
    eager.save_pretrained(tmp_path)  # weights and config, no tokenizer
    capsys.readouterr()  # transformers' progress bar from saving
    assert main(["explain", "a b", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "Traceback" not in err and len(err.splitlines()) == 1
