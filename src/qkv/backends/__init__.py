"""Attention backends: a registry of implementations with one signature.

Importing this package registers the built-in backends.
"""

from . import reference, torch_sdpa  # noqa: F401  (registration side effects)
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
