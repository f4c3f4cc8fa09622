"""What synthetic (and training) data may be trained on.

`run_guard`: a dataset's training and validation images that copy one of its test images, or
one of another dataset's (cross-dataset test sets), are removed and listed with both paths.
`run_verify`: synthetic images are voted on by several FER models, guarded against every
test image, and described by a per-class fidelity and diversity report.
Both write a new dataset folder (images hard-linked); the input is never modified.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fersynth.classes import CLASSES
from fersynth.dataset import (
    TRAIN_SPLIT,
    VAL_SPLIT,
    Dataset,
    is_evaluation_split,
    read_manifest,
    write_manifest,
)
from fersynth.errors import FersynthError
from fersynth.evaluate import pick_device
from fersynth.files import link_or_copy, staged_folder
from fersynth.parallel import pins_torch_threads
from fersynth.settings import SEED_PREFIX, GuardSettings, VerifySettings, save_resolved
from fersynth.train.models import load_model
from fersynth.verify.fidelity import distance_to_seed, extract_features, fidelity_table
from fersynth.verify.leakage import LEAK_COLUMNS, TestImages, find_leaks, hash_images
from fersynth.verify.voting import (
    calibrated_thresholds,
    decide,
    label_indices,
    majority,
    recognised_classes,
    voter_probabilities,
    voter_recall,
)


@dataclass
class GuardResult:
    output: Path
    manifest: pd.DataFrame  # what was kept
    leaks: pd.DataFrame  # what was removed, LEAK_COLUMNS
    tests: list[str] = field(default_factory=list)  # "<dataset>/<split> (<n> images)"
    unreadable: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class VerifyResult:
    output: Path
    manifest: pd.DataFrame  # every synthetic image that is not a leak, with the v_* columns
    leaks: pd.DataFrame
    fidelity: pd.DataFrame
    voters: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    # Each voter's recall per class on the real validation split (%): voters x classes; empty
    # when the reference data has no val split.
    recall: pd.DataFrame = field(default_factory=pd.DataFrame)
    recognised: dict[str, bool] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # tau per class (calibrated)


def test_images(datasets: list[Dataset], *, workers: int, progress: bool) -> list[TestImages]:
    """The evaluation splits of each dataset, hashed."""
    tests = []
    for dataset in datasets:
        frame = dataset.manifest
        for split in sorted(s for s in frame["split"].unique() if is_evaluation_split(s)):
            rows = frame[frame["split"] == split]
            name = f"{dataset.root.name}/{split}"
            hashes = hash_images(dataset.root, rows, workers=workers, progress=progress, desc=f"hash {name}")
            tests.append(TestImages(name, dataset.root, rows, hashes))
    return tests


def _write_dataset(staging: Path, source: Dataset, frame: pd.DataFrame, progress: bool) -> None:
    for relative in tqdm(frame["path"], desc="link images", unit="img", disable=not progress, leave=False):
        link_or_copy(source.image_path(relative), staging / relative)
    write_manifest(staging, frame)


def _unreadable(frame: pd.DataFrame, hashes: pd.DataFrame) -> list[tuple[str, str]]:
    bad = hashes["error"] != ""
    return list(zip(frame.loc[bad[bad].index, "path"], hashes.loc[bad, "error"], strict=True))


def run_guard(settings: GuardSettings, *, force: bool = False, progress: bool = True) -> GuardResult:
    from fersynth.verify.report import write_guard_report

    dataset = read_manifest(settings.data)
    others = [read_manifest(path) for path in settings.test_sets]
    tests = test_images([dataset, *others], workers=settings.workers, progress=progress)
    if not tests:
        raise FersynthError(f"{settings.data}: no test split to guard against (and no guard.test_sets)")
    frame = dataset.manifest
    candidates = frame[~frame["split"].map(is_evaluation_split)]
    hashes = hash_images(dataset.root, candidates, workers=settings.workers, progress=progress, desc="hash")
    leaks = find_leaks(
        dataset.root, candidates, hashes, tests, settings.max_distance, settings.min_correlation
    )
    kept = frame.drop(index=leaks.index).reset_index(drop=True)
    result = GuardResult(
        Path(settings.output),
        kept,
        leaks.reset_index(drop=True),
        [f"{t.name} ({len(t.frame)} images)" for t in tests],
        _unreadable(candidates, hashes),
    )
    with staged_folder(settings.output, force=force) as staging:
        _write_dataset(staging, dataset, kept, progress)
        save_resolved({"guard": settings}, staging)
        write_guard_report(staging, result, settings)
    return result


def _sample(frame: pd.DataFrame, per_class: int, seed: int) -> dict[str, pd.DataFrame]:
    return {
        name: group.sample(n=min(per_class, len(group)), random_state=seed)
        for name, group in frame.groupby("label")
        if name in CLASSES
    }


def _voter_name(uri: str) -> str:
    """A voter's short name for tables: its folder (`.../voters/voter_1` -> voter_1)."""
    path = Path(uri)
    path = path.parent if path.suffix else path
    return f"{path.parent.name}/{path.name}" if path.name.startswith(SEED_PREFIX) else path.name


@pins_torch_threads
def run_verify(
    settings: VerifySettings,
    guard: GuardSettings,
    *,
    seed: int,
    force: bool = False,
    progress: bool = True,
) -> VerifyResult:
    from fersynth.verify.report import write_verify_report

    if not settings.voters:
        raise FersynthError("verify.voters: at least one voter model is needed")
    if settings.min_votes > len(settings.voters):
        raise FersynthError(
            f"verify.min_votes = {settings.min_votes}: more than the {len(settings.voters)} voters"
        )
    synthetic = read_manifest(settings.data)
    reference = read_manifest(settings.reference)
    frame = synthetic.manifest[synthetic.manifest["split"] == TRAIN_SPLIT]
    if frame.empty:
        raise FersynthError(f"{settings.data}: no training rows to verify")

    # 1. The guard: synthetic images that copy any test image are dropped before voting.
    others = [read_manifest(path) for path in guard.test_sets]
    tests = test_images([reference, *others], workers=guard.workers, progress=progress)
    hashes = hash_images(synthetic.root, frame, workers=guard.workers, progress=progress, desc="hash")
    unreadable = _unreadable(frame, hashes)
    leaks = find_leaks(synthetic.root, frame, hashes, tests, guard.max_distance, guard.min_correlation)
    frame = frame.drop(index=leaks.index)
    frame = frame.drop(index=hashes.index[(hashes["error"] != "") & hashes.index.isin(frame.index)])

    # 2. What the voters recognise: each one's recall per class on the real validation split.
    device = pick_device(settings.device)
    validation = reference.split(VAL_SPLIT)
    recall = np.full((len(settings.voters), len(CLASSES)), np.nan)
    thresholds = np.full(len(CLASSES), settings.min_probability)
    vote = functools.partial(
        voter_probabilities,
        settings.voters,
        device=device,
        batch_size=settings.batch_size,
        workers=settings.workers,
        tta_flip=settings.tta_flip,
        progress=progress,
    )
    if not validation.empty:
        on_val = vote(reference.root, validation)
        val_labels = label_indices(validation["label"])
        recall = voter_recall(on_val, val_labels)
        thresholds = calibrated_thresholds(
            on_val,
            val_labels,
            min_votes=settings.min_votes,
            min_probability=settings.min_probability,
            quantile=settings.probability_quantile,
        )
    recognised = recognised_classes(recall, settings.min_votes, settings.min_recall)

    # 3. The vote.
    probabilities = vote(synthetic.root, frame)
    frame = frame.reset_index(drop=True)
    # relabel mode: every image's label is the voters' majority. New identities are always
    # relabelled: their prompted class is only a wish (no seed image carries a label).
    relabel = (
        np.ones(len(frame), dtype=bool)
        if settings.mode == "relabel"
        else (frame.get("gen_kind", pd.Series("", index=frame.index)) == "identity").to_numpy()
    )
    if relabel.any():
        frame["v_intended"] = frame["label"]
        voted = np.array([CLASSES[k] for k in majority(probabilities)], dtype=object)
        frame["label"] = np.where(relabel, voted, frame["label"].to_numpy())
    votes = decide(
        probabilities,
        label_indices(frame["label"]),
        min_votes=settings.min_votes,
        min_probability=thresholds,
        recognised=recognised,
    )
    for column in votes.columns:
        frame[column] = votes[column].to_numpy()
    frame["v_accepted"] = np.where(frame["v_accepted"], "true", "false")

    # 4. Fidelity and diversity of the accepted images against the real training images.
    first = load_model(settings.voters[0], device)
    per_class = settings.fidelity_images_per_class
    real_rows = _sample(reference.split(TRAIN_SPLIT), per_class, seed)
    synthetic_rows = _sample(frame[frame["v_accepted"] == "true"], per_class, seed)

    def features(root: Path, rows: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
        return {
            name: extract_features(
                first, root, group, device=device, batch_size=settings.batch_size, workers=settings.workers
            )
            for name, group in rows.items()
        }

    synthetic_features = features(synthetic.root, synthetic_rows)
    # Each sampled image with a seed among the real images (not a new identity), against it.
    by_id = reference.manifest.drop_duplicates("id").set_index("id")
    seed_ids = frame.get("seed_id", pd.Series("", index=frame.index)).fillna("").astype(str)
    seeded = {name: seed_ids.loc[r.index].isin(by_id.index).to_numpy() for name, r in synthetic_rows.items()}
    seed_features = features(
        reference.root,
        {
            name: by_id.loc[seed_ids.loc[rows.index][seeded[name]]].reset_index()
            for name, rows in synthetic_rows.items()
        },
    )
    table = fidelity_table(
        features(reference.root, real_rows),
        synthetic_features,
        frame["label"].value_counts().to_dict(),
        frame.loc[frame["v_accepted"] == "true", "label"].value_counts().to_dict(),
        kid_subset_size=settings.kid_subset_size,
        seed=seed,
        seed_distance={
            name: distance_to_seed(synthetic_features[name][seeded[name]], seed_features[name])
            for name in synthetic_rows
        },
    )
    names = [_voter_name(v) for v in settings.voters]
    if len(set(names)) < len(names):  # e.g. KFP artifact folders, all called `model`
        names = [f"voter {i} ({name})" for i, name in enumerate(names, start=1)]
    recall_table = pd.DataFrame(100 * recall, index=names, columns=list(CLASSES)).rename_axis("voter")
    result = VerifyResult(
        Path(settings.output),
        frame,
        leaks.reset_index(drop=True),
        table,
        list(settings.voters),
        unreadable,
        recall=recall_table if not validation.empty else pd.DataFrame(),
        recognised=dict(zip(CLASSES, (bool(v) for v in recognised), strict=True)),
        thresholds=dict(zip(CLASSES, (round(float(v), 4) for v in thresholds), strict=True)),
    )
    with staged_folder(settings.output, force=force) as staging:
        _write_dataset(staging, synthetic, frame, progress)
        save_resolved({"seed": seed, "verify": settings, "guard": guard}, staging)
        write_verify_report(staging, result, settings, guard.max_distance)
    return result


__all__ = ["LEAK_COLUMNS", "GuardResult", "VerifyResult", "run_guard", "run_verify", "test_images"]
