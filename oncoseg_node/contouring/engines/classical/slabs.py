"""Slabs of slices, and the threads that work on them.

In-plane steps take a slab of slices at a time: each slab's shifts and
labels stay in cache, numpy's copy of an overlapping operand is a slab, not
a volume, and a comparison or an unpack is a slab's worth of memory, never a
box of it. Independent slabs run on :data:`WORKERS` threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Slices taken at a time by every slab-wise step of the classical engine.
SLAB = 16


def slab_views(mask: np.ndarray, axis: int = -1) -> list[np.ndarray]:
    """Views of ``mask`` that an in-plane step along ``axis`` can take one at a time."""
    if mask.ndim != 3 or axis % 3 == 0:
        return [mask]
    return [mask[z:z + SLAB] for z in range(0, mask.shape[0], SLAB)]


def slab_starts(mask: np.ndarray) -> range:
    """The first slice of each slab of ``mask``."""
    return range(0, mask.shape[0], SLAB)


# Slab steps run on this many threads: numpy's loops and scipy's labelling
# release the GIL, and slabs write disjoint parts of their output, so the result
# is the same whatever the order they finish in.
WORKERS = min(2, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_worker = threading.local()


def _mark_worker() -> None:
    _worker.busy = True


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: it starts its own pool.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def each_slab(step: Callable[[int], T], starts: Sequence[int]) -> list[T]:
    """``step(start)`` for each start, results in order; on WORKERS threads at once.

    Called again from inside a step it runs in place (a step waiting for
    steps queued behind it would wait for ever).
    """
    global _pool
    if WORKERS < 2 or len(starts) < 2 or getattr(_worker, "busy", False):
        return [step(start) for start in starts]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="slab",
                                       initializer=_mark_worker)
    return list(_pool.map(step, starts))

