"""One ring step's local work: attention of this rank's queries to one key/value block.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width. Here ``L`` and ``S`` are
the lengths of one *piece* of a shard (see :mod:`.layout`), ``B`` is the flattened batch.

**The band over global positions.** qkv's band (:class:`qkv.Band`) keeps key ``j`` for
query ``i`` iff ``lo <= j - i - (S_g - L_g) <= hi`` over the *global* sequence
(bottom-right aligned). A query piece starting at global position ``qa`` and a key
piece starting at ``ka`` see the same band shifted: in the piece's own coordinates
(which the kernels align bottom-right too, at ``S - L``)::

    j_g - i_g - (S_g - L_g) = j - i - (S - L) + shift,   shift = ka - qa + (S - L) - (S_g - L_g)

so the kernels get ``Band(lo - shift, hi - shift)``. A pair of pieces that no allowed
(query, key) reaches is skipped entirely; a pair wholly inside the band gets no band.

**The kernels.** Forward returns ``(out, lse)`` of the pair; backward takes the
*global* ``out`` and ``lse`` (merged over every block of the ring) and returns the
pair's exact share of ``dq``, ``dk``, ``dv``: FlashAttention-2's backward rebuilds
``P = exp(s - lse)`` and uses ``D = rowsum(dO * O)``, both of which are global
quantities, so the per-block products are the true gradient's terms. Both run on
qkv's ``"flash"`` engine: the compiled CPU kernel where it is available and allowed
(:func:`qkv.backends.flash.flash_config` ``compiled=``, ``QKV_NO_COMPILE=1``), else
its PyTorch-level loops (any device). Inputs are float32 or float64.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..backends.flash import compiled, get_flash_config, tile_sizes
from ..backends.flash import loops as kernels
from ..backends.flash.tiles import Tiling
from ..backends.request import AttentionRequest
from ..band import Band

__all__ = ["Pair", "backward", "forward", "plan"]


@dataclass(frozen=True)
class Pair:
    """One (query piece, key piece) tile of a ring step.

    Attributes:
        q: rows of the local query shard (its second-to-last dim).
        k: rows of the key/value block.
        band: the band in the piece's own coordinates, or None when nothing is masked.
    """

    q: slice
    k: slice
    band: Band | None


def plan(
    q_segments: list[tuple[int, int]],
    k_segments: list[tuple[int, int]],
    band: Band | None,
    offset: int,
) -> list[Pair]:
    """The tiles of one ring step: every (query piece, key piece) that the band reaches.

    ``q_segments``/``k_segments``: global ``[start, stop)`` of the pieces of the query
    shard and of the key/value block, in shard order; ``offset = S_g - L_g``.
    """
    pairs = []
    q_row = 0
    for qa, qb in q_segments:
        k_row = 0
        for ka, kb in k_segments:
            rows, cols = slice(q_row, q_row + qb - qa), slice(k_row, k_row + kb - ka)
            k_row += kb - ka
            if band is None:
                pairs.append(Pair(rows, cols, None))
                continue
            # Global diff j - i - offset over the tile: from its corner nearest the
            # diagonal's lower side to the opposite one.
            dmin, dmax = ka - (qb - 1) - offset, (kb - 1) - qa - offset
            if (band.lo is not None and dmax < band.lo) or (band.hi is not None and dmin > band.hi):
                continue  # no query of this piece sees a key of that one
            shift = ka - qa + ((kb - ka) - (qb - qa)) - offset
            lo = None if band.lo is None or dmin >= band.lo else band.lo - shift
            hi = None if band.hi is None or dmax <= band.hi else band.hi - shift
            pairs.append(Pair(rows, cols, None if lo is None and hi is None else Band(lo, hi)))
        q_row += qb - qa
    return pairs


def _use_compiled(q: Tensor) -> bool:
    """The compiled kernel serves CPU tensors unless it is switched off or missing."""
    want = get_flash_config().compiled
    if want is False or q.device.type != "cpu":
        return False
    if compiled.available():
        return True
    if want:
        raise RuntimeError(f"the compiled flash kernel is unavailable: {compiled.build_error()}")
    return False  # compiled.load() logged why, once


def _tiling(q: Tensor, k: Tensor, v: Tensor, band: Band | None, scale: float) -> Tiling:
    request = AttentionRequest(q=q, k=k, v=v, band=band, scale=scale)
    return Tiling(request, *tile_sizes(request))


def _limits(band: Band | None) -> tuple[int | None, int | None]:
    return (None, None) if band is None else (band.lo, band.hi)


def forward(
    q: Tensor, k: Tensor, v: Tensor, band: Band | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of one tile: ``out`` (B, H, L, d_v) and ``lse`` (B, H, L), -inf for empty rows.

    q (B, H, L, d_k), k (B, H_kv, S, d_k), v (B, H_kv, S, d_v), all float32 or all float64.
    """
    if _use_compiled(q):
        out, lse = compiled.forward(q, k, v, None, *_limits(band), scale, need_lse=True)
        return out, lse
    return kernels.forward(_tiling(q, k, v, band, scale), q, k, v, scale, need_lse=True)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    band: Band | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """This tile's terms of ``(dq, dk, dv)``, given the global ``out``, ``dout`` and ``lse``.

    q (B, H, L, d_k) · k (B, H_kv, S, d_k) · v (B, H_kv, S, d_v) · out, dout (B, H, L, d_v)
    · lse (B, H, L); returns tensors shaped like q, k and v.
    """
    if _use_compiled(q):
        return compiled.backward(q, k, v, out, dout, lse, None, *_limits(band), scale)
    return kernels.backward(_tiling(q, k, v, band, scale), q, k, v, out, lse, dout, scale)
