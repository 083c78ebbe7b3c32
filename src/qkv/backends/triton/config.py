"""Block sizes the Triton kernels are autotuned over, per head width.

Shape legend: L query length · S key/value length · d_k query/key width · d_v value width.

A tile is ``BLOCK_M`` queries by ``BLOCK_N`` keys. Wider heads need more registers
and shared memory per row, so the candidates shrink as the head width grows; the
autotuner times the candidates that fit (``prune``) on the first call for each
(head widths, lengths, mask kind, dtype) and reuses the winner.

Under ``TRITON_INTERPRET=1`` (CPU tests) one small tile (16 x 16) is used and nothing is
timed: tests then cover several full and partial tiles with short sequences.

This module imports Triton only inside the functions that build ``triton.Config``
objects, so reading the tables costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["TileConfig", "autotuning", "interpreting", "padded_width", "prune", "tile_configs"]


@dataclass(frozen=True)
class TileConfig:
    """One autotuning candidate.

    Attributes:
        block_m: queries per tile (a power of two >= 16, as ``tl.dot`` needs).
        block_n: keys per tile (same rule).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the loads in the inner loop.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def _t(block_m: int, block_n: int, num_warps: int, num_stages: int) -> TileConfig:
    return TileConfig(block_m, block_n, num_warps, num_stages)


# Candidates by kernel and by the widest padded head width they serve. The forward
# and dQ kernels keep a block of queries resident and stream keys, so they favour
# tall tiles (large BLOCK_M); the dK/dV kernel keeps keys resident and streams
# queries, so it favours wide ones (large BLOCK_N). Chosen for Hopper (sm_90, 227 KiB
# of shared memory per block): every candidate below builds for sm_90 without
# spilling registers (``benchmarks/triton_gpu.py --compile-report``), except the
# dK/dV tiles for width 256, where only tiles too small for wgmma avoid it and both
# kinds are offered. Which is fastest is the autotuner's call, on the GPU.
_TABLES: dict[str, dict[int, tuple[TileConfig, ...]]] = {
    "fwd": {
        64: (_t(128, 64, 4, 3), _t(128, 128, 8, 3), _t(128, 64, 8, 4), _t(64, 64, 4, 3)),
        128: (_t(128, 64, 8, 3), _t(128, 128, 8, 3), _t(128, 32, 4, 3), _t(64, 64, 4, 3)),
        256: (_t(64, 32, 4, 2), _t(64, 64, 8, 2), _t(128, 32, 8, 2), _t(32, 32, 4, 2)),
    },
    "dkdv": {
        64: (_t(32, 128, 8, 2), _t(32, 128, 8, 3), _t(64, 128, 8, 2), _t(64, 64, 8, 3)),
        128: (_t(32, 128, 8, 2), _t(16, 128, 8, 2), _t(32, 64, 8, 2), _t(64, 64, 8, 2)),
        256: (_t(16, 64, 8, 2), _t(32, 64, 8, 2), _t(32, 32, 8, 2), _t(16, 32, 8, 2)),
    },
    "dq": {
        64: (_t(128, 64, 8, 3), _t(128, 32, 4, 3), _t(64, 64, 4, 3), _t(128, 128, 8, 2)),
        128: (_t(128, 64, 8, 2), _t(128, 64, 8, 3), _t(128, 32, 8, 3), _t(64, 64, 4, 3)),
        256: (_t(64, 32, 4, 2), _t(64, 64, 8, 2), _t(128, 32, 8, 2), _t(64, 16, 4, 2)),
    },
}

#: The single tile used under the interpreter.
INTERPRETER_TILE = _t(16, 16, 1, 1)


def autotuning() -> bool:
    """Whether to time the candidates (default) or take the first one for the width.

    ``QKV_TRITON_AUTOTUNE=0`` skips the timing: one build per kernel variant instead
    of four, for test runs that compile many shape/mask variants once each.
    """
    return os.environ.get("QKV_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off")


def interpreting() -> bool:
    """Whether Triton will run kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def padded_width(d: int) -> int:
    """Head width rounded up to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def _table(kernel: str, width: int) -> tuple[TileConfig, ...]:
    table = _TABLES[kernel]
    for limit in sorted(table):
        if width <= limit:
            return table[limit]
    raise ValueError(f"no tile configs for padded head width {width} (at most 256)")


def tile_configs(kernel: str) -> list:
    """All candidate ``triton.Config`` objects for ``kernel`` in ``("fwd", "dkdv", "dq")``.

    The autotuner keeps only those for the call's head width (see :func:`prune`).
    """
    import triton  # deferred: importing qkv must not import Triton

    if kernel not in _TABLES:
        raise ValueError(f"kernel must be one of {sorted(_TABLES)}, got {kernel!r}")
    if interpreting():
        tiles = [INTERPRETER_TILE]
    else:
        tiles = list(dict.fromkeys(t for group in _TABLES[kernel].values() for t in group))
    return [
        triton.Config(
            {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n},
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        for t in tiles
    ]


def prune(kernel: str):
    """An ``early_config_prune`` hook: keep the candidates for this call's head width.

    Tiles taller than the (power-of-two rounded) sequence they cover are dropped too,
    so short sequences (decoding, L = 1) do not pay for 128-row tiles; at least the
    smallest candidate always remains.
    """

    def hook(configs, named_args, **kwargs):
        if interpreting():
            return configs[:1]
        # Triton passes positional arguments in named_args, keyword ones in kwargs.
        args = {**named_args, **kwargs}
        width = max(args["BLOCK_DK"], args["BLOCK_DV"])
        order = {t: i for i, t in enumerate(_table(kernel, width))}  # the table's order
        tile = lambda c: _t(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
        keep = sorted((c for c in configs if tile(c) in order), key=lambda c: order[tile(c)])
        # Outer tile (the resident one) no taller than the rounded outer length.
        outer = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
        outer_len = args["TUNE_S"] if kernel == "dkdv" else args["TUNE_L"]
        short = [c for c in keep if c.kwargs[outer] <= max(16, outer_len)]
        if not short:
            short = [min(keep, key=lambda c: c.kwargs[outer])]
        return short if autotuning() else short[:1]

    return hook
