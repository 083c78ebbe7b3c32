"""``backend="auto"``: pick the fastest registered backend that serves the whole request.

The default order is :data:`PREFERENCE` (the first backend whose ``supports`` says yes
wins):

1. ``"triton"`` — FlashAttention-2 kernels; CUDA tensors only (``DEVICE_TYPES``): not
   considered, nor logged as skipped, for CPU ones (its CPU interpreter is for tests).
2. ``"torch"`` — PyTorch's fused kernels, when no weights are requested.
3. ``"flash"`` — qkv's tiled kernel: any mask, exact weights, linear memory.
4. ``"reference"`` — serves everything (weights, any mask, any dtype).

:func:`ordered` then adjusts the order to the request, by rules measured on a 2-core
AVX-512 CPU (B=1, H=8, d=64, 2 threads; figures in the ``"flash"`` report):

* promote ``"flash"`` ahead of ``"torch"`` for CPU tensors when it is the faster one:
  bfloat16/float16 inference (no gradient needed) with ``PROMOTE_MIN_SCORES`` to
  ``PROMOTE_MAX_SCORES`` scores per head (it runs its matmuls in bfloat16: 1.3-1.5x
  SDPA at 2048-4096 tokens in benchmarks/results/attention.md, but slower at 512-1024,
  even at 8192 and behind at 16384; float16, whose CPU matmuls are slow here, it
  computes in float32: ~1.25x SDPA's float16 at 4096; for training it upcasts to
  float32 and SDPA is 1.6-1.7x faster, so training stays on ``"torch"``), a sliding
  window (it skips the tiles outside the band; SDPA reads a dense mask: ~2.8x at 2048
  tokens, window 256), and causal attention with L != S without a user mask (SDPA needs
  a dense (L, S) mask for the bottom-right alignment);
* demote ``"flash"`` behind ``"reference"`` when weights are requested for fewer than
  ``WEIGHTS_FLASH_MIN_SCORES`` scores per head: for short sequences the plain matmul is
  quicker and its memory small (from 1024 tokens on, ``"flash"`` is 2-5x faster and
  never holds more than the weights asked for).

Float32 without a window stays on ``"torch"``: PyTorch's fused CPU kernel is ahead of
the tiled PyTorch-level loop there (0.7-0.85x in our measurements).

A request is never degraded to fit a backend: features are not dropped, only
backends are skipped. Each skip of a preferred backend is logged once per reason
on the ``qkv`` logger (INFO), so a slower path is never taken silently.
"""

from __future__ import annotations

import logging

import torch

from .registry import Backend, get_backend
from .request import AttentionRequest

__all__ = ["PREFERENCE", "choose_backend", "ordered"]

logger = logging.getLogger("qkv")

#: Backend names in the order ``"auto"`` tries them (before :func:`ordered`'s rules).
PREFERENCE: list[str] = ["triton", "torch", "flash", "reference"]

#: Scores per head (L * S) between which "flash" beats "torch" for half-precision inference.
PROMOTE_MIN_SCORES = 2048 * 2048
PROMOTE_MAX_SCORES = 8192 * 8192
#: Scores per head (L * S) from which "flash" serves weight requests before "reference".
WEIGHTS_FLASH_MIN_SCORES = 1 << 18

#: Backends ``"auto"`` considers only for tensors of one device type.
DEVICE_TYPES: dict[str, str] = {"triton": "cuda"}

_logged: set[tuple[str, str]] = set()


def ordered(request: AttentionRequest) -> list[str]:
    """The names of :data:`PREFERENCE` in the order ``"auto"`` tries them for ``request``."""
    r = request
    promote: list[str] = []
    demote: list[str] = []
    scores = r.L * r.S
    if r.device.type == "cpu" and not r.need_weights:
        half = (
            r.dtype in (torch.bfloat16, torch.float16)
            and not r.needs_grad
            and PROMOTE_MIN_SCORES <= scores < PROMOTE_MAX_SCORES
        )
        band = r.window is not None or (r.causal and r.L != r.S and r.attn_mask is None)
        if half or band:
            promote.append("flash")
    if r.need_weights and scores < WEIGHTS_FLASH_MIN_SCORES:
        demote.append("flash")
    rest = [n for n in PREFERENCE if n not in promote and n not in demote]
    return [n for n in promote if n in PREFERENCE] + rest + [n for n in demote if n in PREFERENCE]


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
    raise AssertionError("the reference backend serves every request")  # internal invariant
