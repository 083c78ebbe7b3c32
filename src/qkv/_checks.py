"""Input checks shared by the functional API and the modules.

User mistakes raise ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong
shape or value) with a message naming the argument and the shapes involved.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_has_data(**tensors: Tensor) -> None:
    """Refuse meta tensors (shapes without data), naming the argument.

    Called after the device checks, so mixing devices is reported as such first.
    """
    for name, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"{name} is a meta tensor (shape {shape(t)}, no data); pass real data")


def check_float_tensor(name: str, t: object) -> Tensor:
    t = check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype} "
            f"(shape {shape(t)}); convert it with .float()"
        )
    return t


def check_same_dtype_device(**tensors: Tensor) -> None:
    """All tensors share one dtype and one device."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(
                f"{name0} and {name} must share a dtype, got {name0}: {t0.dtype}, {name}: {t.dtype}"
            )
        if t.device != t0.device:
            raise ValueError(
                f"{name0} and {name} must be on one device, got {name0}: {t0.device}, "
                f"{name}: {t.device}"
            )


def check_scale(scale: object) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return scale


def check_dropout(name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {p}")
    return p


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_mask(name: str, mask: object, target: tuple[int, ...], device: torch.device) -> Tensor:
    """A mask must broadcast to ``target = (..., H, L, S)`` without stretching keys."""
    mask = check_tensor(name, mask)
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be bool (True = may attend) or float (added to scores), got "
            f"{mask.dtype}; for 0/1 integers use {name}.bool()"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the queries are on {device}")
    check_has_data(**{name: mask})
    L, S = target[-2], target[-1]
    ok = 2 <= mask.ndim <= len(target) and mask.shape[-1] == S and mask.shape[-2] in (1, L)
    if ok:
        try:
            ok = torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {shape(mask)} does not broadcast to (..., H, L, S) = {target}: "
            f"its last dimension must be S={S}, the one before it L={L} or 1, and leading "
            f"dimensions 1 or equal (for a (B, S) padding mask use qkv.masks.key_padding_mask)"
        )
    return mask


def check_index_list(name: str, value: object, size: int, size_name: str, device) -> Tensor:
    """A 1-D, non-empty sequence of integer indices into ``range(size)`` (negatives wrap).

    Accepts a tensor of integers or a list/tuple of ints; anything else, values out of
    range included, raises naming ``name``.
    """
    if isinstance(value, Tensor):
        rows = check_tensor(name, value)
    elif isinstance(value, (list, tuple, range)):
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in value):
            raise ValueError(
                f"{name} must be a 1-D sequence of query indices (integers), got "
                f"{list(value)[:8]!r}"
            )
        if any(not -size <= int(i) < size for i in value):
            raise ValueError(
                f"{name} must be indices in [0, {size_name}={size}), got {list(value)[:8]!r}"
            )
        rows = torch.tensor([int(i) for i in value], dtype=torch.long)
    else:
        raise TypeError(
            f"{name} must be a 1-D tensor or list of integer indices, got {type(value).__name__}"
        )
    if rows.ndim != 1 or rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D sequence of integer indices, got {rows.dtype} of shape "
            f"{shape(rows)}"
        )
    if rows.numel() == 0:
        raise ValueError(f"{name} is empty; pass at least one index in [0, {size_name}={size})")
    rows = rows.to(device)
    lo, hi = int(rows.min()), int(rows.max())
    if lo < -size or hi >= size:
        raise ValueError(
            f"{name} must be indices in [0, {size_name}={size}), got values from {lo} to {hi}"
        )
    return rows.long() % size


#: Allocations below this size are never refused up front (and cost no memory query).
_CHECK_MEMORY_FROM_BYTES = 64 << 20


def free_memory_if_short(nbytes: int, device: torch.device) -> int | None:
    """The bytes free on ``device`` when ``nbytes`` would not fit there, else None.

    Sizes under 64 MiB are not checked: refusing them could only ever be wrong, and the
    query (/proc/meminfo, cudaMemGetInfo) would cost time on every small call.
    """
    if nbytes < _CHECK_MEMORY_FROM_BYTES:
        return None
    free = available_memory(device)
    return free if free is not None and nbytes > free else None


def available_memory(device: torch.device) -> int | None:
    """Bytes that could still be allocated on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
