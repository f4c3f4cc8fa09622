"""`fersynth predict`: class and probabilities for an image or every image in a folder.

Photos that are not aligned face crops can be cropped to the largest detected face first
(scikit-image's bundled LBP frontal-face cascade; no download needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fersynth.classes import CLASSES
from fersynth.dataset import MANIFEST_NAME, ImageDecodeError, load_image, read_manifest
from fersynth.errors import FersynthError
from fersynth.memory import batch_fits
from fersynth.train.data import test_transform
from fersynth.train.inference import pick_device
from fersynth.train.models import LoadedModel, load_model

FACE_MARGIN = 0.2  # widen the detected box: the cascade's box is tight around the features


@cache
def _face_detector():
    from skimage import data
    from skimage.feature import Cascade

    return Cascade(data.lbp_frontal_face_cascade_filename())


def crop_face(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """The largest frontal face (with a margin), or the whole image when none is found."""
    height, width = pixels.shape[:2]
    smallest = max(24, min(height, width) // 10)
    faces = _face_detector().detect_multi_scale(
        img=pixels, scale_factor=1.2, step_ratio=1, min_size=(smallest, smallest),
        max_size=(height, width),
    )  # fmt: skip
    if not faces:
        return pixels, False
    face = max(faces, key=lambda f: f["width"] * f["height"])
    pad_w, pad_h = int(face["width"] * FACE_MARGIN), int(face["height"] * FACE_MARGIN)
    top, left = max(0, face["r"] - pad_h), max(0, face["c"] - pad_w)
    bottom = min(height, face["r"] + face["height"] + pad_h)
    right = min(width, face["c"] + face["width"] + pad_w)
    return pixels[top:bottom, left:right], True


@dataclass(frozen=True)
class Target:
    """One file to predict: its path, why it is not read ("" when it is), and its label when
    the folder is a fersynth dataset ("" otherwise)."""

    path: Path
    problem: str = ""
    label: str = ""


def list_images(target: Path) -> list[Target]:
    """Every file to predict, sorted.

    - An image file: itself.
    - A fersynth dataset folder (`manifest.csv` at its top): the images its manifest lists, with
      their labels; the manifest, reports and figures beside them are not images of the set.
      A manifest path that leaves the folder is refused by `dataset.safe_join`.
    - Any other folder: every file under it, the format read from the file's content, never its
      name (`.jfif`, `.JPG`, no extension), so every file is predicted or reported; a link that
      leaves the folder and a broken link are reported, not followed.

    Raises FersynthError for a missing target, an empty folder or an invalid manifest.
    """
    target = Path(target)
    if target.is_file():
        return [Target(target)]
    if not target.is_dir():
        raise FersynthError(f"{target}: no such image or folder")
    if (target / MANIFEST_NAME).is_file():
        return _dataset_images(target)
    root = target.resolve()
    found: list[Target] = []
    for path in sorted(target.rglob("*")):
        if path.is_symlink():
            try:
                resolved = path.resolve(strict=True)
            except (OSError, RuntimeError):
                found.append(Target(path, "a broken link (its target does not exist) or a link loop"))
                continue
            if not resolved.is_relative_to(root):
                found.append(Target(path, "a link that leads outside the folder: not followed"))
                continue
            if resolved.is_dir():
                continue  # its files are listed where they lie, inside the folder
        elif path.is_dir():
            continue
        found.append(Target(path))
    if not found:
        raise FersynthError(f"{target}: no files")
    return found


def _dataset_images(folder: Path) -> list[Target]:
    dataset = read_manifest(folder)
    found: list[Target] = []
    for relative, label in zip(dataset.manifest["path"], dataset.manifest["label"], strict=True):
        try:
            found.append(Target(dataset.image_path(relative), label=label))
        except FersynthError as exc:
            found.append(Target(folder / relative, str(exc), label))
    if not found:
        raise FersynthError(f"{folder / MANIFEST_NAME}: lists no images")
    return found


@dataclass
class Predictor:
    loaded: LoadedModel
    device: torch.device
    tta_flip: bool = True

    @classmethod
    def from_uri(cls, uri: str, device: str = "auto", tta_flip: bool = True) -> Predictor:
        torch_device = pick_device(device)
        if uri.startswith(("models:/", "runs:/")):  # the MLflow Model Registry or a run
            from fersynth.tracking import download_model

            uri = str(download_model(uri))
        return cls(load_model(uri, torch_device), torch_device, tta_flip)

    @torch.inference_mode()
    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        spec = self.loaded.spec
        transform = test_transform(spec.image_size, spec.resize, spec.mean, spec.std)
        batch = torch.stack([transform(torch.from_numpy(np.array(im)).permute(2, 0, 1))
                             for im in images]).to(self.device)  # fmt: skip
        model = self.loaded.model
        probs = model(batch).float().softmax(dim=1)
        if self.tta_flip:
            probs = (probs + model(batch.flip(dims=(3,))).float().softmax(dim=1)) / 2
        return probs.cpu().numpy()


def predict(
    target: Path,
    predictor: Predictor,
    *,
    face_crop: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per file (`list_images`): path, the label when `target` is a fersynth dataset,
    predicted class, confidence, probabilities; a file that is not a readable image gets the
    reason in `error` instead."""
    files = list_images(target)
    rows: list[dict] = []
    pending: list[tuple[dict, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        batch = f"a batch of {len(pending)} images at {predictor.loaded.spec.image_size} px"
        with batch_fits("predict", batch, predictor.device, [f"--batch-size (now {batch_size})"]):
            probs = predictor.probabilities([pixels for _, pixels in pending])
        for (row, _), p in zip(pending, probs, strict=True):
            row["predicted"] = CLASSES[int(p.argmax())]
            row["confidence"] = round(float(p.max()), 6)
            row.update({f"p_{name}": round(float(v), 6) for name, v in zip(CLASSES, p, strict=True)})
        pending.clear()

    labelled = any(file.label for file in files)
    for file in tqdm(files, desc="predict", unit="file", disable=not progress or len(files) < 2):
        row: dict = {"path": str(file.path), "predicted": "", "confidence": np.nan, "error": file.problem}
        if labelled:
            row["label"] = file.label
        rows.append(row)
        if file.problem:
            continue
        try:
            pixels = load_image(file.path)
        except ImageDecodeError as exc:
            row["error"] = str(exc)
            continue
        if face_crop:
            pixels, row["face_found"] = crop_face(pixels)
        pending.append((row, pixels))
        if len(pending) >= batch_size:
            flush()
    flush()
    columns = ["path", "predicted", "confidence", *[f"p_{c}" for c in CLASSES], "error"]
    if face_crop:
        columns.insert(3, "face_found")
    if labelled:
        columns.insert(1, "label")
    return pd.DataFrame(rows).reindex(columns=columns)
