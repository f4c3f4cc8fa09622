"""Metrics, confusion matrices and `fersynth evaluate` (one model, one or more test sets)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fersynth.classes import CLASSES, NUM_CLASSES
from fersynth.compare import METRICS_JSON
from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.figures import save_figure
from fersynth.files import atomic_write_text, staged_folder
from fersynth.memory import batch_fits
from fersynth.parallel import pins_torch_threads
from fersynth.settings import EvaluateSettings, save_resolved
from fersynth.skipped import skipped_reason, write_skipped
from fersynth.train.inference import compute_metrics, pick_device, predict_probabilities
from fersynth.train.models import LoadedModel, load_model


def confusion_figure(metrics: dict[str, Any], title: str, path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(metrics["confusion"])
    normalised = np.array(metrics["confusion_normalised"])
    figure, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=100)
    for axis, matrix, name, fmt in (
        (axes[0], counts, "counts", "d"),
        (axes[1], normalised, "row-normalised", ".2f"),
    ):
        axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        for i in range(NUM_CLASSES):
            for j in range(NUM_CLASSES):
                value = format(matrix[i, j], fmt)
                color = "white" if normalised[i, j] > 0.5 else "black"
                axis.text(j, i, value, ha="center", va="center", fontsize=8, color=color)
        axis.set_xticks(range(NUM_CLASSES), CLASSES, rotation=45, ha="right")
        axis.set_yticks(range(NUM_CLASSES), CLASSES)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(name)
    figure.suptitle(
        f"{title}: accuracy {metrics['accuracy']:.2%}, mean per-class {metrics['mean_accuracy']:.2%}"
    )
    figure.tight_layout()
    return save_figure(figure, path)


@dataclass
class TestSetResult:
    name: str
    folder: Path
    metrics: dict[str, Any]


def _write_results(
    folder: Path, name: str, frame: pd.DataFrame, probs: np.ndarray, metrics: dict[str, Any]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / METRICS_JSON, json.dumps(metrics, indent=2) + "\n")
    for key, fname in (
        ("confusion", "confusion.csv"),
        ("confusion_normalised", "confusion_normalised.csv"),
    ):
        table = pd.DataFrame(metrics[key], index=CLASSES, columns=CLASSES)
        table.index.name = "true \\ predicted"
        atomic_write_text(folder / fname, table.to_csv(lineterminator="\n"))
    predictions = frame[["id", "path", "label"]].copy()
    predictions["predicted"] = [CLASSES[i] for i in probs.argmax(axis=1)]
    predictions["correct"] = predictions["predicted"] == predictions["label"]
    for i, cls in enumerate(CLASSES):
        predictions[f"p_{cls}"] = probs[:, i].round(6)
    atomic_write_text(folder / "predictions.csv", predictions.to_csv(index=False, lineterminator="\n"))
    confusion_figure(metrics, name, folder / "confusion.png")


@pins_torch_threads
def run_evaluate(
    settings: EvaluateSettings, *, loaded: LoadedModel | None = None, progress: bool = True
) -> list[TestSetResult]:
    """Evaluate one model on each dataset's `settings.split`; one sub-folder per test set.
    A skipped training run (fersynth.skipped) gives a skipped results folder and no results."""
    reason = skipped_reason(settings.model) if loaded is None else None
    if reason is not None:
        write_skipped(settings.output, reason, {"evaluate": settings}, force=True, model=str(settings.model))
        return []
    device = pick_device(settings.device)
    loaded = loaded or load_model(settings.model, device)
    model = loaded.model.to(device)
    output = Path(settings.output)
    results = []
    names: set[str] = set()
    # Results are derived: each evaluation replaces the folder whole, so no stale test set stays.
    with staged_folder(output, force=True) as staging:
        for data in settings.data:
            dataset = read_manifest(data)
            frame = dataset.split(settings.split)
            if frame.empty:
                splits = sorted(set(dataset.manifest["split"]))
                raise FersynthError(f"{data}: no {settings.split!r} split (it has {', '.join(splits)})")
            name = Path(data).name
            while name in names:
                name = f"{name}_"
            names.add(name)
            batch = f"a batch of {settings.batch_size} images at {loaded.spec.image_size} px"
            with batch_fits("evaluate", batch, device, [f"evaluate.batch_size (now {settings.batch_size})"]):
                probs = predict_probabilities(
                    model,
                    loaded.spec,
                    dataset.root,
                    frame,
                    batch_size=settings.batch_size,
                    device=device,
                    workers=settings.workers,
                    tta_flip=settings.tta_flip,
                    progress=progress,
                    desc=f"evaluate {name}",
                )
            y_true = np.array([CLASSES.index(v) for v in frame["label"]])
            metrics = compute_metrics(y_true, probs.argmax(axis=1))
            metrics.update(
                test_set=name,
                data=str(data),
                split=settings.split,
                model=str(settings.model),
                train_counts=loaded.spec.train_counts,
                tta_flip=settings.tta_flip,
            )
            _write_results(staging / name, name, frame, probs, metrics)
            results.append(TestSetResult(name, output / name, metrics))
        save_resolved({"evaluate": settings}, staging)
        summary = {
            r.name: {k: r.metrics[k] for k in ("accuracy", "mean_accuracy", "per_class_accuracy")}
            for r in results
        }
        atomic_write_text(staging / "summary.json", json.dumps(summary, indent=2) + "\n")
    return results
