"""Cross-fitting folds of a training split, by seed image (DESIGN.md, "Evaluation protocol").

A generated image must be judged only by voters that never trained on its seed image. The
training split is cut into `folds` folds; the voters are trained once per fold, each time
without that fold (`<voter folder>/fold_<f>/`), and an image generated from a seed in fold f
is voted on by the fold-f models only.

Copies of one image stay together: the fold is a hash of the decoded pixels (`pixel_hash`,
written by ingest) where the manifest has them, else of the id, so that a duplicate row of a
seed image (FER2013 has hundreds) cannot sit in a voter's training data while its twin is
judged. The hash does not depend on the run's seed, the row order or the other rows, so
every stage that asks (training, the vote, the report) gets the same fold for an image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

FOLD_PREFIX = "fold_"


def fold_folder(fold: int) -> str:
    """`fold_<f>`: the folder of the models trained without fold f."""
    return f"{FOLD_PREFIX}{fold}"


def _key(row_hash: str, row_id: str) -> str:
    return row_hash if row_hash else row_id


def fold_of(frame: pd.DataFrame, folds: int) -> np.ndarray:
    """Each row's fold in [0, folds) (N,), from its pixel hash (else its id).

    Raises ValueError for folds < 1."""
    if folds < 1:
        raise ValueError(f"folds = {folds}: must be at least 1")
    if frame.empty:
        return np.zeros(0, dtype=np.int64)
    ids = frame["id"].astype(str)
    hashes = (
        frame["pixel_hash"].fillna("").astype(str)
        if "pixel_hash" in frame
        else pd.Series("", index=frame.index)
    )
    keys = [_key(h, i) for h, i in zip(hashes, ids, strict=True)]
    return np.array(
        [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little") % folds for k in keys],
        dtype=np.int64,
    )


def fold_models(voter: str | Path) -> dict[int, Path]:
    """{fold: model folder} of a cross-fitted voter (`fold_<f>` sub-folders); {} for a voter
    trained on the whole training split (a plain model folder or file)."""
    folder = Path(voter)
    if not folder.is_dir():
        return {}
    found = {}
    for child in folder.glob(f"{FOLD_PREFIX}*"):
        suffix = child.name.removeprefix(FOLD_PREFIX)
        if child.is_dir() and suffix.isdigit():
            found[int(suffix)] = child
    return dict(sorted(found.items()))
