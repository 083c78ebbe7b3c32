"""How a sequence is cut over the ranks of a process group, and put back together.

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · W ranks in the group.

Two layouts, both with the same shard length ``n = N / W`` on every rank::

    contiguous   rank r holds positions [r n, (r + 1) n)           N = 8, W = 2:
                                                                  rank 0: 0 1 2 3
                                                                  rank 1: 4 5 6 7
    zigzag       cut N into 2W chunks of c = n / 2; rank r holds  rank 0: 0 1 | 6 7
                 chunk r and chunk 2W - 1 - r, in that order       rank 1: 2 3 | 4 5

Under a causal mask the keys a rank's queries see grow with its position, so with
``contiguous`` the last rank does about W times the work of the first. ``zigzag``
pairs an early chunk with a late one, so every rank sees about the same number of
(query, key) pairs: the causal load is balanced.

A shard is described by its **segments**: the global ``[start, stop)`` of each piece,
in the order the pieces sit in the shard. :func:`segments` is the one definition that
:func:`shard_sequence`, :func:`gather_sequence` and the ring read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as C

__all__ = ["LAYOUTS", "gather_sequence", "segments", "shard_sequence"]

#: The layout names :func:`shard_sequence` and :func:`qkv.distributed.ring_attention` take.
LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    """``layout`` if it names a layout; else ValueError (TypeError for a non-string)."""
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string, one of {list(LAYOUTS)}, got {layout!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def pieces(layout: str) -> int:
    """Chunks per rank: 1 for ``contiguous``, 2 for ``zigzag``."""
    return 2 if layout == "zigzag" else 1


def segments(layout: str, rank: int, world: int, n: int) -> list[tuple[int, int]]:
    """Global ``[start, stop)`` of each piece of rank ``rank``'s shard of ``n`` positions.

    >>> segments("contiguous", 1, 2, 4)
    [(4, 8)]
    >>> segments("zigzag", 0, 2, 4)
    [(0, 2), (6, 8)]
    """
    if layout == "contiguous":
        return [(rank * n, (rank + 1) * n)]
    assert n % 2 == 0, "zigzag shards hold two chunks of equal length"  # checked by callers
    c = n // 2
    late = 2 * world - 1 - rank
    return [(rank * c, (rank + 1) * c), (late * c, (late + 1) * c)]


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size (default: the whole world)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group: no process group is initialised; call torch.distributed."
            "init_process_group first (torchrun sets up what it needs)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {group!r}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _check_dim(x: Tensor, dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim} is out of range for x of shape {C.shape(x)}")
    return dim % x.ndim


def check_divisible(name: str, length: int, world: int, layout: str) -> None:
    """Refuse a global length the layout cannot split into equal shards."""
    parts = world * pieces(layout)
    if length % parts:
        raise ValueError(
            f"{name} has length {length}, which the {layout!r} layout cannot split evenly "
            f"over world size {world}: it needs a multiple of {parts}"
            + (" (2 chunks per rank)" if layout == "zigzag" else "")
            + "; pad the sequence (e.g. with ignored positions at the end)"
        )


def shard_sequence(
    x: Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "contiguous"
) -> Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a new contiguous tensor).

    Every rank passes the same ``x``; the result has ``x.shape[dim] / W`` positions
    along ``dim``. Differentiable (it is slicing and concatenation).

    Raises:
        ValueError: the length along ``dim`` is not a multiple of ``W`` (``contiguous``)
            or of ``2 W`` (``zigzag``); no padding is invented.
    """
    x = C.check_tensor("x", x)
    d = _check_dim(x, dim)
    layout = check_layout(layout)
    rank, world = group_rank_world(group)
    N = x.shape[d]
    check_divisible("x", N, world, layout)
    parts = [x.narrow(d, a, b - a) for a, b in segments(layout, rank, world, N // world)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)).contiguous()


class _Gather(torch.autograd.Function):
    """all_gather along ``dim`` in layout order; backward sums the gradient over ranks."""

    @staticmethod
    def forward(ctx, x, dim, group, layout, rank, world):
        x = x.contiguous()
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x, group=group)
        n = x.shape[dim]
        # Each shard is cut back into its pieces and every piece goes to its place.
        placed: list[tuple[int, Tensor]] = []
        for r, shard in enumerate(shards):
            offset = 0
            for a, b in segments(layout, r, world, n):
                placed.append((a, shard.narrow(dim, offset, b - a)))
                offset += b - a
        ctx.dim, ctx.group, ctx.layout, ctx.rank, ctx.world, ctx.n = (
            dim,
            group,
            layout,
            rank,
            world,
            n,
        )
        return torch.cat([p for _, p in sorted(placed, key=lambda item: item[0])], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        # Every rank may have used the gathered tensor: the gradient of this rank's shard
        # is the sum of all ranks' gradients for its positions (torch.distributed.nn's
        # all_gather does the same). gloo has no reduce_scatter, so all-reduce and slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        parts = [
            grad.narrow(ctx.dim, a, b - a)
            for a, b in segments(ctx.layout, ctx.rank, ctx.world, ctx.n)
        ]
        mine = parts[0] if len(parts) == 1 else torch.cat(parts, dim=ctx.dim)
        return mine, None, None, None, None, None


def gather_sequence(
    x: Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "contiguous"
) -> Tensor:
    """The full tensor from every rank's shard ``x`` along ``dim`` (inverse of :func:`shard_sequence`).

    Every rank calls it with a shard of the same shape and gets the whole tensor
    (``W`` times as long along ``dim``), built with ``all_gather``.

    Differentiable: backward all-reduces the gradient of the gathered tensor (sum over
    ranks) and returns this rank's positions, so the gradient is that of the **sum of
    all ranks' losses**, as with ``torch.distributed.nn.functional.all_gather``. When
    every rank computes the same loss from the gathered tensor, its shard's gradient is
    therefore ``W`` times that loss's gradient: divide the loss by ``W``.
    """
    x = C.check_tensor("x", x)
    d = _check_dim(x, dim)
    layout = check_layout(layout)
    rank, world = group_rank_world(group)
    if layout == "zigzag" and x.shape[d] % 2:
        raise ValueError(
            f"x has shard length {x.shape[d]} along dim {dim}; a zigzag shard holds two "
            f"chunks of equal length, so it must be even (world size {world})"
        )
    return _Gather.apply(x, d, group, layout, rank, world)
