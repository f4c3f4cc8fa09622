"""Ordered parallel map over a stream, on every CPU core, without holding the stream in memory;
torch's CPU thread count, pinned for reproducible training."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count`, restored afterwards; 0 leaves torch's own choice
    (OMP_NUM_THREADS, else every core).

    On a CPU the thread count is part of a training run's result: oneDNN and ATen split a
    float sum (a convolution's weight gradient, say) into one partial sum per thread, so 1, 2
    or 4 threads give weights that differ in the last bits, and after a few hundred steps in
    some predictions (docs/testing.md#reproducibility). A fixed count makes the bits depend on
    the settings and the CPU kind only, not on the machine's core count."""
    import torch

    if count == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pins_torch_threads(function: Callable[..., R]) -> Callable[..., R]:
    """Runs `function(settings, ...)` inside `torch_threads(settings.cpu_threads)`."""

    @functools.wraps(function)
    def pinned(settings, *args: Any, **kwargs: Any) -> R:
        with torch_threads(settings.cpu_threads):
            return function(settings, *args, **kwargs)

    return pinned
