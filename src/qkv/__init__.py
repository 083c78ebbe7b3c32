"""qkv: self-attention, from the untrained baseline to fast exact kernels.

Shape legend used in every docstring: B batch · H query heads · H_kv key/value
heads · L query length · S key/value length · d_model embedding width · d_k
query/key width per head · d_v value width per head. Boolean masks: True = may
attend; float masks are added to the scores.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so that ``import qkv`` (and so ``qkv
# --help``) does not import torch. ``from qkv import X`` and ``qkv.X`` work as usual.
_LAZY = {
    "AttentionConfig": ".config",
    "AttentionIntermediates": ".modules",
    "AttentionRequest": ".backends",
    "AttentionResult": ".result",
    "Band": ".band",
    "KVCache": ".cache",
    "MultiHeadAttention": ".modules",
    "SelfAttention": ".modules",
    "get_backend": ".backends",
    "register_backend": ".backends",
    "scaled_dot_product_attention": ".functional",
    "simple_attention": ".functional",
    "use_backend": ".backends.dispatch",
}
_SUBMODULES = ("backends", "masks")

if TYPE_CHECKING:  # what static tools see
    from . import backends, masks
    from .backends import AttentionRequest, get_backend, register_backend
    from .backends.dispatch import use_backend
    from .band import Band
    from .cache import KVCache
    from .config import AttentionConfig
    from .functional import scaled_dot_product_attention, simple_attention
    from .modules import AttentionIntermediates, MultiHeadAttention, SelfAttention
    from .result import AttentionResult


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f".{name}", __name__)
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module 'qkv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AttentionConfig",
    "AttentionIntermediates",
    "AttentionRequest",
    "AttentionResult",
    "Band",
    "KVCache",
    "MultiHeadAttention",
    "SelfAttention",
    "backends",
    "get_backend",
    "masks",
    "register_backend",
    "scaled_dot_product_attention",
    "simple_attention",
    "use_backend",
]
