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

    Stratified by class: about `fraction` of each class' training rows (at least one where a
    class has two or more, never all of them). Rows with the same decoded pixels
    (`pixel_hash`, when the manifest has it) move together, so no validation image has an exact
    copy left in training. Seeded: the same manifest, fraction and seed give the same split.
    Only real (or enhanced) rows are drawn; synthetic rows never validate.
    """
    if fraction <= 0:
        return frame.index[:0]
    train = frame[(frame["split"] == TRAIN_SPLIT) & (frame["origin"] != "synthetic")]
    groups = train["pixel_hash"] if "pixel_hash" in train.columns else train["id"]
    groups = groups.where(groups.astype(str) != "", train["id"])  # a row without a hash: itself
    groups = groups.astype(str)
    rng = np.random.default_rng([seed, 104_729])
    held: list = []
    for name in CLASSES:
        rows = groups[train["label"] == name]
        if len(rows) < 2:
            continue
        target = min(max(int(round(len(rows) * fraction)), 1), len(rows) - 1)
        members = rows.groupby(rows).groups  # key -> index labels
        # Sorted keys first, so that the draw does not depend on the manifest's row order.
        taken = 0
        for key in rng.permutation(np.array(sorted(members), dtype=object)):
            size = len(members[key])
            if taken + size > target and taken > 0:
                continue
            held.extend(members[key])
            taken += size
            if taken >= target:
                break
    # A copy of a held image under another label goes to validation too.
    chosen = set(groups.loc[held])
    return train.index[groups.isin(chosen)]


def has_validation(frame: pd.DataFrame) -> bool:
    return bool((frame["split"] == VAL_SPLIT).any())
