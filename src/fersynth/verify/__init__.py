"""What synthetic (and training) data may be trained on.

`run_guard`: a dataset's training and validation images that copy one of its test images, or
one of another dataset's (cross-dataset test sets), are removed and listed with both paths.
`run_verify`: synthetic images are voted on by several FER models (cross-fitted: only by models
that never trained on the image's seed, when the voters hold one model per fold), rejected when
they nearly copy their own seed image, guarded against every test image, and described by a
per-class fidelity and diversity report.
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
from fersynth.files import link_or_copy, staged_folder
from fersynth.folds import fold_folder
from fersynth.memory import batch_fits
from fersynth.parallel import pins_torch_threads
from fersynth.settings import SEED_PREFIX, GuardSettings, VerifySettings, save_resolved
from fersynth.train.inference import pick_device
from fersynth.train.models import load_model
from fersynth.verify.crossfit import UNSEEDED_FOLD, image_folds, voter_folds
from fersynth.verify.fidelity import distance_to_seed, extract_features, fidelity_table
from fersynth.verify.leakage import LEAK_COLUMNS, TestImages, find_leaks, hash_images
from fersynth.verify.voting import (
    SEED_COPY_SOURCE,
    calibrated_thresholds,
    decide,
    label_indices,
    majority,
    near_copy_threshold,
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
class VoterFold:
    """The voter models that voted on one fold's synthetic images (fold None: plain voters, on
    every image), and the values those images were decided with."""

    fold: int | None
    models: dict[str, str]  # "<voter> / fold_<f>" (or the voter's name) -> model folder
    images: int  # synthetic images voted on
    without_seed: int  # of them, with no seed among the reference images (new identities)
    recognised: dict[str, bool]  # per class
    thresholds: dict[str, float]  # tau per class, calibrated on validation
    near_copy_thresholds: dict[str, float]  # per class; NaN: no threshold (nothing rejected)


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
    # Per class: recognised by the voters (of every fold), and tau (calibrated; the lowest of
    # the folds' when cross-fitted).
    recognised: dict[str, bool] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    # Whether each image was voted on only by models that never trained on its seed image.
    cross_fitted: bool = False
    # The voter models that voted on each fold's images (one entry, fold None, when not
    # cross-fitted), with the values each fold's images were decided with.
    folds: list[VoterFold] = field(default_factory=list)


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


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A manifest column as strings, empty where the manifest lacks it."""
    return frame.get(name, pd.Series("", index=frame.index)).fillna("").astype(str)


def _readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose label a data loader accepts (relabel mode may see labels that are no class
    yet; features and votes never read it)."""
    return frame.assign(label=frame["label"].where(frame["label"].isin(CLASSES), CLASSES[0]))


def _voter_names(voters: list[str]) -> list[str]:
    names = [_voter_name(v) for v in voters]
    if len(set(names)) < len(names):  # e.g. KFP artifact folders, all called `model`
        names = [f"voter {i} ({name})" for i, name in enumerate(names, start=1)]
    return names


def _per_class(values, cast=float) -> dict:
    return {name: cast(v) for name, v in zip(CLASSES, values, strict=True)}


@pins_torch_threads
def run_verify(
    settings: VerifySettings,
    guard: GuardSettings,
    *,
    seed: int,
    force: bool = False,
    progress: bool = True,
) -> VerifyResult:
    """The vote, the leakage guard and the fidelity report on a merged generated set."""
    batch = f"a batch of {settings.batch_size} images"
    with batch_fits("verify", batch, settings.device, [f"verify.batch_size (now {settings.batch_size})"]):
        return _run_verify(settings, guard, seed=seed, force=force, progress=progress)


def _run_verify(
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
    # {fold: its models} of cross-fitted voters, or {None: the voters}; a mix is an error.
    groups = voter_folds(list(settings.voters))
    cross_fitted = None not in groups
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
    frame = frame.reset_index(drop=True)

    # Each image's seed among the reference images (new identities have none), and its fold:
    # the fold of its seed image when the voters are cross-fitted (else all are one group).
    by_id = reference.manifest.drop_duplicates("id").set_index("id")
    seed_ids = _column(frame, "seed_id")
    has_seed = seed_ids.isin(by_id.index).to_numpy() & (_column(frame, "gen_kind") != "identity").to_numpy()
    exempt = (_column(frame, "source") == SEED_COPY_SOURCE).to_numpy()  # the copy-twin control
    image_fold = (
        image_folds(seed_ids, has_seed, reference.manifest, len(groups))
        if cross_fitted
        else np.full(len(frame), UNSEEDED_FOLD)
    )

    device = pick_device(settings.device)
    validation = reference.split(VAL_SPLIT)
    val_labels = label_indices(validation["label"])
    real_rows = _sample(reference.split(TRAIN_SPLIT), settings.fidelity_images_per_class, seed)

    def features(loaded, root: Path, rows: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
        return {
            name: extract_features(
                loaded, root, group, device=device, batch_size=settings.batch_size, workers=settings.workers
            )
            for name, group in rows.items()
        }

    # 2. Per fold (or once, for plain voters): what its voters recognise (each one's recall per
    # class on the real validation split, which is in no fold), the thresholds tau calibrated
    # there, the near-copy distance per class (on the fold's first voter's features), and the
    # fold's images' votes and distances to their seed images.
    names = _voter_names(list(settings.voters))
    probabilities = np.zeros((len(settings.voters), len(frame), len(CLASSES)), np.float32)
    seed_distance = np.full(len(frame), np.nan)
    fold_votes: list[VoterFold] = []
    recall_tables: list[pd.DataFrame] = []
    cached_real = {}  # the first fold's real features, reused by the fidelity report
    for fold, models in groups.items():
        rows = image_fold == (UNSEEDED_FOLD if fold is None else fold)
        vote = functools.partial(
            voter_probabilities,
            models,
            device=device,
            batch_size=settings.batch_size,
            workers=settings.workers,
            tta_flip=settings.tta_flip,
            progress=progress,
        )
        recall = np.full((len(models), len(CLASSES)), np.nan)
        thresholds = np.full(len(CLASSES), settings.min_probability)
        if not validation.empty:
            on_val = vote(reference.root, validation)
            recall = voter_recall(on_val, val_labels)
            thresholds = calibrated_thresholds(
                on_val,
                val_labels,
                min_votes=settings.min_votes,
                min_probability=settings.min_probability,
                quantile=settings.probability_quantile,
            )
        recognised = recognised_classes(recall, settings.min_votes, settings.min_recall)
        probabilities[:, rows] = vote(synthetic.root, frame[rows])

        first = load_model(models[0], device)
        near_copy = np.full(len(CLASSES), np.nan)
        if settings.near_copy_percentile is not None:
            real = features(first, reference.root, real_rows)
            if not cached_real:
                cached_real = real
            near_copy = np.array(
                [
                    near_copy_threshold(real[name], settings.near_copy_percentile) if name in real else np.nan
                    for name in CLASSES
                ]
            )
        close = rows & has_seed
        if close.any():
            own = extract_features(
                first,
                synthetic.root,
                _readable(frame[close]),
                device=device,
                batch_size=settings.batch_size,
                workers=settings.workers,
            )
            # To the seed or its mirror, whichever is nearer: a flipped copy is still a copy (GIF
            # starts every output from a randomly flipped view of its seed).
            seed_rows = by_id.loc[seed_ids[close]].reset_index()
            seed_distance[close] = np.minimum(
                *(
                    np.linalg.norm(
                        own
                        - extract_features(
                            first,
                            reference.root,
                            seed_rows,
                            device=device,
                            batch_size=settings.batch_size,
                            workers=settings.workers,
                            flip=flip,
                        ),
                        axis=1,
                    )
                    for flip in (False, True)
                )
            )
        del first

        row_names = [f"{name} / {fold_folder(fold)}" for name in names] if cross_fitted else names
        recall_tables.append(pd.DataFrame(100 * recall, index=row_names, columns=list(CLASSES)))
        fold_votes.append(
            VoterFold(
                fold=fold,
                models=dict(zip(row_names, models, strict=True)),
                images=int(rows.sum()),
                without_seed=int((rows & ~has_seed).sum()),
                recognised=_per_class(recognised, bool),
                thresholds=_per_class(np.round(thresholds, 4)),
                near_copy_thresholds=_per_class(np.round(near_copy, 4)),
            )
        )

    # 3. The vote, each fold's images decided with that fold's values.
    # relabel mode: every image's label is the voters' majority. New identities are always
    # relabelled: their prompted class is only a wish (no seed image carries a label).
    relabel = (
        np.ones(len(frame), dtype=bool)
        if settings.mode == "relabel"
        else (_column(frame, "gen_kind") == "identity").to_numpy()
    )
    if relabel.any():
        frame["v_intended"] = frame["label"]
        voted = np.array([CLASSES[k] for k in majority(probabilities)], dtype=object)
        frame["label"] = np.where(relabel, voted, frame["label"].to_numpy())
    labels = label_indices(frame["label"])
    parts = []
    for group in fold_votes:
        rows = image_fold == (UNSEEDED_FOLD if group.fold is None else group.fold)
        limits = np.array([group.near_copy_thresholds[name] for name in CLASSES])[labels]
        part = decide(
            probabilities[:, rows],
            labels[rows],
            min_votes=settings.min_votes,
            min_probability=np.array([group.thresholds[name] for name in CLASSES]),
            recognised=np.array([group.recognised[name] for name in CLASSES]),
            seed_distance=seed_distance[rows],
            copy_threshold=np.where(has_seed & ~exempt, limits, np.nan)[rows],
        )
        part.index = np.flatnonzero(rows)
        parts.append(part)
    votes = pd.concat(parts).sort_index()
    for column in votes.columns:
        frame[column] = votes[column].to_numpy()
    frame["v_accepted"] = np.where(frame["v_accepted"].astype(bool), "true", "false")
    frame["v_seed_distance"] = np.round(seed_distance, 4)
    if cross_fitted:
        frame["v_fold"] = image_fold

    # 4. Fidelity and diversity of the accepted images against the real training images, on
    # the first voter's features (its fold-0 model when cross-fitted).
    first = load_model(next(iter(groups.values()))[0], device)
    per_class = settings.fidelity_images_per_class
    # The copy twins are the control, not generated images: the generator's counts, diversity and
    # distance to seed leave them out (unless the whole set is copies: the seed-copy backend alone).
    described = frame[~exempt] if (~exempt).any() else frame
    synthetic_rows = _sample(described[described["v_accepted"] == "true"], per_class, seed)
    synthetic_features = features(first, synthetic.root, synthetic_rows)
    # Each sampled image with a seed among the real images (not a new identity), against it.
    seeded = {name: seed_ids.loc[r.index].isin(by_id.index).to_numpy() for name, r in synthetic_rows.items()}
    seed_features = features(
        first,
        reference.root,
        {
            name: by_id.loc[seed_ids.loc[rows.index][seeded[name]]].reset_index()
            for name, rows in synthetic_rows.items()
        },
    )
    table = fidelity_table(
        cached_real or features(first, reference.root, real_rows),
        synthetic_features,
        described["label"].value_counts().to_dict(),
        described.loc[described["v_accepted"] == "true", "label"].value_counts().to_dict(),
        kid_subset_size=settings.kid_subset_size,
        seed=seed,
        seed_distance={
            name: distance_to_seed(synthetic_features[name][seeded[name]], seed_features[name])
            for name in synthetic_rows
        },
    )
    recall_table = pd.concat(recall_tables).rename_axis("voter")
    # A class counts as recognised when every fold's voters recognise it; its tau is the lowest
    # of the folds' (each fold's images were decided with their own).
    result = VerifyResult(
        Path(settings.output),
        frame,
        leaks.reset_index(drop=True),
        table,
        list(settings.voters),
        unreadable,
        recall=recall_table if not validation.empty else pd.DataFrame(),
        recognised={name: all(g.recognised[name] for g in fold_votes) for name in CLASSES},
        thresholds={name: min(g.thresholds[name] for g in fold_votes) for name in CLASSES},
        cross_fitted=cross_fitted,
        folds=fold_votes,
    )
    with staged_folder(settings.output, force=force) as staging:
        _write_dataset(staging, synthetic, frame, progress)
        save_resolved({"seed": seed, "verify": settings, "guard": guard}, staging)
        write_verify_report(staging, result, settings, guard.max_distance)
    return result


__all__ = [
    "LEAK_COLUMNS",
    "SEED_COPY_SOURCE",
    "GuardResult",
    "VerifyResult",
    "VoterFold",
    "run_guard",
    "run_verify",
    "test_images",
]
