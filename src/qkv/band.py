"""The causal / sliding-window band: defined once, read by every mask builder and kernel.

Shape legend: L query length · S key/value length.

Queries and keys are aligned at the **bottom-right** corner: query ``i`` sits on key
``i + (S - L)``, so the last query meets the last key (what decoding with a cache needs).
A band keeps the keys whose offset from that aligned position lies in ``[lo, hi]``::

    diff(i, j) = j - (i + S - L)          key j is allowed for query i  iff  lo <= diff <= hi

    causal                 Band(lo=None, hi=0)         L = 3, S = 5      keys 0 1 2 3 4
    causal window w        Band(lo=-(w-1), hi=0)       causal:   query 0     x x x . .
    two-sided window w     Band(lo=-(w-1), hi=w-1)               query 1     x x x x .
                                                                 query 2     x x x x x
                                                       window 2: query 0     . . x . .
                                                       (causal)  query 1     . . . x .
                                                                 query 2     . . . . x

``None`` means unbounded on that side. The reference materialises the band with
:meth:`Band.allowed`; tiled kernels ask :meth:`Band.key_range` which keys a block of
queries can see (tiles outside are skipped) and test elements only in tiles the band's
edges cut; the compiled kernel and the Triton launcher receive ``lo``/``hi`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Band"]


@dataclass(frozen=True)
class Band:
    """Keys ``j`` allowed for query ``i``: ``lo <= j - (i + S - L) <= hi`` (None: unbounded)."""

    lo: int | None = None
    hi: int | None = None

    def __post_init__(self) -> None:
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"Band.{name} must be an int or None, got {value!r}")
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise ValueError(f"Band.lo={self.lo} must not exceed Band.hi={self.hi}")

    @classmethod
    def from_flags(cls, causal: bool, window: int | None) -> Band | None:
        """The band of ``is_causal`` / ``window`` as the API takes them (None: no band).

        With ``causal`` each query sees itself and the ``window - 1`` keys before it;
        without, the keys at distance less than ``window`` on either side.
        """
        if window is None:
            return cls(None, 0) if causal else None
        return cls(-(window - 1), 0 if causal else window - 1)

    # The API's two flags, recovered (the Triton kernels take them in this form).
    @property
    def causal(self) -> bool:
        return self.hi == 0

    @property
    def window(self) -> int | None:
        return None if self.lo is None else 1 - self.lo

    def allowed(self, L: int, S: int, device: torch.device | str | None = None) -> Tensor:
        """Boolean ``(L, S)``: True where query ``i`` may attend key ``j``."""
        diff = torch.arange(S, device=device) - (torch.arange(L, device=device) + (S - L))[:, None]
        ok = torch.ones(L, S, dtype=torch.bool, device=device)
        if self.lo is not None:
            ok &= diff >= self.lo
        if self.hi is not None:
            ok &= diff <= self.hi
        return ok

    def key_range(self, i0: int, i1: int, L: int, S: int) -> tuple[int, int]:
        """Keys ``[jlo, jhi)`` that some query in ``[i0, i1)`` may see (empty if jlo >= jhi)."""
        offset = S - L
        jlo = 0 if self.lo is None else max(0, i0 + offset + self.lo)
        jhi = S if self.hi is None else min(S, i1 - 1 + offset + self.hi + 1)
        return jlo, jhi

    def cuts(self, i0: int, i1: int, j0: int, j1: int, L: int, S: int) -> bool:
        """Whether the band's edge passes through the tile queries ``[i0, i1)`` x keys
        ``[j0, j1)`` (False: the tile is wholly inside, no element needs testing)."""
        offset = S - L
        dmin, dmax = j0 - (i1 - 1) - offset, (j1 - 1) - i0 - offset
        return (self.lo is not None and dmin < self.lo) or (self.hi is not None and dmax > self.hi)
