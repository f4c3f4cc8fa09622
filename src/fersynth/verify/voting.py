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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fersynth.classes import CLASS_INDEX, CLASSES
from fersynth.evaluate import predict_probabilities
from fersynth.train.models import load_model

VOTE_COLUMNS = ["v_votes", "v_agree", "v_mean_prob", "v_accepted", "v_reason", "v_rejected_by"]
# Why an image was rejected, as codes in `v_rejected_by` (joined by "|"; empty when accepted).
# `v_reason` says the same for a person; counts are taken from the codes, never from it.
TOO_FEW_VOTES = "votes"  # fewer than min_votes voters predict the label
LOW_PROBABILITY = "probability"  # the voters' mean probability of the label is below min_probability
UNRECOGNISED = "unrecognised"  # too few voters recognise the class on validation (min_recall)
REJECTION_CODES = (TOO_FEW_VOTES, LOW_PROBABILITY, UNRECOGNISED)
CODE_SEPARATOR = "|"


def rejection_labels(
    voters: int, min_votes: int, min_probability: float, min_recall: float = 0.0
) -> dict[str, str]:
    """Each rejection code as a person reads it, for counts in reports."""
    return {
        TOO_FEW_VOTES: f"too few of {voters} voters agree (need {min_votes})",
        LOW_PROBABILITY: f"mean probability below its class' threshold (at most {min_probability:.2f})",
        UNRECOGNISED: f"fewer than {min_votes} voters recall {min_recall:.0%} of the class on validation",
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
) -> pd.DataFrame:
    """Per image: each voter's vote, how many agree with `labels` (class indices), their mean
    probability of it, accepted or not, and why not: as a sentence (`v_reason`) and as codes
    (`v_rejected_by`, REJECTION_CODES joined by "|")."""
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
    codes, reasons = [], []
    for label, count, probability, threshold, few, weak, unseen in zip(
        labels, agree, mean_probability, tau, too_few, low, blind, strict=True
    ):
        problems = []
        if few:
            problems.append(f"{count} of {voters} voters agree (need {min_votes})")
        if weak:
            problems.append(f"mean probability {probability:.2f} < {threshold:.2f}")
        if unseen:
            problems.append(f"the voters do not recognise {CLASSES[label]} on validation")
        reasons.append("; ".join(problems))
        flags = (few, weak, unseen)
        codes.append(CODE_SEPARATOR.join(c for c, on in zip(REJECTION_CODES, flags, strict=True) if on))
    return pd.DataFrame(
        {
            "v_votes": [",".join(CLASSES[k] for k in votes[:, i]) for i in range(n)],
            "v_agree": agree.astype(int),
            "v_mean_prob": np.round(mean_probability, 4),
            "v_accepted": ~(too_few | low | blind),
            "v_reason": reasons,
            "v_rejected_by": codes,
        },
        columns=VOTE_COLUMNS,
    )


def label_indices(labels: pd.Series) -> np.ndarray:
    return np.array([CLASS_INDEX[label] for label in labels], dtype=np.int64)
