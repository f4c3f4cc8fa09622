"""What a source reader yields: images to import (`Candidate`) or inputs it refuses (`Rejection`).

Readers only parse their layout; decoding, hashing and writing happen in one place
(`fersynth.ingest.writer`), in worker processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe id from a source path or key (`689/ab.jpg` -> `689_ab`)."""
    stem = text.rsplit(".", 1)[0] if "." in text.rsplit("/", 1)[-1] else text
    return _UNSAFE.sub("_", stem).strip("_.") or "image"


@dataclass(frozen=True)
class Candidate:
    """One image to import.

    Exactly one of `file` (an image file) and `pixels` (decoded grey values, as FER2013's
    CSV holds them) is set. `crop` is a face box (x, y, width, height) in source pixels.
    """

    id: str
    split: str
    label: str
    source_id: str  # what the report names: a path, or "file.csv row N"
    file: str | None = None
    pixels: str | None = None
    pixel_shape: tuple[int, int] | None = None
    crop: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Rejection:
    """An input that is not imported, and why. Every input is either imported or rejected."""

    source_id: str
    reason: str
    split: str = ""
    label: str = ""
