"""FER2013 in Kaggle's CSV layout (`emotion,pixels,Usage`, 48x48 grey), plain or gzipped.

Also read: Kaggle's `icml_face_data.csv` (`emotion, Usage, pixels`, spaces included) and the
challenge's `train.csv` without a Usage column, whose split `ingest.fer2013.split` names.
Malformed rows are rejected by line number and the good rows kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fersynth.classes import FER2013_LABELS
from fersynth.errors import FersynthError
from fersynth.ingest.csv_rows import CsvFile, CsvRow
from fersynth.ingest.items import Candidate, Rejection, integer
from fersynth.settings import Fer2013Settings

LABEL_COLUMNS = ("emotion", "pixels")
USAGE = "Usage"
SIDE = 48


def open_csv(path: Path, settings: Fer2013Settings) -> CsvFile:
    """The file, checked for its columns and for a split: Usage, or `settings.split`."""
    table = CsvFile(path, LABEL_COLUMNS)
    if settings.split is None and not table.has(USAGE):
        raise FersynthError(
            f"{path}: no {USAGE} column to say each row's split; name the split of every row "
            "with ingest.fer2013.split (--split train, e.g.)"
        )
    if settings.split is not None and table.has(USAGE):
        raise FersynthError(
            f"{path}: has a {USAGE} column, which says each row's split; ingest.fer2013.split is "
            "for files without one (unset it, or map Usage values with ingest.fer2013.split_map)"
        )
    return table


def count(path: Path) -> int:
    return CsvFile(path, ()).count()


def row_id(number: int) -> str:
    return f"fer2013_{number:05d}"


def split_of(row: CsvRow, settings: Fer2013Settings) -> tuple[str | None, str]:
    """The row's split and, when it has none, why."""
    if settings.split is not None:
        return settings.split, ""
    assert row.values is not None
    usage = row.values[USAGE]
    split = settings.split_map.get(usage.strip())
    return split, "" if split else f"unknown Usage {usage!r} (expected {', '.join(settings.split_map)})"


def read(path: Path, settings: Fer2013Settings) -> Iterator[Candidate | Rejection]:
    """The rows as items; a file without the columns it needs is an error here, at once."""
    return _items(open_csv(path, settings), settings)


def _items(table: CsvFile, settings: Fer2013Settings) -> Iterator[Candidate | Rejection]:
    name = table.path.name
    for number, row in enumerate(table.rows()):
        where = f"{name} row {row.line}"  # the line in the file: the header is line 1
        if row.values is None:
            yield Rejection(where, "malformed_row", row.problem)
            continue
        split, problem = split_of(row, settings)
        if split is None:
            yield Rejection(where, "unknown_split", problem)
            continue
        emotion = row.values["emotion"]
        label = FER2013_LABELS.get(integer(emotion))  # type: ignore[arg-type]
        if label is None:
            yield Rejection(where, "unknown_label", f"unknown emotion {emotion!r} (FER2013 uses 0..6)", split)
            continue
        yield Candidate(
            id=row_id(number),
            split=split,
            label=label,
            source_id=where,
            pixels=row.values["pixels"],
            pixel_shape=(SIDE, SIDE),
        )
