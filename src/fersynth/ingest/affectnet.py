"""AffectNet: `training.csv` / `validation.csv` with `subDirectory_filePath`, face box and
`expression`, images under `Manually_Annotated_Images/`.

Training rows become the train split. The test split is the balanced subset the papers use:
`test_per_class` images per class from the validation file, drawn with a seeded shuffle.
Contempt (7) and none / uncertain / non-face (8-10) are excluded and counted. Without the
validation file the training file alone is ingested (no test split), and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fersynth.classes import AFFECTNET_EXCLUDED, AFFECTNET_LABELS, CLASSES
from fersynth.errors import FersynthError
from fersynth.ingest.csv_rows import CsvFile, CsvRow
from fersynth.ingest.items import Candidate, Note, Rejection, integer, safe_name
from fersynth.settings import AffectNetSettings

COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")


def _csv(root: Path, name: str) -> Path:
    path = Path(root) / name
    if not path.is_file():
        raise FersynthError(f"{path}: AffectNet CSV not found")
    return path


def _test_csv(root: Path, settings: AffectNetSettings) -> Path | None:
    """The validation file, or None when it is absent (the training file alone is ingested)."""
    path = Path(root) / settings.test_csv
    return path if path.is_file() else None


def count(root: Path, settings: AffectNetSettings) -> int:
    files = [_csv(root, settings.train_csv), _test_csv(root, settings)]
    return sum(CsvFile(path, ()).count() for path in files if path is not None)


def _parse(root: Path, images_dir: str, csv_name: str, row: CsvRow, split: str) -> Candidate | Rejection:
    where = f"{csv_name} row {row.line}"
    if row.values is None:
        return Rejection(where, "malformed_row", row.problem, split)
    relative, x, y, w, h, expression = (row.values[column] for column in COLUMNS)
    where = f"{where} ({relative.strip()[:120]})" if relative.strip() else where  # name the image
    code = integer(expression)
    if code is None:
        return Rejection(where, "malformed_row", f"expression {expression!r} is not a whole number", split)
    if code in AFFECTNET_EXCLUDED:
        return Rejection(
            where, "excluded_class", f"excluded class {AFFECTNET_EXCLUDED[code]} (expression {code})", split
        )
    label = AFFECTNET_LABELS.get(code)
    if label is None:
        return Rejection(where, "unknown_label", f"unknown expression {code} (AffectNet uses 0..10)", split)
    try:
        box = tuple(float(v) for v in (x, y, w, h))
    except ValueError:
        return Rejection(where, "bad_face_box", f"face box {x},{y},{w},{h} is not numeric", split, label)
    if not all(math.isfinite(v) for v in box):
        return Rejection(where, "bad_face_box", f"face box {x},{y},{w},{h} is not finite", split, label)
    if box[2] <= 0 or box[3] <= 0:
        return Rejection(where, "bad_face_box", f"face box {x},{y},{w},{h} is empty", split, label)
    if not relative.strip() or relative.startswith("/") or ".." in Path(relative).parts:
        return Rejection(
            where, "unsafe_path", f"image path {relative!r} leaves the image folder", split, label
        )
    return Candidate(
        id=safe_name(relative),
        split=split,
        label=label,
        source_id=f"{images_dir}/{relative}",
        file=str(Path(root) / images_dir / relative),
        crop=box,  # type: ignore[arg-type]
        within=str(Path(root) / images_dir),
    )


def read(root: Path, settings: AffectNetSettings, seed: int) -> Iterator[Candidate | Rejection | Note]:
    """The rows as items; CSV files without the columns they need are an error here, at once."""
    root = Path(root)
    train = CsvFile(_csv(root, settings.train_csv), COLUMNS)
    test_csv = _test_csv(root, settings)
    test = CsvFile(test_csv, COLUMNS) if test_csv is not None else None
    return _items(root, settings, seed, train, test)


def _items(
    root: Path, settings: AffectNetSettings, seed: int, train: CsvFile, test: CsvFile | None
) -> Iterator[Candidate | Rejection | Note]:
    train_rows = train.rows()
    if test is None:
        yield Note(
            f"no {settings.test_csv}: only {settings.train_csv} was ingested (train split only, "
            "no test split; validation is drawn from training)"
        )
    for row in train_rows:
        yield _parse(root, settings.images_dir, settings.train_csv, row, "train")
    if test is None:
        return

    # The validation file is small (about 5.5k rows): parse it whole, then draw the subset.
    parsed = [_parse(root, settings.images_dir, settings.test_csv, row, "test") for row in test.rows()]
    by_class: dict[str, list[int]] = {name: [] for name in CLASSES}
    for index, item in enumerate(parsed):
        if isinstance(item, Candidate):
            by_class[item.label].append(index)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for name in CLASSES:
        indices = by_class[name]
        order = rng.permutation(len(indices))
        chosen.update(indices[i] for i in order[: settings.test_per_class])
    for index, item in enumerate(parsed):
        if isinstance(item, Candidate) and index not in chosen:
            yield Rejection(
                item.source_id,
                "not_sampled",
                f"not drawn into the balanced test subset ({settings.test_per_class} per class)",
                item.split,
                item.label,
            )
        else:
            yield item
