"""Inference helpers every stage shares: the device, class probabilities of manifest rows
(with flip test-time augmentation), and the metrics of a set of predictions. Beside the model
and data code they use, below the training loop and `fersynth.evaluate`, so that neither
imports the other (the loop validates with them, evaluate tests with them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fersynth.classes import CLASSES, NUM_CLASSES
from fersynth.errors import FersynthError
from fersynth.train.data import ManifestImages, test_transform
from fersynth.train.models import ModelSpec


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
