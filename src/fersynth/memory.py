"""A batch that does not fit in memory, said as one line with what to lower.

Out-of-memory errors come as an allocator traceback: `torch.OutOfMemoryError` on a GPU
("CUDA out of memory. Tried to allocate ..."), a RuntimeError from torch's CPU allocator
("DefaultCPUAllocator: can't allocate memory"), MPS's RuntimeError, or numpy's MemoryError.
Every heavy stage runs its batches inside `batch_fits`, which turns them into a FersynthError
naming the batch (size, image size, device) and the settings that shrink it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from fersynth.errors import FersynthError

_CPU_OOM = re.compile(
    r"DefaultCPUAllocator|can't allocate memory|not enough memory|MPS backend out of memory"
)


def out_of_memory(exc: BaseException) -> str | None:
    """The allocator's own words when `exc` says memory ran out (first line, at most 160
    characters), else None."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(exc, oom | MemoryError) or (isinstance(exc, RuntimeError) and _CPU_OOM.search(str(exc))):
        text = str(exc).strip().splitlines()
        first = text[0] if text else exc.__class__.__name__
        # torch's CPU message starts with a C++ source location; the sentence after it is the news.
        first = first[first.index("DefaultCPUAllocator") :] if "DefaultCPUAllocator" in first else first
        return first[:160]
    return None


@contextlib.contextmanager
def batch_fits(stage: str, batch: str, device: torch.device | str, lower: list[str]) -> Iterator[None]:
    """Run a stage's batches; out of memory becomes `<stage>: <batch> does not fit in <device>
    memory (<allocator's words>): lower <settings>`. `batch` describes one batch ("a batch of
    128 images at 224 px"), `lower` names the settings with their values ("train.batch_size
    (now 128)")."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        said = out_of_memory(exc)
        if said is None:
            raise
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        hint = " or ".join(lower)
        raise FersynthError(
            f"{stage}: {batch} does not fit in {device} memory ({said}); lower {hint}"
        ) from None
