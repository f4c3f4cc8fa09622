"""A plain `split/class/image` folder, e.g. `train/happy/0001.jpg`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fersynth.classes import folder_class
from fersynth.errors import FersynthError
from fersynth.ingest.items import Candidate, Rejection, safe_name

SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _split_name(folder: str) -> str | None:
    name = SPLIT_ALIASES.get(folder.lower(), folder.lower())
    return name if name.replace("_", "").isalnum() and name[:1].isalpha() else None


def count(root: Path) -> int:
    return len(_files(Path(root)))


def read(root: Path) -> Iterator[Candidate | Rejection]:
    root = Path(root)
    if root.is_file():
        raise FersynthError(f"{root}: expected a split/class/image folder, got a file")
    if not root.is_dir():
        raise FersynthError(f"{root}: folder not found")
    for path in _files(root):
        relative = path.relative_to(root)
        where = relative.as_posix()
        if not path.resolve().is_relative_to(root.resolve()):
            yield Rejection(where, "unsafe_path", "a link that leads outside the input folder")
            continue
        if len(relative.parts) < 3:
            yield Rejection(where, "misplaced_file", "not inside a split/class/ folder")
            continue
        split = _split_name(relative.parts[0])
        if split is None:
            yield Rejection(
                where, "unknown_split", f"split folder {relative.parts[0]!r} is not a usable name"
            )
            continue
        label = folder_class(relative.parts[1])
        if label is None:
            yield Rejection(where, "unknown_label", f"unknown class folder {relative.parts[1]!r}", split)
            continue
        yield Candidate(
            id=safe_name(where),
            split=split,
            label=label,
            source_id=where,
            file=str(path),
        )
