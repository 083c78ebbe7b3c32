"""Threads for the ``"flash"`` backend: independent tiles, one core each.

PyTorch splits every op across its intra-op threads and synchronises them when the op
ends. A tiled kernel issues many small ops per tile, so that scheme spends much of its
time waiting (and waits far longer when other processes share the cores). Here each
worker thread is set to run its own ops on one thread, and whole work items (a few heads
of one batch element x one query block) are handed out to the workers: the cores
synchronise once per call, as in PyTorch's own fused CPU kernel. PyTorch releases the
GIL inside every op, so the workers run in parallel.

:func:`run_items` runs items inline when one thread is asked for, so the same code
serves both cases (and any device).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["run_items"]

_lock = threading.Lock()
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _single_threaded() -> None:
    # Read the global thread count first (PyTorch initialises each thread's setting from
    # it lazily, once), then pin this worker to one thread: later changes of the global
    # value by the caller no longer reach it.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)  # a forked child gets its own threads
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            caller = torch.get_num_threads()
            pool = ThreadPoolExecutor(threads, "qkv-flash", initializer=_single_threaded)
            # Start every worker now (each waits until all have started) ...
            barrier = threading.Barrier(threads)
            list(pool.map(lambda _: barrier.wait(), range(threads)))
            # ... then restore the global setting that the workers' set_num_threads(1)
            # also changed, so that the caller and new threads keep their thread count.
            torch.set_num_threads(caller)
            _pools[key] = pool
        return pool


def _call(fn: Callable[..., None], item: Sequence[object]) -> None:
    with torch.no_grad():  # grad mode is per thread: workers start with it on
        fn(*item)


def run_items(fn: Callable[..., None], items: Sequence[Sequence[object]], threads: int) -> None:
    """Call ``fn(*item)`` for every item, on ``threads`` workers (inline when 1).

    Items must write disjoint outputs. They are started in the given order (put the
    most expensive first); the first exception raised by an item is re-raised here.
    """
    if threads <= 1 or len(items) <= 1:
        for item in items:
            _call(fn, item)
        return
    futures = [_pool(threads).submit(_call, fn, item) for item in items]
    for future in futures:
        future.result()
