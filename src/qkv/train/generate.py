"""Text generation from a trained run: greedy, temperature and top-k sampling.

Shape legend: B batch (1 here) · L length · S source length · V vocabulary size.

With ``use_cache=True`` the prompt goes through the model once, filling one
:class:`qkv.KVCache` per decoder layer, and every later step feeds only the newest
token. With ``use_cache=False`` every step re-runs the whole sequence. Both give the
same tokens (a test checks it); the cache only saves work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from .models import DecoderOnly, EncoderDecoder, ModelConfig, build_model
from .tasks import Vocab
from .trainer import latest_checkpoint

__all__ = ["LoadedRun", "generate", "generate_text", "load_run", "sample_next"]


@dataclass
class LoadedRun:
    """A trained model with what is needed to talk to it."""

    model: DecoderOnly | EncoderDecoder
    vocab: Vocab
    task_kind: str  # "seq" (source -> answer) or "lm" (continue the text)
    config: dict
    checkpoint: Path


def load_run(path: str | Path) -> LoadedRun:
    """Load a run directory (its newest checkpoint) or one checkpoint directory."""
    path = Path(path)
    ckpt = path if (path / "model.safetensors").exists() else latest_checkpoint(path)
    run_dir = path if ckpt is not path else path.parent.parent
    if ckpt is None or not (run_dir / "config.json").exists():
        raise ValueError(f"{path} is neither a qkv training run nor one of its checkpoints")
    config = json.loads((run_dir / "config.json").read_text())
    model = build_model(ModelConfig(**config["model"]))
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    model.eval()
    vocab = Vocab(config["vocab"])
    return LoadedRun(model, vocab, config["task_kind"], config, ckpt)


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from logits ``(B, V)``: argmax at temperature 0, else sample.

    Returns ``(B,)`` token ids. ``top_k`` keeps the k most likely tokens before sampling.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DecoderOnly | EncoderDecoder,
    prompt: list[int],
    *,
    source: list[int] | None = None,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    eos: int | None = None,
) -> tuple[list[int], Tensor]:
    """Extend ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a decoder-only model, or an encoder-decoder (then ``source`` is required
            and ``prompt`` starts the target, usually ``[<bos>]``).
        prompt: token ids to continue (at least one).
        source: encoder input ids (encoder-decoder only).
        temperature, top_k: sampling settings; temperature 0 is greedy.
        seed: seeds the sampler (generation does not touch the global RNG).
        use_cache: decode incrementally with one :class:`qkv.KVCache` per layer.
        eos: stop after emitting this id.

    Returns:
        ``(new_ids, logits)``: the generated ids and their logits ``(N, V)``.
        Generation also stops when the position table (``max_len``) is full.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    encdec = isinstance(model, EncoderDecoder)
    if encdec and not source:
        raise ValueError("an encoder-decoder model needs a non-empty source")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    max_len = model.config.max_len
    if len(prompt) > max_len or (encdec and len(source) > max_len):
        raise ValueError(f"the prompt is longer than the model's max_len={max_len}")
    model.eval()
    memory = None
    if encdec:
        memory = model.encode(torch.tensor([source], device=device))  # (1, S, d_model)

    def run(tokens: list[int], caches) -> Tensor:
        x = torch.tensor([tokens], device=device)  # (1, L)
        if encdec:
            return model.decode(x, memory, caches=caches)
        return model(x, caches=caches)  # (1, L, V)

    seq = list(prompt)
    caches = model.new_caches() if use_cache else None
    new, all_logits = [], []
    pending = list(prompt)  # tokens the model has not seen yet (cached mode)
    while len(new) < max_new_tokens and len(seq) < max_len:
        logits = run(pending, caches)[:, -1] if use_cache else run(seq, None)[:, -1]  # (1, V)
        token = int(sample_next(logits.cpu(), temperature=temperature, top_k=top_k, generator=gen))
        all_logits.append(logits[0].cpu())
        new.append(token)
        seq.append(token)
        pending = [token]
        if eos is not None and token == eos:
            break
    stacked = torch.stack(all_logits) if all_logits else torch.empty(0, model.config.vocab_size)
    return new, stacked


def generate_text(
    run: LoadedRun,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> str:
    """Generate from text: a source's answer for sequence tasks, a continuation for ``lm``."""
    v = run.vocab
    ids = v.encode(prompt)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        use_cache=use_cache,
    )
    if run.task_kind == "lm":
        if not ids:
            raise ValueError("the prompt must not be empty for a language model")
        new, _ = generate(run.model, ids, **kwargs)
        return prompt + v.decode(new)
    if isinstance(run.model, EncoderDecoder):
        new, _ = generate(run.model, [v.bos], source=ids, eos=v.eos, **kwargs)
    else:
        new, _ = generate(run.model, [v.bos, *ids], eos=v.eos, **kwargs)
    return v.decode(new)
