"""What a source reader yields: images to import (`Candidate`) or inputs it refuses (`Rejection`).

Readers only parse their layout; decoding, hashing and writing happen in one place
(`fersynth.ingest.writer`), in worker processes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def integer(text: str) -> int | None:
    """A label or code written as an integer (`3`, ` 3`, `3.0`), or None (`3.5`, `x`, `inf`)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None


def safe_name(text: str) -> str:
    """A file-name-safe id from a source path or key (`689/ab.jpg` -> `689_ab`)."""
    stem = text.rsplit(".", 1)[0] if "." in text.rsplit("/", 1)[-1] else text
    return _UNSAFE.sub("_", stem).strip("_.") or "image"


@dataclass(frozen=True)
class Candidate:
    """One image to import.

    Exactly one of `file` (an image file) and `pixels` (decoded grey values, as FER2013's
    CSV holds them) is set. `crop` is a face box (x, y, width, height) in source pixels.
    `within` is the input folder that `file`, symbolic links resolved, must stay inside.
    """

    id: str
    split: str
    label: str
    source_id: str  # what the report names: a path, or "file.csv row N"
    file: str | None = None
    pixels: str | None = None
    pixel_shape: tuple[int, int] | None = None
    crop: tuple[float, float, float, float] | None = None
    within: str | None = None


# Why an input is rejected, as a short stable code (reports count by it), with what each means.
REJECTION_KINDS: dict[str, str] = {
    "malformed_row": "a line or row of the label file that cannot be parsed",
    "duplicate_row": "a label line that repeats an earlier one for the same image",
    "conflicting_labels": "an image the label file lists more than once with different labels",
    "linked_folder": "a symbolic link to a folder (not followed: images are read where they lie)",
    "unknown_split": "a split the source does not define (Usage, name prefix, split folder)",
    "unknown_label": "a label or class folder outside the source's classes",
    "excluded_class": "a class outside the 7-class task (contempt, none, non-face)",
    "no_majority": "FER+ votes without a majority, or with one for unknown",
    "not_a_face": "FER+ voters said it is not a face",
    "removed_by_source": "the source's own labels drop the image (FER+ without an image name)",
    "not_sampled": "not drawn into AffectNet's balanced test subset",
    "unsafe_path": "a path or link that leaves the input folder",
    "misplaced_file": "a file outside the split/class/ layout",
    "bad_face_box": "a face box that is not numeric, empty, or outside the image",
    "missing_file": "the image file named by the labels does not exist",
    "unreadable": "the file exists but cannot be read",
    "empty_file": "a file of 0 bytes",
    "not_an_image": "a file in no readable image format",
    "corrupt_image": "a corrupt or truncated image",
    "too_large": "more pixels than max_image_pixels (a decompression bomb or a huge scan)",
    "bad_pixels": "FER2013-style pixel values that are not 0..255 integers of the right count",
    "encode_failed": "the decoded pixels could not be written",
}


@dataclass(frozen=True)
class Rejection:
    """An input that is not imported, and why: `kind` (REJECTION_KINDS) for counting, `reason`
    for a person. Every input is either imported or rejected."""

    source_id: str
    kind: str
    reason: str
    split: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in REJECTION_KINDS:
            raise ValueError(f"rejection kind {self.kind!r} is not one of {', '.join(REJECTION_KINDS)}")


@dataclass(frozen=True)
class Note:
    """Something about the input as a whole that the user should know (a layout variant read,
    a column ignored); readers yield it among their items and the report lists it."""

    text: str
