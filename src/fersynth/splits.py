"""The validation split: drawn once, from real training images, before any row trains.

Every row of the grid selects its best checkpoint on the same images, and none of them is
synthetic (DESIGN.md, "Evaluation protocol"). `fersynth ingest` draws the split when the
source has none (RAF-DB, FER2013's Training, AffectNet's training CSV) and records it in the
manifest as split `val`; quality, guard, generation and augmentation keep it as it is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, VAL_SPLIT


def draw_validation(frame: pd.DataFrame, fraction: float, seed: int) -> pd.Index:
    """The index labels of the training rows that become validation rows.

    Stratified by class: up to `fraction` of each class' training rows (at least one where a
    class has two or more, never all of them). Rows with the same decoded pixels
    (`pixel_hash`, when the manifest has it) move together or not at all, so no validation
    image has an exact copy left in training: a group larger than what is left of its class'
    share stays in training, and so does a group whose copies carry different labels. Seeded:
    the same manifest, fraction and seed give the same split, whatever the row order. Only real
    (or enhanced) rows are drawn; synthetic rows never validate.
    """
    if fraction <= 0:
        return frame.index[:0]
    train = frame[(frame["split"] == TRAIN_SPLIT) & (frame["origin"] != "synthetic")]
    groups = train["pixel_hash"] if "pixel_hash" in train.columns else train["id"]
    groups = groups.fillna("").astype(str)
    groups = groups.where(groups != "", "id:" + train["id"].astype(str))  # no hash: the row itself
    labels_per_group = train["label"].groupby(groups).nunique()
    single = groups.map(labels_per_group) == 1  # copies under one label only
    rng = np.random.default_rng([seed, 104_729])
    held: list = []
    for name in CLASSES:
        in_class = train["label"] == name
        count = int(in_class.sum())
        if count < 2:
            continue
        target = min(max(int(round(count * fraction)), 1), count - 1)
        rows = groups[in_class & single]
        members = rows.groupby(rows).groups  # key -> index labels
        taken = 0
        # Sorted keys first, so that the draw does not depend on the manifest's row order.
        for key in rng.permutation(np.array(sorted(members), dtype=object)):
            size = len(members[key])
            if taken + size > target:
                continue  # this group would overshoot the class' share
            held.extend(members[key])
            taken += size
            if taken >= target:
                break
    return train.index[train.index.isin(held)]


def has_validation(frame: pd.DataFrame) -> bool:
    return bool((frame["split"] == VAL_SPLIT).any())
