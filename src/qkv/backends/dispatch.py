"""``backend="auto"``: pick the fastest registered backend that serves the whole request.

Rules, in order of preference (the first backend whose ``supports`` says yes wins):

1. ``"torch"`` — PyTorch's fused kernels, when no weights are requested.
2. ``"reference"`` — serves everything (weights, any mask, any dtype).

Device-bound backends are candidates only for tensors on their device (``DEVICE_TYPES``):
``"triton"`` comes first for CUDA tensors and is not considered, nor logged as
skipped, for CPU ones (its CPU interpreter is for tests, not speed).

A request is never degraded to fit a backend: features are not dropped, only
backends are skipped. Each skip of a preferred backend is logged once per reason
on the ``qkv`` logger (INFO), so a slower path is never taken silently.
"""

from __future__ import annotations

import logging

from .registry import Backend, get_backend
from .request import AttentionRequest

__all__ = ["PREFERENCE", "choose_backend"]

logger = logging.getLogger("qkv")

#: Backend names in the order ``"auto"`` tries them.
PREFERENCE: list[str] = ["triton", "torch", "reference"]

#: Backends ``"auto"`` considers only for tensors of one device type.
DEVICE_TYPES: dict[str, str] = {"triton": "cuda"}

_logged: set[tuple[str, str]] = set()


def choose_backend(request: AttentionRequest) -> Backend:
    """The backend ``"auto"`` uses for ``request``."""
    skipped: list[tuple[str, str]] = []
    for name in PREFERENCE:
        if DEVICE_TYPES.get(name, request.device.type) != request.device.type:
            continue  # not a candidate on this device: nothing skipped, nothing logged
        backend = get_backend(name)
        reason = None if backend.available() else "not available here"
        reason = reason or backend.supports(request)
        if reason is None:
            for skipped_name, why in skipped:
                if (skipped_name, why) not in _logged:
                    _logged.add((skipped_name, why))
                    logger.info("qkv auto: not using %r (%s); using %r", skipped_name, why, name)
            return backend
        skipped.append((name, reason))
    raise AssertionError("the reference backend serves every request")  # internal invariant
