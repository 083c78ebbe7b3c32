"""Build the kernels for a GPU that is not here: an ahead-of-time check without a device.

Triton can compile for any target it knows (``GPUTarget("cuda", 90, 32)`` is the
H100) on a machine with no GPU, using the ``ptxas`` and ``cuobjdump`` shipped inside
the Triton wheel. That proves the compiled path builds (the interpreter used by the
CPU tests never compiles anything), and the machine code tells what a build costs:
registers per thread, bytes spilled to the stack, shared memory, and whether the
Hopper instructions (``HGMMA`` tensor-core ops, ``LDGSTS`` asynchronous copies) were
used. It says nothing about speed.

Used by ``tests/test_triton.py`` and ``benchmarks/triton_gpu.py --compile-report``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuildReport", "build", "tools_present"]

# Pointer arguments in the input dtype; then those that are float32 (Rows: int64 indices).
_DATA_POINTERS = {"Q", "K", "V", "Mask", "Out", "DOut", "DK", "DV", "DQ"}
_POINTER_TYPES = {"Lse": "*fp32", "Delta": "*fp32", "W": "*fp32", "Rows": "*i64"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
# Integer arguments a real launch would not see as multiples of 16 (the others, strides
# and lengths, are for the contiguous power-of-two shapes of the benchmark).
_NO_ALIGNMENT_HINT = {"H", "H_KV", "GROUP", "window", "R"}


@dataclass(frozen=True)
class BuildReport:
    """What one build costs, read from its machine code (per thread unless noted)."""

    registers: int
    stack_bytes: int
    shared_bytes: int  # per program
    wgmma: int  # HGMMA instructions in the SASS
    cp_async: int  # LDGSTS instructions in the SASS


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / name


def tools_present() -> bool:
    """Whether this Triton install can build NVIDIA code here (ptxas, cuobjdump)."""
    try:
        return _tool("ptxas").exists() and _tool("cuobjdump").exists()
    except ImportError:
        return False


def _signature(fn, constexprs: dict, dtype: str) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
            continue
        if arg == "Mask":  # uint8 for bool masks, float32 for float ones
            sig[arg] = "*" + {0: dtype, 1: "u8", 2: "fp32"}[int(constexprs.get("MASK_KIND", 0))]
        elif arg in _DATA_POINTERS:
            sig[arg] = "*" + dtype
        elif arg in _POINTER_TYPES:
            sig[arg] = _POINTER_TYPES[arg]
        elif arg in _FLOAT_ARGS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
        if sig[arg].startswith("*") or (sig[arg] == "i32" and arg not in _NO_ALIGNMENT_HINT):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def build(
    kernel: str,
    *,
    dtype: str = "bf16",
    capability: int = 90,
    num_warps: int = 4,
    num_stages: int = 2,
    **constexprs,
) -> BuildReport:
    """Compile ``kernels.<kernel>`` for ``sm_<capability>`` and report its resources.

    ``constexprs`` must give every ``tl.constexpr`` argument (BLOCK_M, BLOCK_N too).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .autograd import load_kernels

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET to build compiled kernels")
    fn = getattr(load_kernels(), kernel)
    if hasattr(fn, "configs"):  # an autotuned kernel wraps the JIT function
        fn = fn.fn
    sig, attrs = _signature(fn, constexprs, dtype)
    compiled = triton.compile(
        ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = str(_tool("cuobjdump"))
        usage = subprocess.run([dump, "-res-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([dump, "-sass", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage.stderr.strip()}")
    return BuildReport(
        registers=int(m.group(1)),
        stack_bytes=int(m.group(2)),
        shared_bytes=int(compiled.metadata.shared),
        wgmma=len(re.findall(r"\bHGMMA\b", sass.stdout)),
        cp_async=len(re.findall(r"\bLDGSTS\b", sass.stdout)),
    )
