"""A once-per-machine measurement that tells ``"auto"`` when ``"flash"`` beats ``"torch"``.

Which of PyTorch's fused CPU kernel and qkv's compiled kernel is faster depends on the
CPU (AVX2 or AVX-512, bf16 instructions or not, cores, caches), the dtype, the pass and
the length; no constant measured on one machine holds on the next. So ``"auto"`` asks
this machine: a bounded micro-benchmark times both backends, interleaved, on a small
grid of cells and caches the result on disk:

    cells      dtype (float32, bfloat16, float16) x pass (forward, forward+backward)
               x causal (off, on) x length L = S (256, 512, 1,024, 2,048, 4,096);
               B = 1, d = 64, H = 8 (2 from 2,048, to bound the cost: per-head work
               is what matters); under a minute on 2 cores
    verdict    "flash" when its median time is below torch's, else "torch"
    lookup     a request uses the cell of its dtype, pass and causality whose length is
               nearest in log2(L * S); float64 and masks use the same cells as float32

The cache lives at ``${XDG_CACHE_HOME:-~/.cache}/qkv/auto/<key>.json`` (or
``$QKV_CACHE_DIR/auto``), keyed by the CPU model, its capability, the thread count, the
torch version and the compiled kernel's build key, so any of them changing measures
anew. :func:`reset` (``qkv calibrate --reset``) deletes it; ``qkv calibrate`` measures
ahead of time; ``QKV_AUTO_CALIBRATION=0`` turns measuring off, and ``"auto"`` then keeps
``"torch"`` wherever it serves the request (the structural rules in :mod:`.dispatch`
still apply).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .._cpu import cpu_model

__all__ = ["Calibration", "cache_path", "calibrate", "enabled", "lookup", "reset"]

logger = logging.getLogger("qkv")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LENGTHS = (256, 512, 1024, 2048, 4096)
#: Requests with fewer scores per head than this (half the smallest measured length,
#: squared) stay on "torch" without a measurement: both take microseconds there, and a
#: short sentence should never make a program pause to calibrate.
SMALLEST_SCORES = (LENGTHS[0] // 2) ** 2
#: Seconds the whole measurement may take (the cells are ordered so the most common
#: requests are measured first; cells left unmeasured keep "torch").
BUDGET_S = 60.0

_lock = threading.Lock()
_loaded: dict[str, Calibration] = {}
_by_threads: dict[tuple, Calibration] = {}


@dataclass(frozen=True)
class Calibration:
    """The measured verdicts: ``cells[key] = {"torch_ms", "flash_ms", "winner"}``."""

    machine: dict
    cells: dict[str, dict]

    def winner(self, dtype: str, grad: bool, causal: bool, scores: int) -> str | None:
        """The faster backend for the nearest measured cell, or None if none was measured."""
        best, dist = None, math.inf
        for L in LENGTHS:
            cell = self.cells.get(cell_key(dtype, grad, causal, L))
            if cell is None:
                continue
            d = abs(math.log2(max(scores, 1)) - math.log2(L * L))
            if d < dist:
                best, dist = cell["winner"], d
        return best


def cell_key(dtype: str, grad: bool, causal: bool, L: int) -> str:
    return f"{dtype}/{'fwd+bwd' if grad else 'fwd'}/{'causal' if causal else 'full'}/{L}"


def enabled() -> bool:
    return os.environ.get("QKV_AUTO_CALIBRATION", "1").strip().lower() not in ("0", "off", "no")


def _machine() -> dict:
    """What the verdicts depend on; all but the thread count is read once per process
    (``"auto"`` looks the calibration up on every call, so this must cost nothing)."""
    return {**_static_machine(), "threads": torch.get_num_threads()}


@functools.cache
def _static_machine() -> dict:
    from .flash import compiled

    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_dot": compiled.has_bf16_dot(),
        "fp16_dot": compiled.has_fp16_dot(),
        "torch": torch.__version__,
        "kernel": compiled.extension_dir().name,
    }


def cache_path(machine: dict | None = None) -> Path:
    machine = machine or _machine()
    key = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_root() / f"{key}.json"


def _cache_root() -> Path:
    root = os.environ.get("QKV_CACHE_DIR")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "auto" if root else base / "qkv" / "auto"


def reset() -> list[Path]:
    """Delete every cached calibration (all machines' keys); returns what was removed."""
    removed = []
    folder = cache_path().parent
    if folder.is_dir():
        for p in folder.glob("*.json"):
            p.unlink(missing_ok=True)
            removed.append(p)
    _loaded.clear()
    _by_threads.clear()
    return removed


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cell_calls(dtype: torch.dtype, grad: bool, causal: bool, L: int):
    from .. import scaled_dot_product_attention as qkv_sdpa

    H = 8 if L <= 1024 else 2
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(1, H, L, 64, generator=g).to(dtype) for _ in range(3))
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    gout = torch.randn(1, H, L, 64, generator=g).to(dtype)

    def torch_call():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if grad:
            torch.autograd.grad(out, (q, k, v), gout)

    def flash_call():
        out = qkv_sdpa(q, k, v, is_causal=causal, backend="flash")
        if grad:
            torch.autograd.grad(out, (q, k, v), gout)

    return torch_call, flash_call


def calibrate(budget_s: float = BUDGET_S, log: Callable[[str], None] | None = None) -> Calibration:
    """Measure every cell (within ``budget_s``), write the cache, and return the result."""
    with torch.inference_mode(False), torch.enable_grad():  # callers may be in no_grad
        return _calibrate(budget_s, log)


def _calibrate(budget_s: float, log: Callable[[str], None] | None) -> Calibration:
    machine = _machine()
    cells: dict[str, dict] = {}
    start = time.perf_counter()
    order = [
        (dt, grad, causal, L)
        for L in LENGTHS
        for dt in DTYPES
        for grad in (False, True)
        for causal in (False, True)
    ]
    for dt, grad, causal, L in order:
        if time.perf_counter() - start > budget_s:
            break
        torch_call, flash_call = _cell_calls(DTYPES[dt], grad, causal, L)
        torch_call(), flash_call()  # warm-up: kernel selection, first allocations
        one = _median_ms(torch_call, 1) + _median_ms(flash_call, 1)
        reps = max(1, min(5, int(0.5 * budget_s / len(order) * 1e3 / max(one, 1e-3))))
        t_ms, f_ms = [], []
        for _ in range(reps):  # interleaved, so load changes hit both alike
            t_ms.append(_median_ms(torch_call, 1))
            f_ms.append(_median_ms(flash_call, 1))
        t, f = statistics.median(t_ms), statistics.median(f_ms)
        key = cell_key(dt, grad, causal, L)
        cells[key] = {"torch_ms": t, "flash_ms": f, "winner": "flash" if f < t else "torch"}
        if log:
            log(f"{key:28s} torch {t:9.2f} ms  flash {f:9.2f} ms  -> {cells[key]['winner']}")
    result = Calibration(machine, cells)
    path = cache_path(machine)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"machine": machine, "cells": cells}, indent=1))
        tmp.replace(path)
    except OSError as exc:  # an unwritable cache only costs measuring again next time
        logger.warning("qkv auto: could not write the calibration cache %s (%s)", path, exc)
    _loaded[str(path)] = result
    _by_threads.clear()
    return result


def lookup() -> Calibration | None:
    """This machine's calibration: from memory, the disk cache, or measured now (once).

    None when calibration is disabled or the compiled kernel is unavailable.
    """
    from .flash import compiled

    if not enabled() or not compiled.available():
        return None
    # Fast path, on every "auto" call: the verdicts already loaded for this thread count
    # and cache folder (the folder can change between tests through QKV_CACHE_DIR).
    env = os.environ
    fast_key = (torch.get_num_threads(), env.get("QKV_CACHE_DIR"), env.get("XDG_CACHE_HOME"))
    hit = _by_threads.get(fast_key)
    if hit is not None:
        return hit
    path = cache_path()
    key = str(path)
    with _lock:
        if key not in _loaded:
            _load_or_measure(path, key)
        _by_threads[fast_key] = _loaded[key]
        return _loaded[key]


def _load_or_measure(path: Path, key: str) -> None:
    """Fill ``_loaded[key]`` from the disk cache, or by measuring now (logged: it pauses)."""
    try:
        data = json.loads(path.read_text())
        _loaded[key] = Calibration(data["machine"], data["cells"])
        return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    logger.warning(
        "qkv auto: timing torch and flash on this machine once (under %.0f s; cached "
        "in %s; `qkv calibrate` does it ahead of time, QKV_AUTO_CALIBRATION=0 skips it)",
        BUDGET_S,
        path,
    )
    _loaded[key] = calibrate()
