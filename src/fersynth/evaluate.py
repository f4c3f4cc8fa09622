"""Metrics, confusion matrices and `fersynth evaluate` (one model, one or more test sets)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

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
from fersynth.train.data import ManifestImages, test_transform
from fersynth.train.models import LoadedModel, ModelSpec, load_model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FersynthError(f"device {name!r}: no CUDA GPU is available here")
    return torch.device(name)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Total accuracy, mean per-class accuracy, per-class accuracy and the confusion matrix.

    Rows of the confusion matrix are true classes, columns predictions, in canonical order.
    A class absent from the test set has no accuracy (None) and is left out of the mean.
    """
    if len(y_true) == 0:
        raise FersynthError("no images to evaluate")
    # Counted by numpy: importing torchmetrics for this costs every stage 6.5 s on two cores.
    pairs = NUM_CLASSES * np.asarray(y_true, np.int64) + np.asarray(y_pred, np.int64)
    confusion = np.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)
    per_class = {
        name: (float(correct[i] / support[i]) if support[i] else None) for i, name in enumerate(CLASSES)
    }
    present = [v for v in per_class.values() if v is not None]
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support[:, None] > 0, confusion / support[:, None], 0.0)
    return {
        "images": int(len(y_true)),
        "accuracy": float(correct.sum() / len(y_true)),
        "mean_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
        "support": {name: int(support[i]) for i, name in enumerate(CLASSES)},
        "confusion": confusion.astype(int).tolist(),
        "confusion_normalised": normalised.round(6).tolist(),
    }


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    spec: ModelSpec,
    root: Path,
    frame: pd.DataFrame,
    *,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    tta_flip: bool = True,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Class probabilities (N x 7) for the manifest rows in `frame`."""
    transform = test_transform(spec.image_size, spec.resize, spec.mean, spec.std)
    images = ManifestImages(root, frame, transform)
    loader = DataLoader(
        images,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )
    was_training = model.training
    model.eval()
    outputs = []
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
    for batch, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = batch.to(device, non_blocking=True)
        with autocast:
            probabilities = model(batch).float().softmax(dim=1)
            if tta_flip:
                mirrored = model(batch.flip(dims=(3,))).float().softmax(dim=1)
                probabilities = (probabilities + mirrored) / 2
        outputs.append(probabilities.cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, NUM_CLASSES), np.float32)


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
