"""Saving the attention weights ``qkv explain`` shows, with the tokens they belong to.

Two formats, chosen by the file name's extension:

* ``.safetensors``: one float32 tensor per stage, ``baseline`` ``(1, L, S)`` and
  ``layer1`` .. ``layerN`` ``(H, L, S)``; the tokens and the rest (text, focus word,
  causal flag, stage order) as JSON under the metadata key ``"qkv"``. Readable with
  ``safetensors.torch.load_file`` and ``safe_open(...).metadata()``.
* ``.npz``: the same arrays, plus the JSON as a 0-d string array ``"qkv"``; it loads
  with ``numpy.load(path)`` without ``allow_pickle``.

Shape legend: H heads · L queries · S keys (S = L). For a causal decoder the weights
of keys after the query are zeros, as the model computed them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .analysis import Explanation

__all__ = ["WEIGHT_FORMATS", "load_weights", "save_weights"]

#: Extensions :func:`save_weights` understands.
WEIGHT_FORMATS = (".safetensors", ".npz")


def _check_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FORMATS:
        raise ValueError(f"path must end in {' or '.join(WEIGHT_FORMATS)}, got {path.name!r}")
    return suffix


def _stage_names(n_stages: int) -> list[str]:
    return ["baseline", *(f"layer{n}" for n in range(1, n_stages))]


def save_weights(expl: Explanation, path: str | Path) -> Path:
    """Write every stage's weights and the tokens to ``path`` (see the module docstring).

    Raises ``ValueError`` for an extension other than ``.safetensors`` or ``.npz``;
    the system's ``OSError`` for a place it cannot write. Parent folders are created.
    """
    out = Path(path)
    suffix = _check_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = _stage_names(len(expl.stages))
    tensors = {
        name: expl.stage_weights(s).detach().to(torch.float32).contiguous()  # (H, L, S)
        for s, name in enumerate(names)
    }
    meta = {
        "text": expl.text.text,
        "tokens": list(expl.tokens),
        "stages": names,
        "causal": bool(expl.causal),
        "focus": {
            "word": expl.focus.word,
            "positions": list(expl.focus.positions),
            "occurrence": expl.focus.occurrence,
            "occurrences": expl.focus.occurrences,
        },
    }
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out), metadata={"qkv": json.dumps(meta)})
    else:
        import numpy as np

        arrays = {name: t.numpy() for name, t in tensors.items()}
        # A file object, so numpy does not append a second ".npz" to the name.
        with open(out, "wb") as fh:
            np.savez_compressed(fh, qkv=np.array(json.dumps(meta)), **arrays)
    return out


def load_weights(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read back what :func:`save_weights` wrote: ``({stage name: (H, L, S)}, metadata)``."""
    src = Path(path)
    suffix = _check_format(src)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as fh:
            meta = json.loads(fh.metadata()["qkv"])
            tensors = {name: fh.get_tensor(name) for name in meta["stages"]}
        return tensors, meta
    import numpy as np

    with np.load(src, allow_pickle=False) as data:
        meta = json.loads(str(data["qkv"]))
        tensors = {name: torch.from_numpy(data[name].copy()) for name in meta["stages"]}
    return tensors, meta
