"""What this CPU is: its model name, clock and instruction flags, read once per process.

Kernels and ``"auto"`` decide from the flags (bf16/fp16 dot products only where the CPU
has them), and every benchmark records them. ``/proc/cpuinfo`` is read once and cached:
the flags are consulted on every compiled-kernel call, and on a many-core machine the
file is long.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["cpu_flags", "cpu_mhz", "cpu_model", "isa_flags"]

#: The SIMD / matrix flags that decide attention kernel speed (what benchmarks record).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


@functools.cache
def _fields() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    return _fields().get("model name") or platform.processor() or platform.machine()


def cpu_mhz() -> float | None:
    try:
        return float(_fields()["cpu MHz"])
    except (KeyError, ValueError):
        return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    return frozenset(_fields().get("flags", "").split())


def isa_flags() -> list[str]:
    """The flags of :data:`ISA_FLAGS` this CPU has, in that order."""
    have = cpu_flags()
    return [f for f in ISA_FLAGS if f in have]
