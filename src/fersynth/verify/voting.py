"""Multi-model voting on synthetic images (thesis 3.3.2).

N voters (FER models trained on the original data) each predict every image, with
horizontal-flip test-time augmentation. In `intended` mode an image is accepted when at least
`min_votes` voters predict its intended label and the voters' mean probability of that label
is at least `min_probability`. In `relabel` mode (images with no intended label, such as new
identities from prompts) the label becomes the voters' majority and the same two thresholds
apply to it.

A vote means something only for a class its voters recognise: each voter's recall of each class
on the real validation split is measured first, and a class that fewer than `min_votes` voters
recall at least `min_recall` of cannot be verified; its images are rejected with that reason
(code `unrecognised`), so a report never blames the images for blind voters.

An expansion or edit that its generator barely changed is no new data: an image whose distance
to its own seed image, in the voters' feature space, is below its class' near-copy threshold is
rejected as a near copy (code `near_copy`). The threshold is calibrated on real images: a low
percentile of the real training images' nearest-neighbour distances within the class
(`near_copy_threshold`), so that an image counts as a copy only when it is closer to its seed
than almost any real face of the class is to its nearest real neighbour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fersynth.classes import CLASS_INDEX, CLASSES
from fersynth.train.inference import predict_probabilities
from fersynth.train.models import load_model

VOTE_COLUMNS = ["v_votes", "v_agree", "v_mean_prob", "v_accepted", "v_reason", "v_rejected_by"]
# Why an image was rejected, as codes in `v_rejected_by` (joined by "|"; empty when accepted).
# `v_reason` says the same for a person; counts are taken from the codes, never from it.
TOO_FEW_VOTES = "votes"  # fewer than min_votes voters predict the label
LOW_PROBABILITY = "probability"  # the voters' mean probability of the label is below min_probability
UNRECOGNISED = "unrecognised"  # too few voters recognise the class on validation (min_recall)
NEAR_COPY = "near_copy"  # closer to its own seed image than the class' near-copy threshold
VOTE_CODES = (TOO_FEW_VOTES, LOW_PROBABILITY, UNRECOGNISED)  # the vote's own rules
REJECTION_CODES = (*VOTE_CODES, NEAR_COPY)  # and the seed-distance check
CODE_SEPARATOR = "|"
# The manifest `source` of the copy-twin control's images (the null generator writes each seed
# view unchanged): never rejected as near copies of their seeds, which they are by design.
SEED_COPY_SOURCE = "seed-copy"


def rejection_labels(
    voters: int,
    min_votes: int,
    min_probability: float,
    min_recall: float = 0.0,
    near_copy_percentile: float | None = None,
) -> dict[str, str]:
    """Each rejection code as a person reads it, for counts in reports."""
    percentile = (
        f" (closer than the {near_copy_percentile:g}th percentile of real nearest-neighbour "
        "distances in its class)"
        if near_copy_percentile is not None
        else ""
    )
    return {
        TOO_FEW_VOTES: f"too few of {voters} voters agree (need {min_votes})",
        LOW_PROBABILITY: f"mean probability below its class' threshold (at most {min_probability:.2f})",
        UNRECOGNISED: f"fewer than {min_votes} voters recall {min_recall:.0%} of the class on validation",
        NEAR_COPY: f"a near copy of its seed image{percentile}",
    }


def voter_recall(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each voter's recall of each class: V x classes, NaN for a class without images.

    `probabilities`: V x N x classes on labelled (validation) images; `labels`: N class indices."""
    votes = probabilities.argmax(axis=2)
    recall = np.full((probabilities.shape[0], len(CLASSES)), np.nan)
    for k in range(len(CLASSES)):
        rows = labels == k
        if rows.any():
            recall[:, k] = (votes[:, rows] == k).mean(axis=1)
    return recall


def calibrated_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    min_votes: int,
    min_probability: float,
    quantile: float | None,
    min_images: int = 3,
) -> np.ndarray:
    """The mean-probability threshold tau of each class (classes), calibrated on labelled real
    (validation) images: `min_probability`, lowered for a class to the `quantile` of the voters'
    mean probability of it over the class' validation images that at least `min_votes` voters
    get right, so that a synthetic image needs no more confidence than the voters show on real
    images of its class. A class with fewer than `min_images` such images, or `quantile` None,
    keeps `min_probability`.

    `probabilities`: V x N x classes; `labels`: N class indices."""
    thresholds = np.full(len(CLASSES), float(min_probability))
    if quantile is None or probabilities.shape[1] == 0:
        return thresholds
    n = probabilities.shape[1]
    mean = probabilities.mean(axis=0)[np.arange(n), labels]
    agree = (probabilities.argmax(axis=2) == labels[None, :]).sum(axis=0)
    for k in range(len(CLASSES)):
        rows = (labels == k) & (agree >= min_votes)
        if rows.sum() >= min_images:
            thresholds[k] = min(min_probability, float(np.quantile(mean[rows], quantile)))
    return thresholds


def nearest_neighbour_distances(features: np.ndarray) -> np.ndarray:
    """Each row's Euclidean distance to its nearest other row (N,) of an N x D feature array
    (N >= 2); a duplicate row counts as a neighbour at distance 0."""
    x = np.asarray(features, dtype=np.float64)
    squared = (x * x).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(distances, np.inf)  # never its own neighbour
    return np.sqrt(np.clip(distances.min(axis=1), 0.0, None))


def near_copy_threshold(features: np.ndarray, percentile: float, min_images: int = 3) -> float:
    """The near-copy distance of a class: the `percentile` (0-100, linear interpolation) of its
    real images' nearest-neighbour distances (`features`: N x D, one class); NaN (no threshold:
    nothing is a near copy) with fewer than `min_images` images."""
    if len(features) < max(min_images, 2):
        return float("nan")
    return float(np.percentile(nearest_neighbour_distances(features), percentile))


def recognised_classes(recall: np.ndarray, min_votes: int, min_recall: float) -> np.ndarray:
    """Per class: whether at least `min_votes` voters recall at least `min_recall` of it (a
    class without validation images counts as recognised: nothing says otherwise)."""
    seen = np.isnan(recall).all(axis=0)
    return seen | ((np.nan_to_num(recall, nan=0.0) >= min_recall).sum(axis=0) >= min_votes)


def voter_probabilities(
    voters: list[str],
    root: Path,
    frame: pd.DataFrame,
    *,
    device: torch.device,
    batch_size: int,
    workers: int,
    tta_flip: bool,
    progress: bool = False,
) -> np.ndarray:
    """Probabilities of every voter for every row: V x N x classes."""
    if frame.empty:
        return np.zeros((len(voters), 0, len(CLASSES)), np.float32)
    # Relabel mode may see rows whose label is not a class yet; the voters never read it.
    rows = frame.assign(label=frame["label"].where(frame["label"].isin(CLASSES), CLASSES[0]))
    outputs = []
    for number, uri in enumerate(voters, start=1):
        loaded = load_model(uri, device)
        with torch.inference_mode():
            outputs.append(
                predict_probabilities(
                    loaded.model.to(device),
                    loaded.spec,
                    root,
                    rows,
                    batch_size=batch_size,
                    device=device,
                    workers=workers,
                    tta_flip=tta_flip,
                    progress=progress,
                    desc=f"voter {number}/{len(voters)}",
                )
            )
        del loaded
    return np.stack(outputs)


def majority(probabilities: np.ndarray) -> np.ndarray:
    """Each image's majority-vote class; ties go to the class with the higher mean probability."""
    votes = probabilities.argmax(axis=2)  # V x N
    counts = np.stack([(votes == k).sum(axis=0) for k in range(probabilities.shape[2])], axis=1)
    mean = probabilities.mean(axis=0)
    # Vote counts dominate; the mean probability (< 1) only breaks ties.
    return (counts + mean).argmax(axis=1)


def decide(
    probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    min_votes: int,
    min_probability: float | np.ndarray,
    recognised: np.ndarray | None = None,
    seed_distance: np.ndarray | None = None,
    copy_threshold: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per image: each voter's vote, how many agree with `labels` (class indices), their mean
    probability of it, accepted or not, and why not: as a sentence (`v_reason`) and as codes
    (`v_rejected_by`, REJECTION_CODES joined by "|").

    `seed_distance` and `copy_threshold` (N each, NaN where there is none: no seed, no
    threshold for the class, or an image exempt from the check): an image closer to its seed
    than its threshold is a near copy."""
    votes = probabilities.argmax(axis=2)  # V x N
    n = votes.shape[1]
    agree = (votes == labels[None, :]).sum(axis=0)
    mean_probability = probabilities.mean(axis=0)[np.arange(n), labels] if n else np.zeros(0)
    voters = probabilities.shape[0]
    too_few = agree < min_votes
    # One threshold for all, or one per class (calibrated_thresholds), read at each image's label.
    tau = (
        np.broadcast_to(np.asarray(min_probability, dtype=float), (len(CLASSES),))[labels]
        if n
        else np.zeros(0)
    )
    low = mean_probability < tau
    blind = ~recognised[labels] if recognised is not None else np.zeros(n, dtype=bool)
    distance = np.full(n, np.nan) if seed_distance is None else np.asarray(seed_distance, dtype=float)
    limit = np.full(n, np.nan) if copy_threshold is None else np.asarray(copy_threshold, dtype=float)
    copy = distance < limit  # False wherever either is NaN
    codes, reasons = [], []
    for label, count, probability, threshold, few, weak, unseen, near, d, d_max in zip(
        labels, agree, mean_probability, tau, too_few, low, blind, copy, distance, limit, strict=True
    ):
        problems = []
        if few:
            problems.append(f"{count} of {voters} voters agree (need {min_votes})")
        if weak:
            problems.append(f"mean probability {probability:.2f} < {threshold:.2f}")
        if unseen:
            problems.append(f"the voters do not recognise {CLASSES[label]} on validation")
        if near:
            problems.append(f"a near copy of its seed image (feature distance {d:.3f} < {d_max:.3f})")
        reasons.append("; ".join(problems))
        flags = (few, weak, unseen, near)
        codes.append(CODE_SEPARATOR.join(c for c, on in zip(REJECTION_CODES, flags, strict=True) if on))
    return pd.DataFrame(
        {
            "v_votes": [",".join(CLASSES[k] for k in votes[:, i]) for i in range(n)],
            "v_agree": agree.astype(int),
            "v_mean_prob": np.round(mean_probability, 4),
            "v_accepted": ~(too_few | low | blind | copy),
            "v_reason": reasons,
            "v_rejected_by": codes,
        },
        columns=VOTE_COLUMNS,
    )


def label_indices(labels: pd.Series) -> np.ndarray:
    return np.array([CLASS_INDEX[label] for label in labels], dtype=np.int64)
