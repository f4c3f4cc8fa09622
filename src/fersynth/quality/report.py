"""The quality report: flagged counts per class, score histograms, the lowest-scoring images
and before/after pairs, as Markdown with PNGs and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fersynth import markdown
from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, ImageDecodeError, load_image
from fersynth.figures import contact_sheet, save_figure, save_png
from fersynth.files import atomic_write_text
from fersynth.quality_scores import SCORE_NAMES

if TYPE_CHECKING:
    from fersynth.settings import QualitySettings


@dataclass
class QualityResult:
    output: Path
    manifest: pd.DataFrame
    threshold: float  # the combined-score cut-off actually applied
    working_size: tuple[int, int]
    sr_models: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


REPORT_MD = "quality_report.md"
TEMPLATE = "quality_report.md.j2"
REPORT_JSON = "quality_report.json"
HISTOGRAMS_PNG = "quality_histograms.png"
LOWEST_PNG = "quality_lowest.png"
BEFORE_AFTER_PNG = "quality_before_after.png"


def flagged_per_class(frame: pd.DataFrame) -> pd.DataFrame:
    train = frame[frame["split"] == TRAIN_SPLIT]
    table = pd.DataFrame(index=list(CLASSES))
    table["train images"] = train["label"].value_counts().reindex(CLASSES, fill_value=0)
    table["flagged"] = train[train["q_flag"] != ""]["label"].value_counts().reindex(CLASSES, fill_value=0)
    table["enhanced"] = (
        train[train["q_action"] == "enhanced"]["label"].value_counts().reindex(CLASSES, fill_value=0)
    )
    table["flagged %"] = (100 * table["flagged"] / table["train images"].clip(lower=1)).round(1)
    table.index.name = "class"
    return table


def histograms(frame: pd.DataFrame, cutoff: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = frame[(frame["split"] == TRAIN_SPLIT) & frame["q_score"].notna()]
    flagged = train["q_flag"] != ""
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=90)
    for axis, name in zip(axes.ravel(), [*SCORE_NAMES, "score"], strict=True):
        column = f"q_{name}"
        values = train[column].astype(float)
        if name == "sharpness":
            values = np.log10(values + 1.0)
        bins = np.histogram_bin_edges(values, bins=40)
        axis.hist(
            [values[~flagged], values[flagged]],
            bins=bins,
            stacked=True,
            color=["tab:blue", "tab:red"],
            label=["kept", "flagged"],
        )
        if name == "score":
            axis.axvline(cutoff, color="black", linestyle="--", label="threshold")
        axis.set_title(
            "log10(1 + sharpness)" if name == "sharpness" else "combined score" if name == "score" else name
        )
    axes[0, 0].legend()
    axes[1, 2].legend()
    figure.suptitle("Quality scores of the training images")
    figure.tight_layout()
    return save_figure(figure, path)


def _images(folder: Path, paths) -> list[np.ndarray]:
    images = []
    for relative in paths:
        try:
            images.append(load_image(folder / relative))
        except ImageDecodeError:
            images.append(np.zeros((8, 8, 3), np.uint8))
    return images


def write_report(folder: Path, result: QualityResult, settings: QualitySettings) -> None:
    frame = result.manifest
    train = frame[(frame["split"] == TRAIN_SPLIT) & frame["q_score"].notna()]
    lowest = train.sort_values("q_score").head(32)
    rows = [
        (f"lowest scores {i + 1}-{i + 8}", _images(folder, chunk))
        for i, chunk in (
            (
                i,
                lowest["original_path"].where(lowest["original_path"] != "", lowest["path"]).iloc[i : i + 8],
            )
            for i in range(0, len(lowest), 8)
        )
    ]
    save_png(folder / LOWEST_PNG, contact_sheet(rows, columns=8))
    enhanced = frame[frame["q_action"] == "enhanced"].head(16)
    pairs = []
    for i in range(0, len(enhanced), 4):
        chunk = enhanced.iloc[i : i + 4]
        tiles: list[np.ndarray] = []
        for before, after in zip(
            _images(folder, chunk["original_path"]), _images(folder, chunk["path"]), strict=True
        ):
            tiles += [before, after]
        pairs.append(("before | after (super-resolution)", tiles))
    if pairs:
        save_png(folder / BEFORE_AFTER_PNG, contact_sheet(pairs, columns=8))
    histograms(frame, result.threshold, folder / HISTOGRAMS_PNG)

    per_class = flagged_per_class(frame)
    summary = {
        "data": str(settings.data),
        "output": str(settings.output),
        "threshold_mode": settings.threshold_mode,
        "threshold": settings.threshold,
        "score_cutoff": result.threshold,
        "working_size": list(result.working_size),
        "sr_models": result.sr_models,
        "train_images": int(len(frame[frame["split"] == TRAIN_SPLIT])),
        "flagged": int((frame["q_flag"] != "").sum()),
        "enhanced": int((frame["q_action"] == "enhanced").sum()),
        "flag_reasons": frame.loc[frame["q_flag"] != "", "q_flag"].value_counts().to_dict(),
        "per_class": per_class.reset_index().to_dict(orient="records"),
        "problems": [{"path": p, "reason": r} for p, r in result.problems],
        "lowest": lowest[["id", "label", "q_score", *[f"q_{n}" for n in SCORE_NAMES]]]
        .head(20)
        .round(4)
        .to_dict(orient="records"),
    }
    atomic_write_text(folder / REPORT_JSON, json.dumps(summary, indent=2, default=str) + "\n")
    text = markdown.render(
        TEMPLATE,
        settings=settings,
        result=result,
        summary=summary,
        per_class=markdown.table(per_class, {"flagged %": ".1f"}),
        histograms=HISTOGRAMS_PNG,
        lowest=LOWEST_PNG,
        before_after=BEFORE_AFTER_PNG if pairs else None,
    )
    atomic_write_text(folder / REPORT_MD, text)
