"""Attention backends: a registry of implementations with one signature.

Importing this package registers the built-in backends. The package itself is
callable: ``qkv.backends()`` lists the backends usable in this process, while
``qkv.backends.reference`` etc. stay importable submodules.
"""

import sys
import types

from . import flash, reference, torch_sdpa  # noqa: F401  (registration side effects)
from . import triton as _triton  # noqa: F401  (registers only; Triton loads on first use)
from .dispatch import PREFERENCE, choose_backend
from .registry import Backend, backends, get_backend, register_backend
from .request import AttentionRequest, make_request

__all__ = [
    "PREFERENCE",
    "AttentionRequest",
    "Backend",
    "backends",
    "choose_backend",
    "get_backend",
    "make_request",
    "register_backend",
]


def available() -> dict[str, str]:
    """Registered backends usable in this process, by name, with a one-line description."""
    return {name: b.description for name, b in backends().items() if b.available()}


class _CallablePackage(types.ModuleType):
    # Lets ``qkv.backends()`` be the listing while ``qkv.backends`` stays the package.
    def __call__(self) -> dict[str, str]:
        return available()


sys.modules[__name__].__class__ = _CallablePackage
