"""Timing, memory and machine helpers shared by the benchmarks.

Method (the same for every benchmark, described in ``benchmarks/README.md``):

* **Interleaved rounds.** All implementations of one configuration are timed in the
  same process, one call each per round, round after round (the starting position
  rotates each round so no implementation always runs first, right after a slow
  one). The reported figure is the median over rounds, so a burst of load from
  another process on a shared machine moves one sample, not one implementation.
* **Warm-up.** Each implementation runs once before the rounds (twice when a call
  is short, see :func:`warm_up`); that call is also the memory measurement and the
  correctness check, and is never timed.
* **Short calls** are repeated inside a sample (``n_inner`` calls) so one sample
  lasts at least ``min_sample_s``; the sample is the mean call time.
* **Peak extra memory** is the rise of the process's resident-set high-water mark
  during one call (Linux: ``VmHWM`` in ``/proc/self/status``, reset by writing 5 to
  ``/proc/self/clear_refs``), after ``malloc_trim(0)`` has handed freed heap pages
  back to the kernel so re-used memory is counted again. It includes everything the
  call allocates and still holds at its peak (outputs, gradients, scratch buffers of
  oneDNN/MKL), not only tensors. Elsewhere it is recorded as unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .._cpu import cpu_model, isa_flags

__all__ = [
    "MemoryMeter",
    "Timing",
    "fmt_ms",
    "interleaved_timings",
    "machine_info",
    "matmul_peak_gflops",
    "median",
    "torch_threads",
    "warm_up",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def fmt_ms(ms: float) -> str:
    """Milliseconds with about three significant digits."""
    return (
        f"{ms:.0f}"
        if ms >= 100
        else f"{ms:.1f}"
        if ms >= 10
        else f"{ms:.2f}"
        if ms >= 1
        else f"{ms:.3f}"
    )


# --------------------------------------------------------------------- machine


def _total_ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, threads, memory, versions, load."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "ram_gib": _total_ram_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # What the kernels may use: bf16/fp16 dot products only where the CPU has them.
        "cpu_flags": isa_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # A busy shared machine shows here; the figures are noisier then.
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def matmul_peak_gflops(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), reps: int = 4):
    """This machine's measured matmul rate in ``dtype``: best GFLOP/s of square matmuls.

    A square ``n x n @ n x n`` product costs ``2 n^3`` FLOPs. The best of a few
    sizes and repeats approximates the attainable peak (not the datasheet one).
    """
    best = 0.0
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        a @ b  # warm-up: oneDNN/MKL pick and cache their kernel on the first call
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            best = max(best, 2 * n**3 / dt / 1e9)
    return best


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (None: unchanged); the previous count is restored."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- memory


class MemoryMeter:
    """Peak extra resident memory of one call (Linux); ``available`` is False elsewhere."""

    def __init__(self) -> None:
        self._libc = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                self._libc = ctypes.CDLL(name)
                self._libc.malloc_trim  # glibc only  # noqa: B018
            except (OSError, AttributeError):
                self._libc = None
        self.available = self._libc is not None and self._can_reset()

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024  # kB -> bytes
        return out

    def _can_reset(self) -> bool:
        try:
            self._reset()
            return "VmHWM" in self._status()
        except OSError:
            return False

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS to the current RSS

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run ``fn()``; return its result and the peak extra bytes (None if unavailable)."""
        if not self.available:
            return fn(), None
        self._libc.malloc_trim(0)  # freed heap pages go back, so reuse shows in RSS again
        self._reset()
        base = self._status()["VmRSS"]
        result = fn()
        peak = self._status()["VmHWM"]
        return result, max(peak - base, 0)


def warm_up(call: Callable[[], Any], meter: MemoryMeter, short_s: float = 0.5):
    """Untimed warm-up of ``call``; returns (result, peak extra bytes, seconds).

    The memory is measured on the first call, or on a second one when the first was
    shorter than ``short_s``: a first call also pays one-time set-up (kernel selection,
    thread pools) that would otherwise dominate the figure for small inputs.
    """
    t0 = time.perf_counter()
    result, mem = meter.measure(call)
    seconds = time.perf_counter() - t0
    if seconds < short_s:
        del result
        t0 = time.perf_counter()
        result, mem = meter.measure(call)
        seconds = min(seconds, time.perf_counter() - t0)
    return result, mem, seconds


# ---------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Timing of one implementation in one configuration (all times in seconds)."""

    samples: list[float] = field(default_factory=list)
    n_inner: int = 1
    first_call_s: float | None = None

    @property
    def median_s(self) -> float:
        return median(self.samples)


def interleaved_timings(
    calls: dict[str, Callable[[], Any]],
    *,
    first_call_s: dict[str, float],
    max_reps: int = 5,
    min_reps: int = 3,
    budget_s: float = 30.0,
    long_round_s: float = 20.0,
    min_sample_s: float = 0.05,
) -> dict[str, Timing]:
    """Time ``calls`` (already warmed up) in interleaved rounds; median per name.

    ``first_call_s`` (the warm-up durations) sizes the work: short calls are repeated
    ``n_inner`` times per sample; the number of rounds is what fits in ``budget_s``,
    between ``min_reps`` and ``max_reps``, except that rounds longer than
    ``long_round_s`` are run only as often as the budget allows (at least once).
    """
    names = list(calls)
    timings = {n: Timing(first_call_s=first_call_s[n]) for n in names}
    for n in names:
        timings[n].n_inner = max(1, math.ceil(min_sample_s / max(first_call_s[n], 1e-6)))
    round_s = sum(first_call_s[n] * timings[n].n_inner for n in names)
    reps = int(budget_s // max(round_s, 1e-9))
    reps = (
        max(1, min(reps, max_reps))
        if round_s > long_round_s
        else min(max(reps, min_reps), max_reps)
    )
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the start
        for n in order:
            fn, k = calls[n], timings[n].n_inner
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            timings[n].samples.append((time.perf_counter() - t0) / k)
    return timings
