"""RAF-DB basic: `EmoLabel/list_patition_label.txt` and `Image/aligned/<name>_aligned.jpg`.

Each label line is `train_00001.jpg 5` (labels 1..7); the split is the name's prefix. Label
files as people have them are read too: a byte-order mark, CRLF or tab separators, blank
lines, names that already end in `_aligned.jpg`, a third column (ignored, and said), and,
with `ingest.rafdb.label_base: 0`, labels numbered 0..6. Without `Image/aligned/`, the
images come from `Image/original/<name>` (`ingest.rafdb.images`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fersynth.classes import RAFDB_LABELS
from fersynth.errors import FersynthError
from fersynth.ingest.items import Candidate, Note, Rejection, integer, safe_name
from fersynth.settings import RafdbSettings

LABEL_FILE = Path("EmoLabel/list_patition_label.txt")
ALIGNED_DIR = Path("Image/aligned")
ORIGINAL_DIR = Path("Image/original")
ALIGNED_SUFFIX = "_aligned"
SPLIT_PREFIXES = {"train": "train", "test": "test"}


def label_file(root: Path) -> Path:
    path = Path(root) / LABEL_FILE
    if not path.is_file():
        raise FersynthError(f"{path}: RAF-DB label file not found (expected RAF-DB's basic layout)")
    return path


def _lines(root: Path) -> list[tuple[int, str]]:
    """(line number, text) of the label file's non-blank lines: UTF-8 (a BOM is not part of a
    name) or UTF-16 with its BOM (what Windows Notepad saves as "Unicode")."""
    data = label_file(root).read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    text = data.decode(encoding, errors="replace")
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def count(root: Path) -> int:
    return len(_lines(root))


@dataclass(frozen=True)
class _Line:
    where: str
    name: str
    raw_label: str
    extra: int  # columns after the label


def _parse(number: int, line: str) -> _Line | Rejection:
    fields = line.split()  # any run of spaces or tabs; CR is whitespace too
    where = f"{LABEL_FILE} line {number} ({fields[0][:80]})"  # the image, not only the line
    if len(fields) < 2:
        return Rejection(where, "malformed_row", f"expected 'NAME LABEL', got {line.strip()[:60]!r}")
    return _Line(where, fields[0], fields[1], len(fields) - 2)


def _image_dir(root: Path, settings: RafdbSettings) -> Path:
    if settings.images != "auto":
        return ALIGNED_DIR if settings.images == "aligned" else ORIGINAL_DIR
    if (root / ALIGNED_DIR).is_dir() or not (root / ORIGINAL_DIR).is_dir():
        return ALIGNED_DIR
    return ORIGINAL_DIR


def _check_label_base(lines: list[_Line], base: int) -> None:
    """Stop on a file whose labels are numbered from the other base: reading it with this one
    would write every row one class off, silently."""
    labels = {integer(line.raw_label) for line in lines}
    if base == 1 and 0 in labels and 7 not in labels:
        raise FersynthError(
            f"{LABEL_FILE}: labels run 0..6, not RAF-DB's 1..7, so this file looks 0-based; if it is, "
            "read it with ingest.rafdb.label_base=0 (--label-base 0)"
        )
    if base == 0 and 7 in labels and 0 not in labels:
        raise FersynthError(
            f"{LABEL_FILE}: labels run 1..7, RAF-DB's own numbering, but ingest.rafdb.label_base is 0; "
            "read it with label_base 1 (the default; drop --label-base 0)"
        )


def _repeats(lines: list[_Line]) -> dict[_Line, Rejection]:
    """Rejections for label lines that name an image already named: an identical repeat is
    dropped (the first line is read), an image listed with different labels is rejected on
    every line, since which label is right cannot be told."""
    by_name: dict[str, list[int]] = {}
    for index, line in enumerate(lines):
        by_name.setdefault(line.name.rsplit(".", 1)[0].removesuffix(ALIGNED_SUFFIX), []).append(index)
    refused: dict[_Line, Rejection] = {}
    for indices in by_name.values():
        if len(indices) < 2:
            continue
        labels = {integer(lines[i].raw_label) for i in indices}
        first = lines[indices[0]].where.split(" (", 1)[0]
        for position, i in enumerate(indices):
            if len(labels) > 1:
                shown = ", ".join(lines[j].raw_label for j in indices)
                refused[lines[i]] = Rejection(
                    lines[i].where,
                    "conflicting_labels",
                    f"the image is listed {len(indices)} times with labels {shown}",
                )
            elif position:
                refused[lines[i]] = Rejection(lines[i].where, "duplicate_row", f"repeats {first}")
    return refused


def read(root: Path, settings: RafdbSettings | None = None) -> Iterator[Candidate | Rejection | Note]:
    """The label file's items; a file that cannot be read as a whole is an error here, before
    the first item."""
    root = Path(root)
    settings = settings or RafdbSettings()
    parsed = [_parse(number, line) for number, line in _lines(root)]
    _check_label_base([item for item in parsed if isinstance(item, _Line)], settings.label_base)
    return _items(root, parsed, settings)


def _items(
    root: Path, parsed: list[_Line | Rejection], settings: RafdbSettings
) -> Iterator[Candidate | Rejection | Note]:
    lines = [item for item in parsed if isinstance(item, _Line)]
    refused = _repeats(lines)
    image_dir = _image_dir(root, settings)
    if image_dir == ORIGINAL_DIR:
        yield Note(f"images read from {ORIGINAL_DIR}/ (no {ALIGNED_DIR}/): faces are not aligned")
    if any(line.name.rsplit(".", 1)[0].endswith(ALIGNED_SUFFIX) for line in lines):
        yield Note(f"label names ending in {ALIGNED_SUFFIX}: read as the image's name without it")
    extra = sum(1 for line in lines if line.extra)
    if extra:
        yield Note(f"{extra} label lines have columns after the label; only NAME LABEL was read")
    labels = {settings.label_base + i: name for i, name in enumerate(RAFDB_LABELS.values())}
    span = f"{settings.label_base}..{settings.label_base + len(labels) - 1}"

    for item in parsed:
        if isinstance(item, Rejection):
            yield item
            continue
        if item in refused:  # a line's `where` holds its number: equal lines never collide
            yield refused[item]
            continue
        where, name = item.where, item.name
        if "/" in name or "\\" in name:
            yield Rejection(
                where, "unsafe_path", f"name {name!r} is a path; RAF-DB names are plain file names"
            )
            continue
        split = SPLIT_PREFIXES.get(name.split("_", 1)[0])
        if split is None:
            yield Rejection(where, "unknown_split", f"name {name!r} starts with neither train_ nor test_")
            continue
        label = labels.get(integer(item.raw_label))  # type: ignore[arg-type]
        if label is None:
            yield Rejection(
                where, "unknown_label", f"unknown label {item.raw_label!r} (labels here are {span})", split
            )
            continue
        stem = name.rsplit(".", 1)[0].removesuffix(ALIGNED_SUFFIX)
        image = image_dir / (f"{stem}{ALIGNED_SUFFIX}.jpg" if image_dir == ALIGNED_DIR else f"{stem}.jpg")
        yield Candidate(
            id=safe_name(stem),
            split=split,
            label=label,
            source_id=image.as_posix(),
            file=str(root / image),
            within=str(root),
        )
