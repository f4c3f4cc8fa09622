"""FER2013 in Kaggle's CSV layout (`emotion,pixels,Usage`, 48x48 grey), plain or gzipped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from fersynth.classes import FER2013_LABELS
from fersynth.errors import FersynthError
from fersynth.ingest.items import Candidate, Rejection

COLUMNS = ("emotion", "pixels", "Usage")
SIDE = 48
CHUNK_ROWS = 4096


def read_chunks(path: Path, columns: tuple[str, ...]) -> Iterator[pd.DataFrame]:
    """Stream a CSV (plain or .gz) as string chunks, checking that `columns` are present."""
    path = Path(path)
    if not path.is_file():
        raise FersynthError(f"{path}: file not found")
    try:
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
        first = True
        for chunk in reader:
            if first:
                missing = [c for c in columns if c not in chunk.columns]
                if missing:
                    raise FersynthError(f"{path}: missing columns {', '.join(missing)}")
                first = False
            yield chunk
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise FersynthError(f"{path}: not a readable CSV file ({exc})") from None


def count(path: Path, columns: tuple[str, ...] = COLUMNS) -> int:
    return sum(len(chunk) for chunk in read_chunks(path, columns))


def row_id(number: int) -> str:
    return f"fer2013_{number:05d}"


def read(path: Path, split_map: dict[str, str]) -> Iterator[Candidate | Rejection]:
    name = Path(path).name
    number = 0
    for chunk in read_chunks(path, COLUMNS):
        for emotion, pixels, usage in chunk[list(COLUMNS)].itertuples(index=False):
            where = f"{name} row {number + 2}"  # line in the file: header is line 1
            number += 1
            split = split_map.get(usage.strip())
            if split is None:
                yield Rejection(
                    where, "unknown_split", f"unknown Usage {usage!r} (expected {', '.join(split_map)})"
                )
                continue
            try:
                label = FER2013_LABELS[int(emotion)]
            except (ValueError, KeyError):
                yield Rejection(
                    where, "unknown_label", f"unknown emotion {emotion!r} (FER2013 uses 0..6)", split
                )
                continue
            yield Candidate(
                id=row_id(number - 1),
                split=split,
                label=label,
                source_id=where,
                pixels=pixels,
                pixel_shape=(SIDE, SIDE),
            )
