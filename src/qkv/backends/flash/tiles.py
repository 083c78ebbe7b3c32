"""Tiling for the ``"flash"`` backend: which (query block, key block) tiles to compute, and
the mask of each tile, sliced from the caller's tensors without expanding them.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · g = H // H_kv.

Inside the kernels every tensor is flattened to ``N = (batch size) * H_kv`` independent
problems, and the ``g`` query heads that share a key/value head are stacked as rows::

    q (..., H, L, d_k)  ->  (N, g, L, d_k)   rows of one tile: (h, g * bq, d_k)
    k (..., H_kv, S, d_k) -> (N, S, d_k)     so one matmul serves a whole group

A tile covers ``h`` key/value heads of one batch element ``b``. Its scores ``s`` are
``(h, g * bq, bk)``; viewed as ``(h, g, bq, bk)`` they broadcast against the user mask
viewed as ``(..., H_kv | 1, g | 1, L | 1, S)`` and indexed at ``b`` (0 where broadcast).

Causal and sliding-window masks are bands on ``diff = key - (query + S - L)`` (bottom-right
alignment): a key is allowed iff ``lo <= diff <= hi``. Tiles outside the band are never
visited; tiles inside it get no structural mask at all; only tiles crossing its edges
build a small ``(bq, bk)`` boolean mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..request import AttentionRequest

__all__ = ["Tiling"]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class KeyBlock:
    """Keys ``[j0, j1)`` of one tile; ``band`` says whether the structural mask cuts it."""

    j0: int
    j1: int
    band: bool


class Tiling:
    """The tile plan of one request (shared by forward, backward and weights).

    Args:
        request: the validated request.
        block_q: query rows per tile (per head).
        block_k: keys per tile.
        heads: key/value heads per tile (each brings its ``g`` query heads).
        threads: how many threads work through the tiles (1: the calling thread).
    """

    def __init__(
        self,
        request: AttentionRequest,
        block_q: int,
        block_k: int,
        heads: int = 1,
        threads: int = 1,
    ) -> None:
        r = request
        self.batch_shape = r.batch_shape
        self.H_kv, self.g = r.H_kv, r.group
        self.L, self.S = r.L, r.S
        self.N = math.prod(self.batch_shape) * self.H_kv
        self.block_q, self.block_k = block_q, block_k
        self.heads, self.threads = min(heads, self.H_kv), threads
        self.device = r.device
        # The band (qkv.Band): allowed iff lo <= key - query - (S - L) <= hi.
        band = r.band
        self.band = band
        self.offset = r.S - r.L
        self.lo = -math.inf if band is None or band.lo is None else band.lo
        self.hi = math.inf if band is None or band.hi is None else band.hi
        self.mask = self._mask_view(r)
        self._band_cache: dict[tuple[int, int, int], Tensor] = {}

    # ------------------------------------------------------------------ the user mask
    def _mask_view(self, r: AttentionRequest) -> Tensor | None:
        """The user mask as ``(..., H_kv | 1, g | 1, L | 1, S)``: a view, never a copy."""
        m = r.user_mask()  # the caller's mask and key padding; the band stays structured
        if m is None:
            return None
        full_ndim = len(self.batch_shape) + 3
        m = m.reshape((1,) * (full_ndim - m.ndim) + tuple(m.shape))  # (..., H|1, L|1, S)
        if m.shape[-3] == 1:
            return m.unsqueeze(-3)  # (..., 1, 1, L|1, S)
        return m.unflatten(-3, (self.H_kv, self.g))  # (..., H_kv, g, L|1, S)

    def batch_index(self, b: int) -> tuple[int, ...]:
        """Flat batch index ``b`` -> index into the mask's batch dims (0 where broadcast)."""
        index = []
        for size, msize in zip(
            reversed(self.batch_shape), reversed(self.mask.shape[:-4]), strict=True
        ):
            b, i = divmod(b, size)
            index.append(i if msize > 1 else 0)
        return tuple(reversed(index))

    def mask_tile(
        self, b: int, heads: slice, rows: slice | Tensor, j0: int, j1: int
    ) -> Tensor | None:
        """The user mask for batch element ``b``, key/value ``heads``, query ``rows`` and keys
        ``[j0, j1)``: a view ``(h | 1, g | 1, bq | 1, bk)`` of the caller's tensor."""
        m = self.mask
        if m is None:
            return None
        m = m[self.batch_index(b)][..., j0:j1]  # (H_kv | 1, g | 1, L | 1, bk)
        if m.shape[0] != 1:
            m = m[heads]
        if m.shape[-2] != 1:  # chosen rows (weights) are gathered: a copy of bq x bk only
            m = m[..., rows, :] if isinstance(rows, slice) else m.index_select(-2, rows)
        return m

    # ------------------------------------------------------------ the structural band
    @property
    def has_band(self) -> bool:
        return self.lo > -math.inf or self.hi < math.inf

    def key_range(self, i0: int, i1: int) -> tuple[int, int]:
        """Keys ``[jlo, jhi)`` that some query in ``[i0, i1)`` may see (empty: jlo >= jhi)."""
        if self.band is None:
            return 0, self.S
        return self.band.key_range(i0, i1, self.L, self.S)

    def key_blocks(self, i0: int, i1: int) -> list[KeyBlock]:
        """Key tiles for queries ``[i0, i1)``: ``block_k`` keys each, from where the band
        starts to where it ends; ``band`` marks the tiles that the band's edges cut."""
        jlo, jhi = self.key_range(i0, i1)
        blocks = []
        for j0 in range(jlo, jhi, self.block_k):
            j1 = min(j0 + self.block_k, jhi)
            cut = self.band is not None and self.band.cuts(i0, i1, j0, j1, self.L, self.S)
            blocks.append(KeyBlock(j0, j1, band=cut))
        return blocks

    def query_blocks(self) -> Iterator[tuple[int, int]]:
        """Query blocks ``[i0, i1)`` that see at least one key."""
        for i0 in range(0, self.L, self.block_q):
            i1 = min(i0 + self.block_q, self.L)
            jlo, jhi = self.key_range(i0, i1)
            if jlo < jhi:
                yield i0, i1

    def query_blocks_by_cost(self) -> list[tuple[int, int]]:
        """:meth:`query_blocks`, most keys first, so threads finish together (causal)."""

        def keys(block: tuple[int, int]) -> int:
            jlo, jhi = self.key_range(*block)
            return jhi - jlo

        return sorted(self.query_blocks(), key=keys, reverse=True)

    def band_blocked(self, rows: slice | Tensor, j0: int, j1: int) -> Tensor:
        """Boolean ``(bq, bk)``: True where the band forbids query ``rows`` x keys ``[j0, j1)``."""
        key = None
        if isinstance(rows, slice):
            # The pattern depends only on the tile's size and its distance to the diagonal.
            key = (rows.stop - rows.start, j1 - j0, j0 - rows.start)
            if key in self._band_cache:
                return self._band_cache[key]
            rows = torch.arange(rows.start, rows.stop, device=self.device)
        diff = torch.arange(j0, j1, device=self.device) - (rows + self.offset).unsqueeze(-1)
        blocked = torch.zeros(diff.shape, dtype=torch.bool, device=self.device)
        if self.lo > -math.inf:
            blocked |= diff < self.lo
        if self.hi < math.inf:
            blocked |= diff > self.hi
        if key is not None:
            self._band_cache[key] = blocked
        return blocked

    # ------------------------------------------------------------------ apply a tile
    def apply_masks(
        self,
        s: Tensor,
        b: int,
        heads: slice,
        rows: slice | Tensor,
        j0: int,
        j1: int,
        band: bool,
    ) -> bool:
        """Mask the scores of one tile in place: ``s`` is ``(h, g * bq, bk)`` (float) for
        batch element ``b``, key/value ``heads``, query ``rows`` and keys ``[j0, j1)``.

        Returns whether anything was masked (so the caller checks for empty rows).
        """
        user = self.mask_tile(b, heads, rows, j0, j1)
        if user is None and not band:
            return False
        s4 = s.view(s.shape[0], self.g, -1, j1 - j0)  # (h, g, bq, bk)
        if user is not None:
            if user.dtype == torch.bool:
                s4.masked_fill_(user.logical_not(), _NEG_INF)
            else:
                s4.add_(user.to(s.dtype))
        if band:
            s4.masked_fill_(self.band_blocked(rows, j0, j1), _NEG_INF)
        return True
