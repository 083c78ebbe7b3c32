"""``backend="auto"``: pick the fastest registered backend that serves the whole request.

The default order is :data:`PREFERENCE` (the first backend whose ``supports`` says yes
wins):

1. ``"triton"`` — FlashAttention-2 kernels; CUDA tensors only (``DEVICE_TYPES``): not
   considered, nor logged as skipped, for CPU ones (its CPU interpreter is for tests).
2. ``"torch"`` — PyTorch's fused kernels, when no weights are requested.
3. ``"flash"`` — qkv's tiled kernel: any mask, exact weights, linear memory.
4. ``"reference"`` — serves every request that fits in memory.

:func:`ordered` moves ``"flash"`` ahead of ``"torch"`` for CPU tensors by two kinds of
rule, none of them a constant timed on some machine:

* **structure** (true on any CPU): a sliding window (flash skips the tiles outside the
  band; SDPA reads a dense (L, S) mask and computes every score) and causal attention
  with L != S (SDPA needs a dense mask for the bottom-right alignment);
* **this machine's measurement** (:mod:`.calibration`): for plain and causal requests
  that both serve, the backend that was faster in the nearest measured cell (dtype,
  forward or forward+backward, causal, length), measured once per machine and cached;
  requests below the measured grid (fewer than 128 x 128 scores) stay on ``"torch"``.

Weight requests go to ``"flash"`` (exact weights from its log-sum-exp, memory only for
what is returned) and fall back to ``"reference"`` where flash refuses them.

A request is never degraded to fit a backend: features are not dropped, only
backends are skipped. Each skip of a preferred backend is logged once per reason
on the ``qkv`` logger (INFO), so a slower path is never taken silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

import torch

from ..result import AttentionResult
from . import calibration
from .registry import Backend, get_backend
from .request import AttentionRequest

__all__ = ["PREFERENCE", "choose_backend", "ordered", "run", "use_backend"]

logger = logging.getLogger("qkv")

#: Backend names in the order ``"auto"`` tries them (before :func:`ordered`'s rules).
PREFERENCE: list[str] = ["triton", "torch", "flash", "reference"]

#: Backends ``"auto"`` considers only for tensors of one device type.
DEVICE_TYPES: dict[str, str] = {"triton": "cuda"}

_logged: set[tuple[str, str]] = set()


def ordered(request: AttentionRequest) -> list[str]:
    """The names of :data:`PREFERENCE` in the order ``"auto"`` tries them for ``request``."""
    order = list(PREFERENCE)
    if "flash" in order and "torch" in order and _prefer_flash(request):
        order.remove("flash")
        order.insert(order.index("torch"), "flash")
    return order


def _prefer_flash(r: AttentionRequest) -> bool:
    if r.device.type != "cpu" or r.need_weights or r.dropout_p > 0:
        return False
    if r.window is not None or (r.causal and r.L != r.S and not r.has_mask_tensor):
        return True  # structure: flash skips what SDPA must compute or read densely
    if r.L * r.S < calibration.SMALLEST_SCORES:
        return False  # below the measured grid: no measurement (no pause) for tiny inputs
    verdicts = calibration.lookup()
    if verdicts is None:
        return False
    dtype = {torch.float64: torch.float32}.get(r.dtype, r.dtype)
    name = str(dtype).removeprefix("torch.")
    return verdicts.winner(name, r.needs_grad, r.causal, r.L * r.S) == "flash"


def choose_backend(request: AttentionRequest) -> Backend:
    """The backend ``"auto"`` uses for ``request``."""
    skipped: list[tuple[str, str]] = []
    for name in ordered(request):
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
    # Only memory limits make every backend refuse a valid request; say what each said.
    reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
    raise ValueError(f"no backend can serve this request ({reasons})")


_SELECTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("qkv_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run every ``backend="auto"`` call inside the block on ``name`` instead.

    Calls (and modules) that name a backend explicitly keep it. The selection is
    per thread / async task (a context variable) and nests::

        with qkv.use_backend("flash"):
            out = layer(x)          # layer.config.backend == "auto" -> "flash"
    """
    if name != "auto":
        get_backend(name)  # unknown names fail here, not at the first call
    token = _SELECTED.set(name)
    try:
        yield name
    finally:
        _SELECTED.reset(token)


def run(request: AttentionRequest, backend: str = "auto") -> AttentionResult:
    """Run a validated request on ``backend``: the one entry point of every caller.

    ``"auto"`` (or the block's :func:`use_backend` selection) chooses; a named backend
    that cannot serve the request raises ``ValueError`` with its reason, so a feature is
    never dropped silently.
    """
    if backend == "auto":
        backend = _SELECTED.get() or "auto"
    if backend == "auto":
        chosen = choose_backend(request)
    else:
        chosen = get_backend(backend)
        why = "not available here" if not chosen.available() else chosen.supports(request)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot serve this request: {why}")
    return chosen(request)
