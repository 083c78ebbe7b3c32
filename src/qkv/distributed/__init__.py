"""Context parallelism: attention over sequences split across processes (ring attention).

Shape legend: B batch · H query heads · H_kv key/value heads · L query length ·
S key/value length · d_k query/key width · d_v value width · W ranks in the group.

* :func:`ring_attention` — each rank holds a shard of the queries and keys/values along
  the sequence; key/value blocks travel around the ring and the partial outputs merge
  exactly by log-sum-exp (:mod:`.ring`). Differentiable; memory linear in the shard.
* :func:`shard_sequence` / :func:`gather_sequence` — cut a full tensor into this
  rank's shard and put the shards back together, in the ``"contiguous"`` or the
  causal-balanced ``"zigzag"`` layout (:mod:`.layout`).
* :func:`context_parallel` — a ``with`` block in which qkv's
  :class:`~qkv.MultiHeadAttention` self-attention layers run :func:`ring_attention`
  (:mod:`.context`), which is how ``qkv train --context-parallel N`` trains.

See ``docs/distributed.md`` for usage, exactness and the bandwidth formula.
"""

from .context import ContextParallel, context_parallel, current_context_parallel
from .layout import LAYOUTS, gather_sequence, segments, shard_sequence
from .ring import RingTimings, ring_attention, ring_timings

__all__ = [
    "LAYOUTS",
    "ContextParallel",
    "RingTimings",
    "context_parallel",
    "current_context_parallel",
    "gather_sequence",
    "ring_attention",
    "ring_timings",
    "segments",
    "shard_sequence",
]
