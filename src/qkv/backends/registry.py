"""The backend registry: interchangeable attention implementations behind one signature.

A backend is a function ``(AttentionRequest) -> AttentionResult`` plus a ``supports``
check returning ``None`` when it can serve a request, or a short reason when not.
Callers pick one by name (``backend="reference"``); ``"auto"`` asks :mod:`.dispatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..result import AttentionResult
from .request import AttentionRequest

__all__ = ["Backend", "backends", "get_backend", "register_backend"]

BackendFn = Callable[[AttentionRequest], AttentionResult]
SupportsFn = Callable[[AttentionRequest], "str | None"]


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    Attributes:
        name: the string callers pass as ``backend=``.
        fn: computes attention for a request the backend supports.
        supports: ``None`` if ``fn`` can serve the request, else why not (one line).
        available: whether it can run at all in this process (e.g. Triton installed).
        description: one line for ``qkv.backends()`` and ``qkv --help``.
    """

    name: str
    fn: BackendFn
    supports: SupportsFn
    available: Callable[[], bool]
    description: str

    def __call__(self, request: AttentionRequest) -> AttentionResult:
        return self.fn(request)


_REGISTRY: dict[str, Backend] = {}


def register_backend(
    name: str,
    *,
    supports: SupportsFn,
    description: str,
    available: Callable[[], bool] = lambda: True,
) -> Callable[[BackendFn], BackendFn]:
    """Decorator: register ``fn`` under ``name`` (names are unique)."""

    def wrap(fn: BackendFn) -> BackendFn:
        if name in _REGISTRY or name == "auto":
            raise ValueError(f"backend name {name!r} is already taken")
        _REGISTRY[name] = Backend(name, fn, supports, available, description)
        return fn

    return wrap


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(["auto", *_REGISTRY]))
        raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None


def backends() -> dict[str, Backend]:
    """All registered backends by name (including ones not available here)."""
    return dict(_REGISTRY)
