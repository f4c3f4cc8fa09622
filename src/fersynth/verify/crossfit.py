"""Which voter models judge which synthetic image (DESIGN.md, "Evaluation protocol").

A cross-fitted voter holds one model per fold of the training split (`<voter>/fold_<f>/`,
fersynth.folds), each trained without that fold's images. A synthetic image belongs to the fold
of its seed image, and only the fold's models vote on it, so no voter has trained on the image
it judges. Images with no seed among the reference images (new identities) belong to fold 0.
Voters without fold models trained on the whole training split: they saw the seeds.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fersynth.errors import FersynthError
from fersynth.folds import fold_folder, fold_models, fold_of

UNSEEDED_FOLD = 0  # the fold whose models vote on images without a seed among the reference images


def voter_folds(voters: list[str]) -> dict[int | None, list[str]]:
    """{fold: the voters' models of that fold, in voter order} when every voter is cross-fitted
    with the same folds 0..n-1; {None: voters} when none is.

    Raises FersynthError (one line, naming the voters) for a mix of cross-fitted and plain
    voters, voters with different folds, or folds that are not 0..n-1."""
    found = {voter: fold_models(voter) for voter in voters}
    folded = [voter for voter in voters if found[voter]]
    if not folded:
        return {None: list(voters)}
    plain = [voter for voter in voters if not found[voter]]
    if plain:
        raise FersynthError(
            f"verify.voters: cross-fitted voters ({', '.join(folded)}: fold_<f> models) mixed with "
            f"plain ones ({', '.join(plain)}): all voters or none must hold fold models"
        )

    def names(voter: str) -> str:
        return ", ".join(fold_folder(f) for f in found[voter])

    if len({tuple(found[voter]) for voter in voters}) > 1:
        held = "; ".join(f"{voter}: {names(voter)}" for voter in voters)
        raise FersynthError(
            f"verify.voters: the voters hold different folds ({held}): all must hold the same"
        )
    folds = list(found[voters[0]])
    if folds != list(range(len(folds))):
        raise FersynthError(
            f"verify.voters: fold models {names(voters[0])} in {', '.join(voters)}: expected "
            f"{fold_folder(0)} to {fold_folder(len(folds) - 1)}"
        )
    for voter in voters:  # each fold model must have been trained without its fold, of these folds
        for fold, folder in found[voter].items():
            saved = folder / "settings.json"
            if not saved.is_file():
                continue
            trained = (json.loads(saved.read_text()).get("train") or {}).get("fold")
            if trained is not None and list(trained) != [fold, len(folds)]:
                raise FersynthError(
                    f"{folder}: trained without fold {trained[0]} of {trained[1]}, but the voter "
                    f"holds {len(folds)} folds (a stale fold folder?); retrain the voters "
                    "(`fersynth train --voters --force`)"
                )
    return {fold: [str(found[voter][fold]) for voter in voters] for fold in folds}


def image_folds(seed_ids: pd.Series, has_seed: np.ndarray, reference: pd.DataFrame, folds: int) -> np.ndarray:
    """Each synthetic image's fold (N,): its seed image's fold among the `reference` manifest
    rows (fersynth.folds.fold_of, by pixel hash), UNSEEDED_FOLD where `has_seed` is False.

    `seed_ids`: each image's seed id (N); `has_seed`: whether that id is a reference row."""
    rows = reference.drop_duplicates("id")
    by_id = pd.Series(fold_of(rows, folds), index=rows["id"].astype(str).to_numpy())
    seeded = by_id.reindex(seed_ids.astype(str).to_numpy()).to_numpy()
    return np.where(has_seed, np.nan_to_num(seeded, nan=UNSEEDED_FOLD), UNSEEDED_FOLD).astype(np.int64)
