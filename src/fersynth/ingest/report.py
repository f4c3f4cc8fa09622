"""Exact-duplicate analysis by decoded-pixel hash, and the ingest report (JSON, Markdown, CSV)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fersynth import markdown as md
from fersynth.classes import CLASSES
from fersynth.dataset import is_evaluation_split, load_image
from fersynth.figures import class_count_chart, contact_sheet, save_png
from fersynth.files import atomic_write_text
from fersynth.ingest.items import Rejection

REPORT_JSON = "ingest_report.json"
CLASSES_PNG = "ingest_classes.png"
SAMPLES_PNG = "ingest_samples.png"
REPORT_MD = "ingest_report.md"
TEMPLATE = "ingest_report.md.j2"
REJECTED_CSV = "ingest_rejected.csv"
DUPLICATES_CSV = "ingest_duplicates.csv"


def split_order(split: str) -> tuple[int, str]:
    """train, val, test, then other splits by name."""
    return ({"train": 0, "val": 1, "test": 2}.get(split, 3), split)


def split_class_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {class: count}} with every canonical class present, in canonical order."""
    counts: dict[str, dict[str, int]] = {}
    for split, group in sorted(frame.groupby("split"), key=lambda item: split_order(item[0])):
        tally = group["label"].value_counts()
        counts[str(split)] = {name: int(tally.get(name, 0)) for name in CLASSES}
    return counts


@dataclass
class DuplicateFindings:
    """Exact pixel duplicates: within each split, and between learning and test splits."""

    within_split: pd.DataFrame  # rows of groups with >1 member in one split
    across: pd.DataFrame  # train/val rows whose pixels occur in a test split, with the test ids
    distinct_across: int  # distinct images shared between learning and test splits
    test_rows_across: int  # test rows that have a copy in a learning split


def find_duplicates(frame: pd.DataFrame) -> DuplicateFindings:
    sizes = frame.groupby(["split", "pixel_hash"])["id"].transform("size")
    within = frame.loc[sizes > 1, ["split", "pixel_hash", "id", "path", "label"]]
    within = within.sort_values(["split", "pixel_hash", "id"])

    evaluation = frame[frame["split"].map(is_evaluation_split)]
    learning = frame[~frame["split"].map(is_evaluation_split)]
    test_ids = evaluation.groupby("pixel_hash")["id"].agg(lambda ids: " ".join(sorted(ids)))
    across = learning[learning["pixel_hash"].isin(test_ids.index)].copy()
    across["test_ids"] = across["pixel_hash"].map(test_ids)
    across = across[["split", "pixel_hash", "id", "path", "label", "test_ids"]].sort_values(
        ["pixel_hash", "id"]
    )
    shared = set(across["pixel_hash"])
    return DuplicateFindings(
        within_split=within,
        across=across,
        distinct_across=len(shared),
        test_rows_across=int(evaluation["pixel_hash"].isin(shared).sum()),
    )


@dataclass
class IngestReport:
    source: str
    input: str
    output: str
    inputs: int
    written: int
    rejected: int
    removed_test_duplicates: int
    read_counts: dict[str, dict[str, int]]  # labelled inputs per split and class
    written_counts: dict[str, dict[str, int]]
    rejected_by_kind: dict[str, int]  # Rejection.kind -> count, most frequent first
    duplicates: dict[str, Any] = field(default_factory=dict)
    rejection_examples: dict[str, str] = field(default_factory=dict)  # kind -> its first reason
    val_drawn: int = 0  # training rows moved to the validation split (fersynth.splits)
    notes: list[str] = field(default_factory=list)  # about the input as a whole (a layout variant)
    composited: int = 0  # images whose transparent pixels were composited onto the background

    @property
    def accounted(self) -> bool:
        return self.written + self.rejected + self.removed_test_duplicates == self.inputs


def build_report(
    *,
    source: str,
    input_path: Path,
    output: Path,
    read_counts: dict[str, dict[str, int]],
    kept: pd.DataFrame,
    removed: pd.DataFrame,
    rejections: list[Rejection],
    findings: DuplicateFindings,
    dropped_test_duplicates: bool,
    notes: list[str] | None = None,
    composited: int = 0,
) -> IngestReport:
    within_groups = findings.within_split.groupby(["split", "pixel_hash"])["label"].nunique()
    return IngestReport(
        source=source,
        input=str(input_path),
        output=str(output),
        inputs=len(kept) + len(removed) + len(rejections),
        written=len(kept),
        rejected=len(rejections),
        removed_test_duplicates=len(removed),
        read_counts=read_counts,
        written_counts=split_class_counts(kept),
        rejected_by_kind=dict(Counter(r.kind for r in rejections).most_common()),
        duplicates={
            "within_split_groups": int(len(within_groups)),
            "within_split_rows": int(len(findings.within_split)),
            "within_split_groups_with_conflicting_labels": int((within_groups > 1).sum()),
            "train_test_distinct_images": findings.distinct_across,
            "train_test_learning_rows": int(len(findings.across)),
            "train_test_test_rows": findings.test_rows_across,
            "learning_rows_removed": int(len(removed)),
            "policy": "removed from training" if dropped_test_duplicates else "kept (flag)",
        },
        rejection_examples={r.kind: r.reason for r in reversed(rejections)},
        notes=list(notes or []),
        composited=composited,
    )


def counts_table(counts: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Images per split (rows) and class (columns, canonical order), and each split's total."""
    table = pd.DataFrame.from_dict(counts, orient="index", columns=list(CLASSES)).fillna(0).astype(int)
    table["total"] = table.sum(axis=1)
    table.index.name = "split"
    return table


def rejections_table(report: IngestReport) -> pd.DataFrame:
    """Rejected inputs per kind, most frequent first, with the first reason of each kind."""
    table = pd.DataFrame(
        {
            "count": report.rejected_by_kind,
            "example": {kind: report.rejection_examples.get(kind, "") for kind in report.rejected_by_kind},
        },
        columns=["count", "example"],
    )
    table.index.name = "kind"
    return table


def markdown(report: IngestReport, figures: bool = True) -> str:
    """The report as Markdown; `figures=False` for the terminal (no image links)."""
    return md.render(
        TEMPLATE,
        report=report,
        written=md.table(counts_table(report.written_counts)),
        read=md.table(counts_table(report.read_counts)),
        rejections=md.table(rejections_table(report)) if report.rejected_by_kind else "",
        figures=figures,
        classes_png=CLASSES_PNG,
        samples_png=SAMPLES_PNG,
        rejected_csv=REJECTED_CSV,
        duplicates_csv=DUPLICATES_CSV,
    )


def write_figures(folder: Path, report: IngestReport, kept: pd.DataFrame, per_class: int = 8) -> None:
    """Class counts per split as a bar chart, and the first training images of each class."""
    class_count_chart(report.written_counts, f"{report.source}: images per class", folder / CLASSES_PNG)
    train = kept[kept["split"] == "train"]
    rows = []
    for name in CLASSES:
        paths = train.loc[train["label"] == name, "path"].iloc[:per_class]
        rows.append(
            (
                f"{name} ({int((train['label'] == name).sum())})",
                [load_image(folder / p) for p in paths],
            )
        )
    save_png(folder / SAMPLES_PNG, contact_sheet(rows, columns=per_class))


def write_report(
    folder: Path,
    report: IngestReport,
    rejections: list[Rejection],
    findings: DuplicateFindings,
    kept: pd.DataFrame,
) -> None:
    folder = Path(folder)
    write_figures(folder, report, kept)
    atomic_write_text(folder / REPORT_JSON, json.dumps(asdict(report), indent=2) + "\n")
    atomic_write_text(folder / REPORT_MD, markdown(report))
    rejected = pd.DataFrame(
        [asdict(r) for r in rejections], columns=["source_id", "split", "label", "kind", "reason"]
    )
    atomic_write_text(folder / REJECTED_CSV, rejected.to_csv(index=False, lineterminator="\n"))
    duplicates = pd.concat(
        [
            findings.within_split.assign(kind="within_split", test_ids=""),
            findings.across.assign(kind="train_test"),
        ],
        ignore_index=True,
    )[["kind", "split", "pixel_hash", "id", "path", "label", "test_ids"]]
    atomic_write_text(folder / DUPLICATES_CSV, duplicates.to_csv(index=False, lineterminator="\n"))
