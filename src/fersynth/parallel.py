"""Ordered parallel map over a stream, on every CPU core, without holding the stream in memory."""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count(requested: int) -> int:
    """`requested` workers, or every usable core when 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def imap(
    function: Callable[..., R],
    items: Iterable[T],
    workers: int,
    chunksize: int = 32,
    **fixed: Any,
) -> Iterator[R]:
    """`function(item, **fixed)` for each item, in order; in-process when one worker."""
    call = functools.partial(function, **fixed)
    count = worker_count(workers)
    if count == 1:
        yield from map(call, items)
        return
    with multiprocessing.get_context("fork").Pool(count) as pool:
        yield from pool.imap(call, items, chunksize=chunksize)
