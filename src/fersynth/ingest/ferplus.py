"""FER+ (Microsoft's `fer2013new.csv` votes) joined row by row with FER2013's pixels.

Labels follow Microsoft's `majority` rule (FERPlus `ferplus.py`): drop emotions with a
single vote, keep the top emotion only when it has more than half of the remaining votes,
and drop images whose result is unknown or not a face. Contempt has no canonical class.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

from fersynth.classes import FERPLUS_LABELS, FERPLUS_VOTE_COLUMNS
from fersynth.errors import FersynthError
from fersynth.ingest import fer2013
from fersynth.ingest.csv_rows import CsvFile
from fersynth.ingest.items import Candidate, Rejection
from fersynth.settings import Fer2013Settings

LABEL_COLUMNS = ("Usage", "Image name", *FERPLUS_VOTE_COLUMNS)


def majority(votes: list[float]) -> str:
    """The FER+ vote column that wins by Microsoft's majority rule, or 'unknown'."""
    kept = [v if v > 1.0 else 0.0 for v in votes]  # a single vote is treated as an outlier
    top = max(kept)
    if top > 0.5 * sum(kept):
        return FERPLUS_VOTE_COLUMNS[kept.index(top)]  # first maximum, as np.argmax
    return "unknown"


def read(pixels_csv: Path, labels_csv: Path, settings: Fer2013Settings) -> Iterator[Candidate | Rejection]:
    """The joined rows as items; files without the columns they need are an error here, at once."""
    pixels = CsvFile(pixels_csv, ("pixels",))  # the split comes from the labels' Usage
    return _items(pixels, CsvFile(labels_csv, LABEL_COLUMNS), settings)


def _items(pixels: CsvFile, labels: CsvFile, settings: Fer2013Settings) -> Iterator[Candidate | Rejection]:
    labels_csv, pixels_csv = labels.path, pixels.path
    labels_name, pixels_name = labels_csv.name, pixels_csv.name
    pixel_rows, label_rows = pixels.rows(), labels.rows()
    for number, pair in enumerate(itertools.zip_longest(pixel_rows, label_rows)):
        pixel_row, label_row = pair
        if pixel_row is None or label_row is None:
            longer, row = (labels_csv, label_row) if pixel_row is None else (pixels_csv, pixel_row)
            raise FersynthError(
                f"{longer}: has more rows than its partner (row {row.line}); FER+ labels "
                "join FER2013 row by row, so both files must be complete (all three Usages)"
            )
        where = f"{labels_name} row {label_row.line}"
        if label_row.values is None:
            yield Rejection(where, "malformed_row", label_row.problem)
            continue
        if pixel_row.values is None:
            yield Rejection(
                where, "malformed_row", f"{pixels_name} row {pixel_row.line}: {pixel_row.problem}"
            )
            continue
        usage, image_name = label_row.values["Usage"], label_row.values["Image name"]
        if image_name.strip():
            where = f"{where} ({image_name.strip()[:80]})"  # name the image, not only the row
        raw_votes = [label_row.values[column] for column in FERPLUS_VOTE_COLUMNS]
        split = settings.split_map.get(usage.strip())
        if split is None:
            yield Rejection(
                where, "unknown_split", f"unknown Usage {usage!r} (expected {', '.join(settings.split_map)})"
            )
            continue
        if not image_name.strip():
            yield Rejection(where, "removed_by_source", "no image name: FER+ removed this image", split)
            continue
        try:
            votes = [float(v) for v in raw_votes]
        except ValueError:
            votes = []
        if len(votes) != len(raw_votes) or not all(math.isfinite(v) and v >= 0 for v in votes):
            yield Rejection(where, "malformed_row", f"votes are not counts: {raw_votes}", split)
            continue
        winner = majority(votes)
        if winner == "contempt":
            yield Rejection(
                where, "excluded_class", "excluded class contempt (not in the 7-class task)", split
            )
            continue
        label = FERPLUS_LABELS.get(winner)
        if label is None:
            kind, reason = (
                ("not_a_face", "not a face") if winner == "NF" else ("no_majority", "no majority / unknown")
            )
            yield Rejection(where, kind, f"FER+ majority rule: {reason}", split)
            continue
        yield Candidate(
            id=f"ferplus_{number:05d}",
            split=split,
            label=label,
            source_id=where,
            pixels=pixel_row.values["pixels"],
            pixel_shape=(fer2013.SIDE, fer2013.SIDE),
        )
