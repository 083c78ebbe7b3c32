"""Ring attention: exact attention over a sequence split across the ranks of a group.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · W ranks in the group.
``L`` and ``S`` below are a rank's *shard* lengths; the global lengths are ``W L``, ``W S``.

Each rank keeps its queries and passes its key/value block around the ring: in step
``t`` rank ``r`` holds the block of rank ``r - t`` (mod W), starts sending it on to
``r + 1`` (``batch_isend_irecv``), attends to it while it travels, and merges the
partial result into its running output by the log-sum-exp rule::

    lse = logaddexp(lse_run, lse_blk)
    out = out_run * exp(lse_run - lse) + out_blk * exp(lse_blk - lse)

After W steps every query has met every key exactly once: the output is the exact
softmax attention, not an approximation. Memory per rank holds the shard, two
key/value blocks (the one in use and the one arriving) and no L x S matrix beyond one
tile of the local kernel.

**Backward** is a second ring. The key/value blocks travel again, and with each block
travels its dK/dV accumulator: rank ``r`` adds its queries' share of the block's
gradient (:func:`.blocks.backward`, from the global ``out`` and ``lse`` saved by the
forward) and passes block and accumulator on; after W steps the accumulator has
visited every rank and one last hop brings it home to the block's owner. dQ stays
local. So ``loss.backward()`` through :func:`ring_attention` gives the gradients of
single-process attention.

Communication per step and rank (bytes, ``e`` bytes per input element; see
``docs/distributed.md``): forward ``B H_kv S (d_k + d_v) e``; backward the same for
the block plus ``B H_kv S (d_k + d_v) a`` for the accumulator (``a`` = 4, or 8 for
float64 inputs). Half-precision blocks travel in half precision and are upcast to
float32 for the tile.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends.request import make_request
from ..band import Band
from . import blocks
from .layout import check_layout, group_rank_world, segments

__all__ = ["RingTimings", "ring_attention", "ring_timings"]


# --------------------------------------------------------------------------- timings


@dataclass
class RingTimings:
    """Where a rank's ring time went (seconds), summed over the calls inside
    :func:`ring_timings`: ``compute`` in the local kernels and merges, ``wait`` blocked
    on a transfer that had not finished yet, ``steps`` ring steps taken.

    Wall-clock on the host: on CUDA, kernels run asynchronously, so only CPU runs (or
    runs with ``CUDA_LAUNCH_BLOCKING=1``) split the time truthfully.
    """

    compute: float = 0.0
    wait: float = 0.0
    steps: int = 0
    _start: float = field(default=0.0, repr=False)


_TIMINGS: list[RingTimings] = []


@contextlib.contextmanager
def ring_timings() -> Iterator[RingTimings]:
    """Collect :class:`RingTimings` of the ring calls (forward and backward) in the block."""
    t = RingTimings()
    _TIMINGS.append(t)
    try:
        yield t
    finally:
        _TIMINGS.remove(t)


class _Clock:
    """Adds time to the active :class:`RingTimings` (a no-op when none is active)."""

    def __init__(self) -> None:
        self.t = _TIMINGS[-1] if _TIMINGS else None
        self.last = time.perf_counter()

    def lap(self, kind: str) -> None:
        if self.t is not None:
            now = time.perf_counter()
            setattr(self.t, kind, getattr(self.t, kind) + now - self.last)
            self.last = now


# --------------------------------------------------------------------------- the ring


class _Transfer:
    """Tensors on their way: sent to the next rank while the previous rank's arrive."""

    def __init__(self, ring: _Ring, tensors: list[Tensor], tag: int) -> None:
        self.sent = tensors  # kept alive until the sends complete
        self.received = [torch.empty_like(t) for t in tensors]
        ops = [
            dist.P2POp(dist.isend, t, ring.next, ring.group, tag + i) for i, t in enumerate(tensors)
        ] + [
            dist.P2POp(dist.irecv, t, ring.prev, ring.group, tag + i)
            for i, t in enumerate(self.received)
        ]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[Tensor]:
        for request in self.requests:
            request.wait()
        return self.received


@dataclass(frozen=True)
class _Ring:
    """The geometry of one call: who sends to whom, which positions each rank holds."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    layout: str
    band: Band | None
    scale: float
    L: int  # query shard length
    S: int  # key/value shard length

    @property
    def next(self) -> int:  # global ranks: what P2POp takes
        return self._global((self.rank + 1) % self.world)

    @property
    def prev(self) -> int:
        return self._global((self.rank - 1) % self.world)

    def _global(self, r: int) -> int:
        return dist.get_global_rank(dist.group.WORLD if self.group is None else self.group, r)

    def pairs(self, source: int) -> list[blocks.Pair]:
        """The tiles of this rank's queries x the key/value block of rank ``source``."""
        W = self.world
        return blocks.plan(
            segments(self.layout, self.rank, W, self.L),
            segments(self.layout, source, W, self.S),
            self.band,
            offset=W * (self.S - self.L),  # S_g - L_g: bottom-right alignment
        )

    def shift(self, tensors: list[Tensor], tag: int) -> _Transfer | None:
        return _Transfer(self, tensors, tag) if self.world > 1 else None


# P2P tags: key/value blocks and dK/dV accumulators are told apart even where both are
# in flight between the same two ranks (NCCL ignores tags and keeps the posting order).
_KV_TAG, _GRAD_TAG = 0, 2


def _merge(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """Fold one tile's ``(out_b, lse_b)`` into the running ``(out, lse)`` in place.

    out (B, H, L, d_v), lse (B, H, L). A row still without keys has lse = -inf on both
    sides: the shift by 0 keeps both factors exp(-inf) = 0, never NaN.
    """
    new = torch.logaddexp(lse, lse_b)  # (B, H, L)
    shift = new.masked_fill(new == float("-inf"), 0.0)
    out.mul_((lse - shift).exp_().unsqueeze(-1))
    out.add_(out_b * (lse_b - shift).exp_().unsqueeze(-1))
    lse.copy_(new)


def _rows(x: Tensor, rows: slice) -> Tensor:
    """Rows ``rows`` of (B, h, N, ...) as a contiguous tensor (what the kernels read)."""
    return x[:, :, rows].contiguous()


class _RingAttention(torch.autograd.Function):
    """Forward ring and backward ring; saves q, k, v, out and lse (all linear in length)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> Tensor:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, H, L, _ = q.shape
        qc = q.to(cdt)
        out = torch.zeros(B, H, L, v.shape[-1], dtype=cdt, device=q.device)  # (B, H, L, d_v)
        lse = torch.full((B, H, L), float("-inf"), dtype=cdt, device=q.device)  # (B, H, L)
        clock = _Clock()
        kv = [k.contiguous(), v.contiguous()]  # travels in the input dtype
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            arriving = ring.shift(kv, _KV_TAG) if step < ring.world - 1 else None
            kb, vb = (t.to(cdt) for t in kv)
            for pair in ring.pairs(source):
                out_b, lse_b = blocks.forward(
                    _rows(qc, pair.q), _rows(kb, pair.k), _rows(vb, pair.k), pair.band, ring.scale
                )
                _merge(out[:, :, pair.q], lse[:, :, pair.q], out_b, lse_b)
            clock.lap("compute")
            if arriving is not None:
                kv = arriving.wait()
                clock.lap("wait")
            if clock.t is not None:
                clock.t.steps += 1
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        ring: _Ring = ctx.ring
        q, k, v, out, lse = ctx.saved_tensors
        cdt = out.dtype
        qc, doutc = q.to(cdt), dout.to(cdt)
        dq = torch.zeros_like(qc)  # (B, H, L, d_k)
        clock = _Clock()
        kv = [k.contiguous(), v.contiguous()]
        coming: _Transfer | None = None  # the dK/dV accumulator of the block held next
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            arriving = ring.shift(kv, _KV_TAG) if step < ring.world - 1 else None
            kb, vb = (t.to(cdt) for t in kv)
            dk = torch.zeros(kb.shape, dtype=cdt, device=q.device)  # (B, H_kv, S, d_k)
            dv = torch.zeros(vb.shape, dtype=cdt, device=q.device)  # (B, H_kv, S, d_v)
            for pair in ring.pairs(source):
                dq_p, dk_p, dv_p = blocks.backward(
                    _rows(qc, pair.q),
                    _rows(kb, pair.k),
                    _rows(vb, pair.k),
                    _rows(out, pair.q),
                    _rows(doutc, pair.q),
                    lse[:, :, pair.q].contiguous(),
                    pair.band,
                    ring.scale,
                )
                dq[:, :, pair.q] += dq_p
                dk[:, :, pair.k] += dk_p
                dv[:, :, pair.k] += dv_p
            clock.lap("compute")
            if coming is not None:
                # What the ranks before this one added to the block's gradient.
                dk_in, dv_in = coming.wait()
                clock.lap("wait")
                dk += dk_in
                dv += dv_in
            # On to the next rank; after the last step that is the block's owner.
            coming = ring.shift([dk, dv], _GRAD_TAG)
            if arriving is not None:
                kv = arriving.wait()
                clock.lap("wait")
            if clock.t is not None:
                clock.t.steps += 1
        if coming is not None:
            dk, dv = coming.wait()  # this rank's own block, every rank's share summed
            clock.lap("wait")
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# --------------------------------------------------------------------------- the API


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
) -> Tensor:
    """Exact attention over a sequence sharded along dim -2 across the ranks of ``group``.

    Every rank calls it with its shard of the queries and of the keys/values, laid out
    as ``layout`` says (what :func:`qkv.distributed.shard_sequence` produces), and gets
    its shard of the output of ``qkv.scaled_dot_product_attention`` on the whole
    sequences. Differentiable: ``loss.backward()`` gives every rank the gradients of
    its shards.

    Args:
        q: this rank's queries ``(..., H, L, d_k)``; global length ``W L``.
        k: keys ``(..., H_kv, S, d_k)``; global length ``W S``.
        v: values ``(..., H_kv, S, d_v)``.
        is_causal: query ``i`` sees keys ``j <= i + (S_g - L_g)`` over **global**
            positions (bottom-right aligned, as everywhere in qkv; with ``L_g == S_g``
            the ordinary causal mask). Queries with no allowed key get output 0.
        window: sliding window over global positions (see :class:`qkv.Band`): with
            ``is_causal`` each query sees itself and the ``window - 1`` keys before it,
            without it the keys at distance ``< window`` on either side.
        scale: score multiplier, default ``1 / sqrt(d_k)``.
        enable_gqa: allow ``H`` to be a multiple of ``H_kv``; the ``H_kv`` heads travel
            (they are never repeated).
        group: the process group of the ring (default: the whole world); its size W.
        layout: ``"contiguous"`` or ``"zigzag"`` (see :mod:`qkv.distributed.layout`).

    Returns:
        ``(..., H, L, d_v)`` in q's dtype: this rank's shard of the output.

    Every rank must pass shards of the same shapes (not checked across ranks: that
    would cost a collective per call). float16/bfloat16 inputs travel as they are and
    are computed in float32, like qkv's ``"flash"`` backend.

    Raises:
        TypeError / ValueError: bad arguments (named), a zigzag shard of odd length,
            or no initialised process group.
    """
    # The local checks of qkv's own API: shapes, dtypes, heads, scale, window.
    request = make_request(
        q, k, v, is_causal=is_causal, window=window, scale=scale, enable_gqa=enable_gqa
    )
    layout = check_layout(layout)
    rank, world = group_rank_world(group)
    L, S = request.L, request.S
    if layout == "zigzag":
        for name, n in (("q", L), ("k", S)):
            if n % 2:
                raise ValueError(
                    f"{name} has shard length {n}; the zigzag layout puts two chunks of "
                    f"equal length on each rank, so shard lengths must be even (world "
                    f"size {world}, global length {world * n}: a multiple of {2 * world} "
                    f"is needed)"
                )
    ring = _Ring(group, rank, world, layout, request.band, request.scale, L, S)
    batch = request.batch_shape
    B = math.prod(batch)
    q4 = q.reshape(B, request.H, L, request.d_k)  # (B, H, L, d_k)
    k4 = k.reshape(B, request.H_kv, S, request.d_k)  # (B, H_kv, S, d_k)
    v4 = v.reshape(B, request.H_kv, S, request.d_v)  # (B, H_kv, S, d_v)
    out = _RingAttention.apply(q4, k4, v4, ring)  # (B, H, L, d_v)
    return out.reshape(*batch, request.H, L, request.d_v)
