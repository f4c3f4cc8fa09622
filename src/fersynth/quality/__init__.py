"""`fersynth quality`: score every image, flag poor training images, enhance them with SwinIR.

The output is a new dataset folder: the input's images (hard-linked, not copied), the
enhanced images beside their originals, and a manifest with the scores (`q_*`), the reason an
image was flagged and what was done. Enhanced rows have origin `enhanced`, the same label and
split, and `original_path` naming the image they replace. Test images are scored for the
report but never flagged or modified.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fersynth.dataset import (
    TRAIN_SPLIT,
    ImageDecodeError,
    load_image,
    read_manifest,
    write_manifest,
)
from fersynth.errors import FersynthError
from fersynth.figures import save_png
from fersynth.files import link_or_copy, staged_folder
from fersynth.memory import batch_fits
from fersynth.parallel import imap
from fersynth.quality.report import QualityResult, write_report
from fersynth.quality.superres import SuperResolver, check_weights_exist, resize_to
from fersynth.quality_scores import SCORE_NAMES, score_file
from fersynth.settings import QualitySettings, save_resolved
from fersynth.train.inference import pick_device

SCORE_COLUMNS = [f"q_{name}" for name in SCORE_NAMES]


def combine(frame: pd.DataFrame, weights: dict[str, float]) -> pd.Series:
    """Weighted mean of each score's percentile rank within the scored rows (0 worst, 1 best)."""
    total = sum(weights.values())
    ranks = sum(
        frame[f"q_{name}"].rank(pct=True, method="average") * weight
        for name, weight in weights.items()
        if weight > 0
    )
    return ranks / total


def _working_size(train: pd.DataFrame, setting: int | None) -> tuple[int, int]:
    if setting:
        return setting, setting
    return int(train["width"].median()), int(train["height"].median())


def run_quality(settings: QualitySettings, *, force: bool = False, progress: bool = True) -> QualityResult:
    dataset = read_manifest(settings.data)
    uris = settings.sr.uris()
    check_weights_exist(uris)  # a missing weights file stops us before any work
    resolver = None
    if uris:
        resolver = SuperResolver.from_uris(
            uris,
            pick_device(settings.sr.device),
            settings.sr.batch_size,
            settings.sr.tile,
            settings.sr.precision,
        )

    frame = dataset.manifest.copy()
    paths = [str(dataset.image_path(p)) for p in frame["path"]]
    results = imap(score_file, paths, settings.workers, chunksize=256, detail_cutoff=settings.detail_cutoff)
    scores, problems = [], []
    for path, result in tqdm(
        zip(paths, results, strict=True),
        total=len(paths),
        desc="quality scores",
        unit="img",
        disable=not progress,
    ):
        if isinstance(result, str):
            problems.append((path, result))
            scores.append({name: np.nan for name in SCORE_NAMES})
        else:
            scores.append(result)
    for name in SCORE_NAMES:
        frame[f"q_{name}"] = [s[name] for s in scores]
    scored = frame[SCORE_COLUMNS].notna().all(axis=1)
    frame["q_score"] = np.nan
    frame.loc[scored, "q_score"] = combine(frame[scored], settings.weights)

    train = (frame["split"] == TRAIN_SPLIT) & scored
    if not train.any():
        raise FersynthError(f"{settings.data}: no readable training images to check")
    if settings.threshold_mode == "percentile":
        cutoff = float(np.percentile(frame.loc[train, "q_score"], settings.threshold))
    else:
        cutoff = settings.threshold
    low = train & (frame["q_score"] < cutoff)
    small = train & (frame["q_size"] < settings.min_size)
    frame["q_flag"] = np.select([small & low, small, low], ["small+low_score", "small", "low_score"], "")
    frame["q_action"] = np.where(frame["q_flag"] != "", "flagged", "kept")
    frame.loc[~scored, "q_action"] = "unreadable"
    frame["original_path"] = ""
    working = _working_size(frame[train], settings.working_size)

    with staged_folder(settings.output, force=force) as staging:
        for relative in tqdm(
            frame["path"], desc="link images", unit="img", disable=not progress, leave=False
        ):
            link_or_copy(dataset.image_path(relative), staging / relative)
        flagged = frame.index[frame["q_flag"] != ""]
        if resolver is not None and len(flagged):
            _enhance(frame, flagged, dataset.root, staging, resolver, working, problems, progress)
        elif len(flagged):
            frame.loc[flagged, "q_action"] = "flagged, not enhanced (sr.model: none)"
        write_manifest(staging, frame)
        save_resolved({"quality": settings}, staging)
        result = QualityResult(Path(settings.output), frame, cutoff, working, uris, problems)
        write_report(staging, result, settings)
    return result


def _enhance(
    frame: pd.DataFrame,
    flagged: pd.Index,
    root: Path,
    staging: Path,
    resolver: SuperResolver,
    working: tuple[int, int],
    problems: list[tuple[str, str]],
    progress: bool,
) -> None:
    """Super-resolve the flagged rows in batches; enhanced images replace them in the manifest."""
    batch_rows = max(1, resolver.batch_size) * 4
    bar = tqdm(total=len(flagged), desc="super-resolution", unit="img", disable=not progress)
    for start in range(0, len(flagged), batch_rows):
        rows = flagged[start : start + batch_rows]
        images, kept_rows = [], []
        for row in rows:
            try:
                images.append(load_image(root / frame.at[row, "path"]))
                kept_rows.append(row)
            except ImageDecodeError as exc:
                problems.append((str(root / frame.at[row, "path"]), str(exc)))
                frame.at[row, "q_action"] = "flagged, unreadable"
        needed = [max(working) / max(1, min(im.shape[:2])) for im in images]
        lower = [
            f"quality.sr.batch_size (now {resolver.batch_size})",
            f"quality.sr.tile (now {resolver.tile})",
        ]
        batch = f"a super-resolution batch of {len(images)} images"
        with batch_fits("quality", batch, resolver.device, lower):
            upscaled = resolver.upscale(images, [resolver.scale_for(f) for f in needed])
        for row, image in zip(kept_rows, upscaled, strict=True):
            original = frame.at[row, "path"]
            relative = f"{Path(original).parent.as_posix()}/{frame.at[row, 'id']}_sr.png"
            save_png(staging / relative, resize_to(image, working))
            frame.at[row, "original_path"] = original
            frame.at[row, "path"] = relative
            frame.at[row, "origin"] = "enhanced"
            frame.at[row, "width"], frame.at[row, "height"] = working
            frame.at[row, "channels"] = 3
            frame.at[row, "q_action"] = "enhanced"
        bar.update(len(rows))
    bar.close()
