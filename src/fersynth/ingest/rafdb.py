"""RAF-DB basic: `EmoLabel/list_patition_label.txt` and `Image/aligned/<name>_aligned.jpg`.

Each label line is `train_00001.jpg 5` (labels 1..7); the split is the name's prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fersynth.classes import RAFDB_LABELS
from fersynth.errors import FersynthError
from fersynth.ingest.items import Candidate, Rejection, safe_name

LABEL_FILE = Path("EmoLabel/list_patition_label.txt")
ALIGNED_DIR = Path("Image/aligned")
SPLIT_PREFIXES = {"train": "train", "test": "test"}


def label_file(root: Path) -> Path:
    path = Path(root) / LABEL_FILE
    if not path.is_file():
        raise FersynthError(f"{path}: RAF-DB label file not found (expected RAF-DB's basic layout)")
    return path


def count(root: Path) -> int:
    with label_file(root).open(encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def read(root: Path) -> Iterator[Candidate | Rejection]:
    root = Path(root)
    path = label_file(root)
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{LABEL_FILE} line {number}"
            fields = line.split()
            if len(fields) != 2:
                yield Rejection(where, "malformed_row", f"expected 'NAME LABEL', got {line.strip()[:60]!r}")
                continue
            name, raw_label = fields
            if "/" in name or "\\" in name:
                yield Rejection(
                    where, "unsafe_path", f"name {name!r} is a path; RAF-DB names are plain file names"
                )
                continue
            split = SPLIT_PREFIXES.get(name.split("_", 1)[0])
            if split is None:
                yield Rejection(where, "unknown_split", f"name {name!r} starts with neither train_ nor test_")
                continue
            try:
                label = RAFDB_LABELS[int(raw_label)]
            except (ValueError, KeyError):
                yield Rejection(
                    where, "unknown_label", f"unknown label {raw_label!r} (RAF-DB uses 1..7)", split
                )
                continue
            stem = name.rsplit(".", 1)[0]
            image = ALIGNED_DIR / f"{stem}_aligned.jpg"
            yield Candidate(
                id=safe_name(stem),
                split=split,
                label=label,
                source_id=image.as_posix(),
                file=str(root / image),
            )
