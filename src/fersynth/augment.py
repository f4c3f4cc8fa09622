"""Thesis Algorithm 4: accepted synthetic images into the minor classes until the ratio of
the largest to the smallest class is at most rho, or that class' synthetic pool is used up.

Variants (the thesis' training sets):
  original   the original training set, unchanged
  synthetic  the accepted synthetic images alone (the original's val/test splits kept)
  expanded   original + every accepted synthetic image
  balanced   rho = 1, as far as the pools allow
  rho        rho from the settings
Within a class the images with the most agreeing voters go first; ties are broken by a
shuffle seeded by the run's seed, so a rerun picks the same images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fersynth import markdown
from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, read_manifest, write_manifest
from fersynth.errors import FersynthError
from fersynth.figures import class_count_chart
from fersynth.files import atomic_write_text, link_or_copy, staged_folder
from fersynth.settings import AugmentSettings, save_resolved

SYNTHETIC_FOLDER = "synthetic"  # where the added images go inside the output dataset
REPORT_MD = "augment_report.md"
TEMPLATE = "augment_report.md.j2"
REPORT_JSON = "augment_report.json"
COUNTS_PNG = "augment_counts.png"


def plan(original: dict[str, int], pool: dict[str, int], rho: float | None) -> dict[str, int]:
    """How many synthetic images each class gets. rho None: all of the pool (expanded).

    Every class is raised to ceil(largest / rho), the smallest count with largest/count <= rho,
    or as far as its pool allows; the largest class itself never grows.
    """
    if rho is None:
        return {name: pool.get(name, 0) for name in CLASSES}
    if rho < 1:
        raise FersynthError(f"augment.rho = {rho}: must be at least 1")
    largest = max(original.values(), default=0)
    target = math.ceil(largest / rho - 1e-9)
    return {name: min(pool.get(name, 0), max(0, target - original.get(name, 0))) for name in CLASSES}


def ratio(counts: dict[str, int]) -> float:
    """Largest / smallest count over the classes present (inf when there are none)."""
    values = [counts.get(name, 0) for name in CLASSES if counts.get(name, 0) > 0]
    return max(values) / min(values) if values else math.inf


def ranked_pool(synthetic: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Accepted synthetic rows, most agreeing voters first, ties in a seeded random order."""
    accepted = synthetic[synthetic["v_accepted"] == "true"].copy()
    accepted["_tie"] = np.random.default_rng(seed).permutation(len(accepted))
    accepted["_agree"] = pd.to_numeric(accepted["v_agree"])
    ordered = accepted.sort_values(["_agree", "_tie"], ascending=[False, True], kind="stable")
    return ordered.drop(columns=["_tie", "_agree"])


def select(synthetic: pd.DataFrame, additions: dict[str, int], seed: int) -> pd.DataFrame:
    pool = ranked_pool(synthetic, seed)
    chosen = [pool[pool["label"] == name].head(additions.get(name, 0)) for name in CLASSES]
    return pd.concat(chosen) if chosen else pool.head(0)


@dataclass
class AugmentResult:
    output: Path
    manifest: pd.DataFrame
    before: dict[str, int]
    pool: dict[str, int]
    added: dict[str, int]
    after: dict[str, int]

    @property
    def ratio_before(self) -> float:
        return ratio(self.before)

    @property
    def ratio_after(self) -> float:
        return ratio(self.after)


def _counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {name: int(counts.get(name, 0)) for name in CLASSES}


def run_augment(
    settings: AugmentSettings, *, seed: int, force: bool = False, progress: bool = True
) -> AugmentResult:
    original = read_manifest(settings.original)
    synthetic = read_manifest(settings.synthetic)
    if "v_accepted" not in synthetic.manifest.columns:
        raise FersynthError(
            f"{settings.synthetic}: no v_accepted column; run `fersynth verify` on the synthetic data first"
        )
    candidates = synthetic.manifest[synthetic.manifest["split"] == TRAIN_SPLIT]
    before = original.class_counts(TRAIN_SPLIT)
    pool = _counts(candidates[candidates["v_accepted"] == "true"])
    variant = settings.variant
    rho = {"original": None, "synthetic": None, "expanded": None, "balanced": 1.0, "rho": settings.rho}[
        variant
    ]
    additions = {name: 0 for name in CLASSES} if variant == "original" else plan(before, pool, rho)
    added = select(candidates, additions, seed).copy()
    clash = sorted(set(added["id"]) & set(original.manifest["id"]))
    if clash:
        raise FersynthError(f"{settings.synthetic}: ids also used by the original data, e.g. {clash[:3]}")
    added["path"] = [f"{SYNTHETIC_FOLDER}/{path}" for path in added["path"]]
    kept = original.manifest
    if variant == "synthetic":  # train on synthetic images alone; validate and test on real ones
        kept = kept[kept["split"] != TRAIN_SPLIT]
    frame = pd.concat([kept, added], ignore_index=True)
    text = frame.select_dtypes(exclude="number").columns
    frame[text] = frame[text].fillna("")  # columns that only one side has
    after = _counts(frame[frame["split"] == TRAIN_SPLIT])
    result = AugmentResult(Path(settings.output), frame, before, pool, _counts(added), after)
    with staged_folder(settings.output, force=force) as staging:
        for relative in tqdm(
            kept["path"], desc="link original", unit="img", disable=not progress, leave=False
        ):
            link_or_copy(original.image_path(relative), staging / relative)
        for relative in tqdm(
            added["path"], desc="link synthetic", unit="img", disable=not progress, leave=False
        ):
            source = relative.removeprefix(f"{SYNTHETIC_FOLDER}/")
            link_or_copy(synthetic.image_path(source), staging / relative)
        write_manifest(staging, frame)
        save_resolved({"seed": seed, "augment": settings}, staging)
        _write_report(staging, result, settings)
    return result


def class_table(result: AugmentResult) -> pd.DataFrame:
    """Per class: the original training count, the accepted synthetic pool, how many were added,
    and the training set's count."""
    table = pd.DataFrame(
        {
            "original": result.before,
            "accepted pool": result.pool,
            "added": result.added,
            "training set": result.after,
        }
    ).loc[list(CLASSES)]
    table.index.name = "class"
    return table


def _write_report(folder: Path, result: AugmentResult, settings: AugmentSettings) -> None:
    table = class_table(result)
    summary = {
        "variant": settings.variant,
        "rho": settings.rho
        if settings.variant == "rho"
        else (1.0 if settings.variant == "balanced" else None),
        "ratio_before": result.ratio_before,
        "ratio_after": result.ratio_after,
        "per_class": json.loads(table.to_json(orient="index")),
    }
    atomic_write_text(folder / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    class_count_chart(
        {"original": result.before, "training set": result.after},
        f"augment: {settings.variant}",
        folder / COUNTS_PNG,
    )
    text = markdown.render(
        TEMPLATE,
        settings=settings,
        rho=summary["rho"],
        ratio_before=result.ratio_before,
        ratio_after=result.ratio_after,
        table=markdown.table(table),
        counts_png=COUNTS_PNG,
    )
    atomic_write_text(folder / REPORT_MD, text)
