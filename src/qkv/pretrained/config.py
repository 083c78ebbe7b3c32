"""Typed configuration of a BERT-style sentence encoder, read from its model directory.

Two dataclasses, both validated on construction:

* :class:`EncoderConfig` — the architecture, from ``config.json`` (Hugging Face's names).
* :class:`PoolingConfig` — how token vectors become one sentence vector, from the
  sentence-transformers files (``sentence_bert_config.json``, ``1_Pooling/config.json``,
  ``modules.json``).

Only what qkv implements is accepted: absolute positions, exact GELU, mean pooling.
Anything else raises ``ValueError`` instead of silently computing something different.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path

__all__ = ["EncoderConfig", "PoolingConfig"]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-style encoder (post-LN blocks, learned absolute positions).

    Attributes:
        vocab_size: rows of the word-embedding table.
        hidden_size: d_model, the width of every token vector.
        num_hidden_layers: number of encoder blocks.
        num_attention_heads: H; ``hidden_size`` must be divisible by it (d_k = d_model / H).
        intermediate_size: width of the MLP's hidden layer.
        max_position_embeddings: the longest input in tokens, [CLS] and [SEP] included.
        type_vocab_size: rows of the token-type (segment) table.
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_act: MLP activation; only ``"gelu"`` (the exact, erf-based one) is supported.
        position_embedding_type: only ``"absolute"`` is supported.
        pad_token_id: id of ``[PAD]``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"config layer_norm_eps must be a positive number, got {eps!r}")
        if self.hidden_act != "gelu":
            raise ValueError(
                f"config hidden_act={self.hidden_act!r} is not supported (only 'gelu', exact)"
            )
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"config position_embedding_type={self.position_embedding_type!r} is not "
                "supported (only 'absolute')"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"config pad_token_id={self.pad_token_id} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        """d_k = d_v = hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        """Read Hugging Face's ``config.json``; unknown keys (dropout rates, etc.) are ignored."""
        data = _read_json(Path(path))
        if data.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {data['model_type']!r} is not 'bert'")
        known = {f.name for f in fields(cls)}
        # The sizes have no defaults on purpose: guessing one would build the wrong model.
        missing = sorted(f.name for f in fields(cls) if f.name not in data and _no_default(f))
        if missing:
            raise ValueError(f"{path} lacks required keys: {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def _no_default(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


@dataclass(frozen=True)
class PoolingConfig:
    """How sentence-transformers turns token vectors into a sentence embedding.

    Attributes:
        max_seq_length: inputs are cut to this many tokens by ``encode`` (as
            sentence-transformers does), [CLS] and [SEP] included.
        mode: only ``"mean"`` (mean over real tokens, padding excluded) is supported.
        normalize: L2-normalise the pooled vector.
    """

    max_seq_length: int = 256
    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        _positive_int("max_seq_length", self.max_seq_length)
        if self.mode != "mean":
            raise ValueError(f"pooling mode {self.mode!r} is not supported (only 'mean')")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(self.normalize).__name__}")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> PoolingConfig:
        """Read the sentence-transformers files of ``model_dir`` (defaults where absent)."""
        d = Path(model_dir)
        max_len = 256
        if (d / "sentence_bert_config.json").is_file():
            max_len = _read_json(d / "sentence_bert_config.json").get("max_seq_length", max_len)
        mode = "mean"
        if (d / "1_Pooling" / "config.json").is_file():
            pool = _read_json(d / "1_Pooling" / "config.json")
            modes = [
                k[len("pooling_mode_") :]
                for k, v in pool.items()
                if k.startswith("pooling_mode_") and v is True
            ]
            if modes != ["mean_tokens"]:
                raise ValueError(
                    f"{d / '1_Pooling' / 'config.json'}: pooling modes {modes} are not "
                    "supported (only mean_tokens)"
                )
        normalize = False
        if (d / "modules.json").is_file():
            with open(d / "modules.json", encoding="utf-8") as f:
                modules = json.load(f)
            normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
        return cls(max_seq_length=max_len, mode=mode, normalize=normalize)
