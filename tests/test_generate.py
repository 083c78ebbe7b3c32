"""Generation: the KV cache changes nothing but the work done; sampling options behave."""

from __future__ import annotations

import pytest
import torch

from qkv.cli.app import main
from qkv.train.generate import generate, generate_text, load_run, sample_next
from qkv.train.models import ModelConfig, build_model
from qkv.train.tasks import agreement_text
from qkv.train.trainer import latest_checkpoint
from qkv.train.variants import VARIANTS

V = 17


def _model(kind: str, variant: str, max_len: int = 40):
    torch.manual_seed(1)
    m = build_model(ModelConfig(kind, V, variant, d_model=32, num_heads=4, max_len=max_len))
    # Larger random weights than the init, so that the logits are far from uniform.
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.4)
    return m.eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["decoder", "encdec"])
def test_cached_generation_equals_uncached(kind, variant):
    m = _model(kind, variant)
    src = [5, 9, 3, 12, 7] if kind == "encdec" else None
    prompt = [1] if kind == "encdec" else [1, 4, 8, 15, 6]
    runs = {}
    for name, settings in (("greedy", {}), ("top-k", {"temperature": 1.5, "top_k": 6, "seed": 7})):
        a, la = generate(m, prompt, source=src, max_new_tokens=12, use_cache=True, **settings)
        b, lb = generate(m, prompt, source=src, max_new_tokens=12, use_cache=False, **settings)
        assert a == b, name
        assert len(a) == 12
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        runs[name] = a
    assert runs["greedy"] != runs["top-k"]  # sampling really samples


def test_cached_logits_match_a_full_forward_pass():
    m = _model("decoder", "trainable")
    x = torch.randint(3, V, (1, 12))
    full = m(x)  # (1, 12, V)
    caches = m.new_caches()
    steps = [m(x[:, :5], caches=caches)] + [m(x[:, i : i + 1], caches=caches) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert len(caches[0]) == 12


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=5.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {1, 3}  # only the two most likely tokens
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, temperature=1.0, top_k=1, generator=g)) for _ in range(20)} == {
        1
    }
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, temperature=1.0, top_k=0)


def test_generation_stops_at_eos_and_max_len():
    m = _model("decoder", "fixed", max_len=10)
    out, _ = generate(m, [1, 4, 5], max_new_tokens=50)
    assert len(out) == 7  # the position table holds 10 tokens
    eos = out[2]
    out2, _ = generate(m, [1, 4, 5], max_new_tokens=50, eos=eos)
    assert out2 == out[: out.index(eos) + 1]
    with pytest.raises(ValueError, match="source"):
        generate(_model("encdec", "qk"), [1], max_new_tokens=3)
    with pytest.raises(ValueError, match="at least one"):
        generate(m, [], max_new_tokens=3)


SMALL = [
    "--steps=20",
    "--batch-size=16",
    "--d-model=32",
    "--num-heads=2",
    "--eval-every=20",
    "--eval-examples=32",
    "--test-examples=32",
    "--checkpoint-every=10",
    "--threads=1",
    "--no-progress",
]


def test_generate_command(tmp_path, capsys):
    seq = tmp_path / "sort"
    assert main(["train", "--task", "sort", *SMALL, "--out", str(seq)]) == 0
    text = tmp_path / "text.txt"
    text.write_text(agreement_text(0, 30_000))
    lm = tmp_path / "lm"
    assert (
        main(
            [
                "train",
                "--task",
                "charlm",
                "--text",
                str(text),
                "--block=16",
                *SMALL,
                "--out",
                str(lm),
            ]
        )
        == 0
    )
    capsys.readouterr()

    for run, prompt in ((seq, "dcba"), (lm, "the dogs ")):
        outs = []
        for extra in ([], ["--no-cache"], ["--temperature=0.9", "--top-k=5", "--seed=2"]):
            assert (
                main(
                    [
                        "generate",
                        "--checkpoint",
                        str(run),
                        "--prompt",
                        prompt,
                        "--max-new-tokens=8",
                        *extra,
                    ]
                )
                == 0
            )
            outs.append(capsys.readouterr().out.rstrip("\n"))
        assert outs[0] == outs[1]  # cache or not, same text
        loaded = load_run(run)
        assert outs[0] == generate_text(loaded, prompt, max_new_tokens=8)
        assert outs[2] == generate_text(
            loaded, prompt, max_new_tokens=8, temperature=0.9, top_k=5, seed=2
        )
    # The language model continues the prompt; the sort model answers it.
    assert load_run(lm).task_kind == "lm"
    assert generate_text(load_run(lm), "the dogs ", max_new_tokens=8).startswith("the dogs ")
    # A checkpoint directory works as well as the run directory.
    ckpt = latest_checkpoint(seq)
    assert generate_text(load_run(ckpt), "dcba") == generate_text(load_run(seq), "dcba")

    assert main(["generate", "--checkpoint", str(seq), "--prompt", "ABC"]) == 2
    assert "not in this task's vocabulary" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "abc"]) == 2
    assert "neither a qkv training run" in capsys.readouterr().err
