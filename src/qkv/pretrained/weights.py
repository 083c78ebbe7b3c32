"""Checkpoint names (Hugging Face BERT) -> qkv parameter names, and loading with safetensors.

=========================================================  ====================================
Hugging Face ``model.safetensors``                          qkv (:class:`BertEncoder`)
=========================================================  ====================================
``embeddings.word_embeddings.weight`` (and position,       same name
token_type)
``embeddings.LayerNorm.{weight,bias}``                     ``embeddings.norm.*``
``encoder.layer.N.attention.self.query.*``                 ``layers.N.attention.q_proj.*``
``encoder.layer.N.attention.self.key.*``                   ``layers.N.attention.k_proj.*``
``encoder.layer.N.attention.self.value.*``                 ``layers.N.attention.v_proj.*``
``encoder.layer.N.attention.output.dense.*``               ``layers.N.attention.out_proj.*``
``encoder.layer.N.attention.output.LayerNorm.*``           ``layers.N.attn_norm.*``
``encoder.layer.N.intermediate.dense.*``                   ``layers.N.mlp.fc_in.*``
``encoder.layer.N.output.dense.*``                         ``layers.N.mlp.fc_out.*``
``encoder.layer.N.output.LayerNorm.*``                     ``layers.N.mlp_norm.*``
=========================================================  ====================================

Both sides store ``nn.Linear`` weights as ``(out_features, in_features)``, so tensors
are copied as they are. ``pooler.*`` (unused by mean pooling) and the
``embeddings.position_ids`` buffer are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch.nn as nn
from torch import Tensor

__all__ = ["load_weights", "qkv_name"]

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (
            r"^embeddings\.(word|position|token_type)_embeddings\.weight$",
            r"embeddings.\1_embeddings.weight",
        ),
        (r"^embeddings\.LayerNorm\.(weight|bias)$", r"embeddings.norm.\1"),
        (
            r"^encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)$",
            r"layers.\1.attention.q_proj.\2",
        ),
        (
            r"^encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)$",
            r"layers.\1.attention.k_proj.\2",
        ),
        (
            r"^encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)$",
            r"layers.\1.attention.v_proj.\2",
        ),
        (
            r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$",
            r"layers.\1.attention.out_proj.\2",
        ),
        (
            r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)$",
            r"layers.\1.attn_norm.\2",
        ),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$", r"layers.\1.mlp.fc_in.\2"),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$", r"layers.\1.mlp.fc_out.\2"),
        (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)$", r"layers.\1.mlp_norm.\2"),
    ]
]
_SKIPPED = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")


def qkv_name(hf_name: str) -> str | None:
    """The qkv parameter name for a checkpoint tensor; None for tensors qkv does not use.

    >>> qkv_name("encoder.layer.3.attention.self.key.weight")
    'layers.3.attention.k_proj.weight'
    >>> qkv_name("pooler.dense.bias") is None
    True
    """
    name = hf_name.removeprefix("bert.")  # checkpoints saved from BertFor* models nest it
    if _SKIPPED.match(name):
        return None
    for pattern, replacement in _RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in qkv's BERT encoder")


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Copy a BERT ``model.safetensors`` into ``module`` (a :class:`BertEncoder`).

    Every parameter must be filled and every shape must match: anything else raises
    ``ValueError`` naming the tensors, rather than leaving random weights behind.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors: dict[str, Tensor] = load_file(str(path))
    except SafetensorError as err:
        # A model directory is the user's; a cut-off download is the likely cause.
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated"
        ) from None
    mapped: dict[str, Tensor] = {}
    for hf_name, tensor in tensors.items():
        name = qkv_name(hf_name)
        if name is not None:
            mapped[name] = tensor
    own = module.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(own[name].shape)}"
            )
    module.load_state_dict(mapped, strict=True)
