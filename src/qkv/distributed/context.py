"""Run qkv's attention modules over a sharded sequence: ``with context_parallel(...):``.

Shape legend: B batch · H query heads · L query length · S key/value length ·
d_model embedding width.

Inside the block, every :class:`qkv.MultiHeadAttention` call that is plain
self-attention (no ``key``/``value`` of its own, no mask tensor, no cache, no weights,
no dropout) treats its input ``(B, L, d_model)`` as this rank's shard of a longer
sequence and attends with :func:`~qkv.distributed.ring_attention` over ``group`` in
``layout``, with the layer's own ``causal`` flag. Anything else inside the block raises
ValueError rather than attending to the local shard only (which would be silently wrong).

The rest of the model must be told the shard's global positions (position
embeddings) and the loss must be summed across the group; ``qkv train
--context-parallel N`` does both (see :mod:`qkv.train.trainer`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from .layout import check_layout

__all__ = ["ContextParallel", "context_parallel", "current_context_parallel"]


@dataclass(frozen=True)
class ContextParallel:
    """Where a sharded sequence lives: the ring's ``group`` (None: the whole world) and
    the ``layout`` of its shards (``"contiguous"`` or ``"zigzag"``)."""

    group: dist.ProcessGroup | None = None
    layout: str = "contiguous"

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise TypeError(
                f"ContextParallel.group must be a torch.distributed ProcessGroup or None, "
                f"got {type(self.group).__name__}"
            )


_ACTIVE: contextvars.ContextVar[ContextParallel | None] = contextvars.ContextVar(
    "qkv_context_parallel", default=None
)


def current_context_parallel() -> ContextParallel | None:
    """The innermost active :func:`context_parallel` setting, or None outside one."""
    return _ACTIVE.get()


@contextlib.contextmanager
def context_parallel(
    group: dist.ProcessGroup | None = None, layout: str = "contiguous"
) -> Iterator[ContextParallel]:
    """Inside this block, qkv's self-attention modules run ring attention over ``group``."""
    setting = ContextParallel(group, layout)
    token = _ACTIVE.set(setting)
    try:
        yield setting
    finally:
        _ACTIVE.reset(token)
