"""The compiled CPU kernel of the ``"flash"`` backend (a C++ extension built on first use).

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width.

The sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` the first
time :func:`load` (or any op) is called, into a cache folder, and registered as the
torch ops ``torch.ops.qkv_flash.{forward,backward,weights}``. The build:

* goes to ``$QKV_EXTENSIONS_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/qkv/extensions/<key>``,
  where ``key`` hashes the torch version, the source text, the compile flags and the CPU
  capability, so a home folder shared by machines with different CPUs never loads a
  build made for another instruction set;
* uses ``-O3 -fopenmp`` (``at::parallel_for`` is inlined from ATen's OpenMP header and
  only runs in parallel when the extension itself is compiled with OpenMP) and the ISA
  flags of ``torch.backends.cpu.get_cpu_capability()``, so ``at::vec::Vectorized`` uses
  the same register width as PyTorch's own kernels on this CPU;
* holds a file lock while building, so concurrent processes (pytest-xdist workers)
  wait for one build instead of writing the same files at once.

If the build fails (no compiler, no ninja, ...), :func:`available` is False,
:func:`build_error` says why, and one warning is logged on the ``"qkv"`` logger; callers
then use the PyTorch-level loops. ``QKV_NO_COMPILE=1`` disables the extension (to test
that fallback).

Band arguments ``lo``/``hi``: key ``j`` is allowed for query ``i`` iff
``lo <= j - i - (S - L) <= hi`` (bottom-right aligned); ``None`` or an infinite value
means unbounded (passed to C++ as ``∓UNBOUNDED``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._cpu import cpu_flags

__all__ = [
    "UNBOUNDED",
    "available",
    "backward",
    "build_error",
    "build_seconds",
    "extension_dir",
    "forward",
    "has_bf16_dot",
    "has_fp16_dot",
    "load",
    "vec_width",
    "weights",
]

logger = logging.getLogger("qkv")

UNBOUNDED = 1 << 62
"""Band limits at or beyond ±UNBOUNDED mean "no limit on that side"."""

_CSRC = Path(__file__).with_name("csrc")
_NAME = "qkv_flash"

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ok": False, "error": None, "seconds": None}


# --------------------------------------------------------------------------- CPU flags


def _torch_cpu_check(name: str) -> bool:
    fn = getattr(torch._C._cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # pragma: no cover - defensive: private API
        return False


@functools.cache  # consulted on every kernel call; the CPU does not change
def has_bf16_dot() -> bool:
    """True when the CPU multiplies bfloat16 natively (avx512_bf16 or AMX-BF16).

    Only then is a bfloat16 GEMM faster than converting tiles to float32; elsewhere
    oneDNN/MKL emulate it, about 100x slower.
    """
    flags = cpu_flags()
    return (
        "avx512_bf16" in flags
        or "amx_bf16" in flags
        or _torch_cpu_check("_is_avx512_bf16_supported")
    )


@functools.cache
def has_fp16_dot() -> bool:
    """True when the CPU multiplies float16 natively (avx512_fp16 or AMX-FP16)."""
    flags = cpu_flags()
    return (
        "avx512_fp16" in flags or "amx_fp16" in flags or _torch_cpu_check("_is_amx_fp16_supported")
    )


# --------------------------------------------------------------------------- build


def _capability_flags() -> tuple[str, list[str]]:
    """The CPU capability PyTorch dispatches to here, and the matching compile flags."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512", "AVX512_BF16", "AMX"):
        return "AVX512", [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY_AVX512",
            "-DCPU_CAPABILITY=AVX512",
        ]
    if cap == "AVX2":
        return "AVX2", [
            "-mavx2",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY_AVX2",
            "-DCPU_CAPABILITY=AVX2",
        ]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def _sources() -> list[Path]:
    return sorted(p for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _build_config() -> tuple[str, list[str], list[str]]:
    """(cache key, cflags, ldflags)."""
    cap, isa = _capability_flags()
    cflags = ["-O3", "-fopenmp", "-std=c++17", "-DNDEBUG", *isa]
    ldflags = ["-fopenmp"]
    h = hashlib.sha256()
    for part in (
        torch.__version__,
        torch.version.git_version or "",
        cap,
        " ".join(cflags),
        " ".join(ldflags),
    ):
        h.update(part.encode())
        h.update(b"\0")
    for src in _sources():
        # The absolute path too: ninja's build file records it, so two checkouts sharing
        # one folder would each see the other's build as stale and rebuild over it.
        h.update(str(src.resolve()).encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:20], cflags, ldflags


def extension_dir() -> Path:
    """The build folder of the current sources (their content and location), flags, torch
    version and CPU capability."""
    key, _, _ = _build_config()
    root = os.environ.get("QKV_EXTENSIONS_DIR")
    if root:
        return Path(root).expanduser() / key
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "qkv" / "extensions" / key


def _ninja_on_path() -> None:
    """Put the ``ninja`` that qkv depends on (the PyPI package) on PATH for cpp_extension.

    cpp_extension runs ``ninja`` from PATH; a venv used without being activated (as in
    ``make test``) has it in its scripts folder, which is then not on PATH.
    """
    folders = [sysconfig.get_path("scripts")]
    try:
        import ninja

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    for folder in folders:
        if folder and folder not in path and Path(folder, "ninja").exists():
            os.environ["PATH"] = os.pathsep.join([folder, *path])
            return


def _build() -> None:
    from filelock import FileLock  # installed with torch
    from torch.utils import cpp_extension

    _ninja_on_path()

    key, cflags, ldflags = _build_config()
    folder = extension_dir()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # cpp_extension has its own lock on the build step; ours also covers reading a
    # half-written .so left by a process that is still linking it.
    with FileLock(str(folder / "qkv_build.lock")):
        cpp_extension.load(
            name=f"{_NAME}_{key}",
            sources=[str(p) for p in _sources() if p.suffix == ".cpp"],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(_CSRC)],
            build_directory=str(folder),
            is_python_module=False,
            verbose=os.environ.get("QKV_VERBOSE_BUILD") == "1",
        )
    _state["seconds"] = time.perf_counter() - start
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations, so the ops can be traced by torch.compile."""

    def fwd_fake(q, k, v, mask, lo, hi, scale, need_lse=True, half_dot=False):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_empty((*q.shape[:3], v.shape[-1]))
        lse = q.new_empty(q.shape[:3] if need_lse else (0,), dtype=acc)
        return out, lse

    def bwd_fake(q, k, v, out, dout, lse, mask, lo, hi, scale, half_dot=False):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def w_fake(q, k, lse, mask, lo, hi, scale, rows=None, average_heads=False):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        R = q.shape[2] if rows is None else rows.numel()
        shape = (
            (q.shape[0], R, k.shape[2])
            if average_heads
            else (q.shape[0], q.shape[1], R, k.shape[2])
        )
        return q.new_empty(shape, dtype=acc)

    try:
        torch.library.register_fake(f"{_NAME}::forward")(fwd_fake)
        torch.library.register_fake(f"{_NAME}::backward")(bwd_fake)
        torch.library.register_fake(f"{_NAME}::weights")(w_fake)
    except Exception as exc:  # pragma: no cover - fakes are optional
        logger.debug("qkv_flash fake registration failed: %s", exc)


def load() -> Any | None:
    """Builds (first call only) and returns the ``torch.ops.qkv_flash`` namespace, or None."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if os.environ.get("QKV_NO_COMPILE") == "1":
                _state["error"] = "disabled by QKV_NO_COMPILE=1"
                logger.info(
                    "qkv: compiled flash kernel %s; using the PyTorch-level loops", _state["error"]
                )
            else:
                try:
                    _build()
                    _state["ok"] = True
                except Exception as exc:  # any build/load failure means "fall back"
                    _state["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
                    logger.warning(
                        "qkv: could not build the compiled flash kernel (%s); "
                        "using the PyTorch-level loops instead",
                        _state["error"],
                    )
    return getattr(torch.ops, _NAME) if _state["ok"] else None


def available() -> bool:
    """True when the compiled kernel is built (building it now if needed) and loaded."""
    return load() is not None


def build_error() -> str | None:
    """Why the kernel is unavailable (None when it loaded or was not tried yet)."""
    return _state["error"]


def build_seconds() -> float | None:
    """Seconds the first :func:`load` in this process took (build or cache hit)."""
    return _state["seconds"]


def _ops() -> Any:
    ops = load()
    if ops is None:
        raise RuntimeError(f"qkv compiled flash kernel unavailable: {build_error()}")
    return ops


def vec_width() -> int:
    """Floats per ``at::vec::Vectorized<float>`` inside the built module (16 with AVX512)."""
    return int(_ops().vec_width())


def blas_info() -> str:
    """Which GEMM entry points the module found (``sgemm_``, MKL's 16-bit CBLAS, ...)."""
    return str(_ops().blas_info())


# --------------------------------------------------------------------------- ops


def _band(value: float | int | None, lower: bool) -> int:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return -UNBOUNDED if lower else UNBOUNDED
    return max(-UNBOUNDED, min(UNBOUNDED, int(value)))


def _last_contig(x: Tensor) -> Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _default_half_dot(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return has_bf16_dot()
    if dtype == torch.float16:
        return has_fp16_dot()
    return False


def _backward_half_dot(dtype: torch.dtype) -> bool:
    """Whether the backward multiplies 16-bit inputs in 16 bits (float accumulation).

    bfloat16: wherever the CPU has bf16 dot products (avx512_bf16 / AMX-BF16 both
    accumulate bf16 pairs into float32). float16: only with AMX-FP16; avx512_fp16 has no
    float16 -> float32 dot instruction, so a float-accumulating GEMM there converts to
    float32 internally and gains nothing over converting once up front.
    """
    if dtype == torch.bfloat16:
        return has_bf16_dot()
    if dtype == torch.float16:
        return "amx_fp16" in cpu_flags()
    return False


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    lo: int | float | None = None,
    hi: int | float | None = None,
    scale: float | None = None,
    need_lse: bool = True,
    *,
    half_dot: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attention forward: ``(out, lse)``.

    Args:
        q: (B, H, L, d_k); k: (B, H_kv, S, d_k); v: (B, H_kv, S, d_v); one dtype among
            float64/float32/bfloat16/float16, H % H_kv == 0 (query head h reads key/value
            head h // (H // H_kv)).
        mask: None, or bool (True = may attend) / float (added in float32, float64 for
            float64 inputs) already expanded to (B, H, L, S); zero strides are fine.
        lo, hi: the band (see the module docstring); None = unbounded.
        scale: multiplies q·k (default 1/sqrt(d_k)).
        need_lse: False skips the log-sum-exp (returned as None).
        half_dot: 16-bit inputs multiply in 16 bits through the BLAS (default: only when
            the CPU has bf16/fp16 dot-product instructions); False converts to float32.

    Returns:
        out (B, H, L, d_v) in q's dtype; lse (B, H, L) float32 (float64 for float64
        inputs), -inf for rows with no allowed key (their out row is 0), or None.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if half_dot is None:
        half_dot = _default_half_dot(q.dtype)
    out, lse = _ops().forward(
        _last_contig(q),
        _last_contig(k),
        _last_contig(v),
        mask,
        _band(lo, True),
        _band(hi, False),
        float(scale),
        bool(need_lse),
        bool(half_dot),
    )
    return out, (lse if need_lse else None)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    mask: Tensor | None = None,
    lo: int | float | None = None,
    hi: int | float | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward: ``(dq, dk, dv)`` in the input dtypes.

    Shapes as in :func:`forward`; out, dout (B, H, L, d_v); lse (B, H, L) from the
    forward. Accumulates in float32 (float64 for float64); 16-bit inputs multiply in
    16 bits (P and dS rounded to the input dtype) where the CPU has float-accumulating
    dot instructions for them (see ``_backward_half_dot``), else in float32. Deterministic: the same inputs and thread count give
    bitwise the same gradients. A float mask gets no gradient.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return tuple(
        _ops().backward(
            _last_contig(q),
            _last_contig(k),
            _last_contig(v),
            _last_contig(out),
            _last_contig(dout),
            lse,
            mask,
            _band(lo, True),
            _band(hi, False),
            float(scale),
            _backward_half_dot(q.dtype),
        )
    )


def weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    mask: Tensor | None = None,
    lo: int | float | None = None,
    hi: int | float | None = None,
    scale: float | None = None,
    rows: Tensor | None = None,
    average_heads: bool = False,
) -> Tensor:
    """Exact softmax weights: (B, H, R, S), or (B, R, S) averaged over heads.

    q (B, H, L, d_k), k (B, H_kv, S, d_k), lse (B, H, L) from :func:`forward`; rows: a
    LongTensor of R query indices (None: all L). float32 (float64 for float64 inputs);
    each row is renormalised by its own accurately computed sum; empty rows are zeros.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _ops().weights(
        _last_contig(q),
        _last_contig(k),
        lse,
        mask,
        _band(lo, True),
        _band(hi, False),
        float(scale),
        rows,
        bool(average_heads),
    )
