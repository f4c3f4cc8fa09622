"""`fersynth ingest`: any supported source layout -> one canonical dataset folder.

The output folder holds `manifest.csv`, `images/<split>/<id>.<ext>`, the ingest report
(JSON, Markdown, the rejected inputs and duplicate groups as CSV) and the resolved settings.
It is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from fersynth.classes import CLASSES
from fersynth.dataset import COLUMNS, VAL_SPLIT, write_manifest
from fersynth.errors import FersynthError
from fersynth.files import staged_folder
from fersynth.image_limit import max_image_pixels
from fersynth.ingest import affectnet, fer2013, ferplus, folder, rafdb
from fersynth.ingest.items import Candidate, Note, Rejection
from fersynth.ingest.report import (
    IngestReport,
    build_report,
    find_duplicates,
    split_class_counts,
    split_order,
    write_report,
)
from fersynth.ingest.writer import COMPOSITED, IMAGES_DIR, WriteOptions, import_one
from fersynth.parallel import imap
from fersynth.settings import IngestSettings, save_resolved
from fersynth.splits import draw_validation, has_validation


def _reader(settings: IngestSettings, seed: int) -> tuple[Iterator[Candidate | Rejection | Note], int]:
    source, path = settings.source, Path(settings.input)
    if not path.exists():
        raise FersynthError(f"{path}: input not found (ingest.input, source {source})")
    if source == "rafdb":
        return rafdb.read(path, settings.rafdb), rafdb.count(path)
    if source == "fer2013":
        return fer2013.read(path, settings.fer2013), fer2013.count(path)
    if source == "ferplus":
        labels = settings.ferplus.labels_csv
        if labels is None:
            raise FersynthError("ingest.ferplus.labels_csv: set it to Microsoft's fer2013new.csv")
        return ferplus.read(path, labels, settings.fer2013), fer2013.count(labels)
    if source == "affectnet":
        return affectnet.read(path, settings.affectnet, seed), affectnet.count(path, settings.affectnet)
    return folder.read(path, settings.folder), folder.count(path)


class _Tally:
    """Counts labelled inputs per split and class, and makes ids unique, as items stream by."""

    def __init__(self) -> None:
        self.read: Counter[tuple[str, str]] = Counter()
        self.ids: set[str] = set()
        self.notes: list[str] = []

    def __call__(self, items: Iterator[Candidate | Rejection | Note]) -> Iterator[Candidate | Rejection]:
        for item in items:
            if isinstance(item, Note):  # about the input as a whole: for the report
                self.notes.append(item.text)
                continue
            if isinstance(item, Candidate):
                self.read[(item.split, item.label)] += 1
                unique, n = item.id, 1
                while unique in self.ids:  # "a b.jpg", "a_b.jpg" and "a_b__2.jpg" in one folder
                    n += 1
                    unique = f"{item.id}__{n}"
                self.ids.add(unique)
                if unique != item.id:
                    item = dataclasses.replace(item, id=unique)
            yield item

    def counts(self) -> dict[str, dict[str, int]]:
        splits = sorted({split for split, _ in self.read}, key=split_order)
        return {s: {name: self.read[(s, name)] for name in CLASSES} for s in splits}


def _validation_split(
    staging: Path, kept: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, int]:
    """Draw the validation split from the training rows when the source has none
    (fersynth.splits); its images move to images/val/. Returns (rows, how many were drawn)."""
    if has_validation(kept):
        return kept, 0
    drawn = draw_validation(kept, fraction, seed)
    if drawn.empty:
        return kept, 0
    kept = kept.copy()
    for index in drawn:
        old = kept.at[index, "path"]
        new = f"{IMAGES_DIR}/{VAL_SPLIT}/{old.rsplit('/', 1)[-1]}"
        (staging / new).parent.mkdir(parents=True, exist_ok=True)
        (staging / old).rename(staging / new)
        kept.at[index, "path"] = new
    kept.loc[drawn, "split"] = VAL_SPLIT
    return kept, len(drawn)


def _nothing_imported(settings: IngestSettings, rejections: list[Rejection], removed: int = 0) -> str:
    """The stage's one line when no image is left: how many inputs, and why, by kind."""
    where = f"{settings.input}: no image could be imported"
    if not rejections and not removed:
        return f"{where} (no input rows or image files found for source {settings.source})"
    kinds = Counter(r.kind for r in rejections).most_common()
    first = {r.kind: f"{r.source_id}: {r.reason}" for r in reversed(rejections)}
    parts = [f"{n} {kind} (e.g. {first[kind]})" for kind, n in kinds[:3]]
    if removed:
        parts.append(f"{removed} removed as copies of test images")
    return f"{where}: {'; '.join(parts)}"


def run_ingest(
    settings: IngestSettings,
    *,
    seed: int = 2048,
    force: bool = False,
    progress: bool = True,
) -> IngestReport:
    """Ingest `settings.input` (layout `settings.source`) into `settings.output`."""
    items, total = _reader(settings, seed)
    tally = _Tally()
    rows: list[dict] = []
    rejections: list[Rejection] = []
    output = Path(settings.output)
    with staged_folder(output, force=force) as staging:
        options = WriteOptions(staging, settings.source, settings.image_format, settings.jpeg_quality)
        results = imap(import_one, tally(items), settings.workers, chunksize=64, options=options)
        composited = 0
        for result in tqdm(
            results, total=total, desc=f"ingest {settings.source}", unit="img", disable=not progress
        ):
            if isinstance(result, Rejection):
                rejections.append(result)
            else:
                composited += result.pop(COMPOSITED)
                rows.append(result)
        if not rows:
            raise FersynthError(_nothing_imported(settings, rejections))

        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        findings = find_duplicates(frame)
        remove = settings.drop_train_test_duplicates
        removed = frame[frame["id"].isin(findings.across["id"])] if remove else frame.iloc[:0]
        kept = frame.drop(index=removed.index)
        for relative in removed["path"]:
            (staging / relative).unlink()

        if kept.empty:
            raise FersynthError(_nothing_imported(settings, rejections, len(removed)))
        report = build_report(
            source=settings.source,
            input_path=Path(settings.input),
            output=output,
            read_counts=tally.counts(),
            kept=kept,
            removed=removed,
            rejections=rejections,
            findings=findings,
            dropped_test_duplicates=remove,
            notes=tally.notes,
            composited=composited,
        )
        kept, report.val_drawn = _validation_split(staging, kept, settings.val_fraction, seed)
        report.written_counts = split_class_counts(kept)
        if not report.accounted:  # a bug, not a user error: refuse to publish the folder
            raise RuntimeError(f"ingest lost inputs: {report}")
        write_manifest(staging, kept.reset_index(drop=True))
        write_report(staging, report, rejections, findings, kept)
        save_resolved({"seed": seed, "max_image_pixels": max_image_pixels(), "ingest": settings}, staging)
    return report
