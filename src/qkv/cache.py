"""KV cache for incremental decoding.

During generation each new token only needs its own query; the keys and values of
earlier tokens do not change, so they are kept instead of recomputed. Feeding
tokens one at a time through a causal layer with a cache gives the same outputs as
one causal pass over the whole sequence (bottom-right causal alignment makes the
L new queries line up with the last L of the S cached keys).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C

__all__ = ["KVCache"]


class KVCache:
    """Keys ``(B, H_kv, S, d_k)`` and values ``(B, H_kv, S, d_v)`` of one attention layer.

    The first :meth:`update` fixes B, H_kv, d_k, d_v, dtype and device; later updates
    must match them. Storage grows by doubling, so appending is amortised O(1) copies.

    Args:
        max_length: optional cap on S; exceeding it raises ``ValueError``.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = C.check_positive_int("max_length", max_length, allow_none=True)
        self._k: Tensor | None = None  # (B, H_kv, capacity, d_k)
        self._v: Tensor | None = None  # (B, H_kv, capacity, d_v)
        self._length = 0
        self._pending: int | None = None  # length after a staged, uncommitted update

    def __len__(self) -> int:
        return self._length

    @property
    def keys(self) -> Tensor | None:
        """Cached keys ``(B, H_kv, S, d_k)`` (a view), or ``None`` before the first update."""
        return None if self._k is None else self._k[:, :, : self._length]

    @property
    def values(self) -> Tensor | None:
        """Cached values ``(B, H_kv, S, d_v)`` (a view), or ``None`` before the first update."""
        return None if self._v is None else self._v[:, :, : self._length]

    def reset(self) -> None:
        self._k = self._v = None
        self._length = 0
        self._pending = None

    def _check(self, k: Tensor, v: Tensor) -> None:
        k = C.check_float_tensor("k", k)
        v = C.check_float_tensor("v", v)
        C.check_same_dtype_device(k=k, v=v)
        if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"cache update needs k (B, H_kv, S_new, d_k) and v (B, H_kv, S_new, d_v) "
                f"with equal B, H_kv, S_new; got k {C.shape(k)}, v {C.shape(v)}"
            )
        if self._k is None:
            return
        want_k = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
        want_v = (self._v.shape[0], self._v.shape[1], self._v.shape[3])
        got_k = (k.shape[0], k.shape[1], k.shape[3])
        got_v = (v.shape[0], v.shape[1], v.shape[3])
        if got_k != want_k or got_v != want_v:
            raise ValueError(
                f"cache holds (B, H_kv, d_k)={want_k} and d_v={want_v[2]}, but the update has "
                f"k {C.shape(k)} and v {C.shape(v)}; use one cache per layer and batch"
            )
        if k.dtype != self._k.dtype or k.device != self._k.device:
            raise TypeError(
                f"cache holds {self._k.dtype} on {self._k.device}, update is {k.dtype} on {k.device}"
            )

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``S_new`` positions; return all keys and values so far (views).

        Args:
            k: ``(B, H_kv, S_new, d_k)``; v: ``(B, H_kv, S_new, d_v)``.
        Returns:
            ``(keys, values)`` of shapes ``(B, H_kv, S, d_k)``, ``(B, H_kv, S, d_v)``.
        """
        keys, values = self.stage(k, v)
        self.commit()
        return keys, values

    def stage(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`update`, but the new positions only count after :meth:`commit`.

        A layer stages its new keys, runs attention, and commits only when attention
        succeeded: a call refused half-way (a bad argument, a backend that cannot serve
        it) leaves the cache exactly as it was. The new rows are written past the
        committed length, where nothing reads them until the commit.
        """
        self._check(k, v)
        new_len = self._length + k.shape[2]
        if self.max_length is not None and new_len > self.max_length:
            raise ValueError(
                f"cache max_length={self.max_length} exceeded: {self._length} cached + "
                f"{k.shape[2]} new positions"
            )
        capacity = 0 if self._k is None else self._k.shape[2]
        if new_len > capacity:
            capacity = max(new_len, 2 * capacity, 16)
            if self.max_length is not None:
                capacity = min(capacity, self.max_length)
            self._k = self._grow(self._k, k, capacity)
            self._v = self._grow(self._v, v, capacity)
        # The cache stores a copy detached from autograd: decoding is inference.
        self._k[:, :, self._length : new_len] = k.detach()
        self._v[:, :, self._length : new_len] = v.detach()
        self._pending = new_len
        return self._k[:, :, :new_len], self._v[:, :, :new_len]

    def commit(self) -> None:
        """Make the positions of the last :meth:`stage` part of the cache."""
        if self._pending is None:
            raise RuntimeError("KVCache.commit() without a staged update")  # caller bug
        self._length, self._pending = self._pending, None

    def _grow(self, old: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        B, H_kv, _, d = like.shape
        new = torch.empty(B, H_kv, capacity, d, dtype=like.dtype, device=like.device)
        if old is not None:
            new[:, :, : self._length] = old[:, :, : self._length]
        return new

    def __repr__(self) -> str:
        shape = None if self._k is None else C.shape(self.keys)
        return f"KVCache(length={self._length}, keys={shape}, max_length={self.max_length})"
