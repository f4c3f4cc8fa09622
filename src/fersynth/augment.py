"""Thesis Algorithm 4: accepted synthetic images into the minor classes until the ratio of
the largest to the smallest class is at most rho, or that class' synthetic pool is used up.

Variants (the thesis' training sets):
  original           the original training set, unchanged
  synthetic          every accepted synthetic image alone
  synthetic_matched  Syn-FER-Expand: accepted synthetic images alone with the original's
                     per-class counts, min(original count, accepted pool) per class
  expanded           original + every accepted synthetic image
  expanded_balanced  the thesis' "expanded balanced" set, as we read it: the original plus
                     Syn-FER-Expand-style additions in every class (so that being synthetic is
                     no cue for a minor class), then rebalanced. Step 1: every class gets up to
                     its own original count of synthetic images, as far as its pool allows.
                     Step 2: rho = 1 on the expanded counts: every class is raised toward the
                     largest class' count after step 1, from what is left of its pool.
  balanced           rho = 1, as far as the pools allow
  rho                rho from the settings
  identities         original + new identities (`generate.identities`: faces drawn from noise,
                     labelled by the vote) toward rho from the settings; the identities enter
                     no other variant, and the other variants' images do not enter this one
Every variant keeps the original's val and test splits unchanged and adds synthetic images to
`train` only; a synthetic image whose seed image is not a training image of the original (its
seed is in val or test, or was removed by the guard) never enters (counted in the report).
Within a class the images with the most agreeing voters go first; ties are broken by a
shuffle seeded by the run's seed, so a rerun picks the same images. A class whose pool is
short of what its variant wants is named in the report.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


SYNTHETIC_ONLY = ("synthetic", "synthetic_matched")  # variants without the original's train split
TAKES_WHOLE_POOL = ("synthetic", "expanded")  # variants that add every accepted image
COPY_KIND = "copy"  # gen_kind of a copy twin: its seed view from the null generator (seed-copy)
COPY_SUFFIX = "_copy"  # a copy twin's id: its generated sibling's id + this
VARIANT_RHO = {"balanced": 1.0, "expanded_balanced": 1.0}  # the rho a variant reaches ("rho": its own)


def plan_expanded_balanced(original: dict[str, int], pool: dict[str, int]) -> dict[str, int]:
    """`expanded_balanced`: up to each class' own original count first, then rho = 1 on the
    expanded counts from what is left of each pool (see the module docstring)."""
    first = {name: min(original.get(name, 0), pool.get(name, 0)) for name in CLASSES}
    expanded = {name: original.get(name, 0) + first[name] for name in CLASSES}
    left = {name: pool.get(name, 0) - first[name] for name in CLASSES}
    top_up = plan(expanded, left, 1.0)
    return {name: first[name] + top_up[name] for name in CLASSES}


def plan_variant(
    variant: str, original: dict[str, int], pool: dict[str, int], rho: float | None = None
) -> dict[str, int]:
    """How many synthetic images each class of `variant` gets (`rho`: the `rho` variant's)."""
    if variant == "original":
        return {name: 0 for name in CLASSES}
    if variant == "synthetic_matched":  # Syn-FER-Expand: the original's per-class counts
        return {name: min(original.get(name, 0), pool.get(name, 0)) for name in CLASSES}
    if variant == "expanded_balanced":
        return plan_expanded_balanced(original, pool)
    if variant in TAKES_WHOLE_POOL:
        return plan(original, pool, None)
    return plan(original, pool, VARIANT_RHO.get(variant, rho))


def wanted(
    variant: str, original: dict[str, int], pool: dict[str, int], rho: float | None = None
) -> dict[str, int]:
    """How many synthetic images each class of `variant` asks for before its pool is counted;
    `plan_variant` gives min(pool, wanted) in every class."""
    if variant in ("original", "synthetic", "expanded"):
        return plan_variant(variant, original, pool, rho)  # nothing, or all of the pool
    if variant == "synthetic_matched":
        return {name: original.get(name, 0) for name in CLASSES}
    if variant == "expanded_balanced":
        # Step 1 wants the class' own count; step 2 the largest expanded count (as reached).
        target = max(original.get(n, 0) + min(original.get(n, 0), pool.get(n, 0)) for n in CLASSES)
        return {name: max(original.get(name, 0), target - original.get(name, 0)) for name in CLASSES}
    unlimited = {name: math.inf for name in CLASSES}
    return {name: int(v) for name, v in plan(original, unlimited, VARIANT_RHO.get(variant, rho)).items()}


def short_pools(want: dict[str, int], pool: dict[str, int]) -> list[dict[str, Any]]:
    """The classes whose accepted pool holds fewer images than their variant wants."""
    return [
        {"class": name, "wanted": int(want[name]), "available": int(pool.get(name, 0))}
        for name in CLASSES
        if pool.get(name, 0) < want.get(name, 0)
    ]


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


def select(
    synthetic: pd.DataFrame, additions: dict[str, int], seed: int, first: list[str] | None = None
) -> pd.DataFrame:
    """The `additions` per class from the accepted rows of `synthetic`, best ranked first;
    rows whose id is in `first` go before all others (a copy twin's set: the copies of the
    generated images its row took)."""
    pool = ranked_pool(synthetic, seed)
    if first:
        wanted_first = pd.Series(pool["id"].isin(set(first)).to_numpy(), index=pool.index)
        pool = pd.concat([pool[wanted_first], pool[~wanted_first]])
    chosen = [pool[pool["label"] == name].head(additions.get(name, 0)) for name in CLASSES]
    return pd.concat(chosen) if chosen else pool.head(0)


def split_pools(candidates: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The synthetic candidates by pool: `generated` (expansions and edits), `copies` (the copy
    twins, gen_kind copy) and `identities` (new faces, gen_kind identity)."""
    kind = (
        candidates["gen_kind"].fillna("").astype(str)
        if "gen_kind" in candidates.columns
        else pd.Series("", index=candidates.index)
    )
    return {
        "generated": candidates[~kind.isin(["identity", COPY_KIND])],
        "copies": candidates[kind == COPY_KIND],
        "identities": candidates[kind == "identity"],
    }


def seeded_from_training(
    candidates: pd.DataFrame, original: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The synthetic candidates whose seed image is a training image of the original data, and
    how many others were dropped, by reason: `seed_in_<split>` (val, test, ...),
    `seed_not_in_original` (removed by the guard, or another dataset's image), `no_seed`."""
    split_of = dict(zip(original["id"].astype(str), original["split"].astype(str), strict=True))
    if "seed_id" in candidates.columns:
        seeds = candidates["seed_id"].fillna("").astype(str)
    else:
        seeds = pd.Series("", index=candidates.index)

    kinds = (
        candidates["gen_kind"] if "gen_kind" in candidates.columns else pd.Series("", index=candidates.index)
    )

    def reason(seed: str, kind: str) -> str:
        if split_of.get(seed) == TRAIN_SPLIT or (kind == "identity" and not seed):
            return ""  # seeded from a training image, or a new identity (no seed at all)
        if not seed:
            return "no_seed"
        return f"seed_in_{split_of[seed]}" if seed in split_of else "seed_not_in_original"

    reasons = [reason(seed, kind) for seed, kind in zip(seeds, kinds.fillna("").astype(str), strict=True)]
    keep = np.array([reason == "" for reason in reasons], dtype=bool)
    dropped = Counter(reason for reason in reasons if reason)
    return candidates[keep], dict(sorted(dropped.items()))


@dataclass
class AugmentResult:
    output: Path
    manifest: pd.DataFrame
    before: dict[str, int]
    pool: dict[str, int]
    added: dict[str, int]
    after: dict[str, int]
    wanted: dict[str, int] = field(default_factory=dict)  # what the variant asked of each pool
    dropped_seeds: dict[str, int] = field(default_factory=dict)  # candidates dropped, by reason

    @property
    def shortfalls(self) -> list[dict[str, Any]]:
        return short_pools(self.wanted, self.pool) if self.wanted else []

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
    # Only images seeded from the original's training images: none from a val or test image.
    candidates, dropped_seeds = seeded_from_training(candidates, original.manifest)
    # New identities are the `identities` variant's pool and no other's; the copy twins are
    # the `copies` pool's, which takes per class what the same variant takes of the generated.
    pools = split_pools(candidates)
    variant = settings.variant
    before = original.class_counts(TRAIN_SPLIT)
    generated = pools["identities" if variant == "identities" else "generated"]
    generated_pool = _counts(generated[generated["v_accepted"] == "true"])
    additions = plan_variant(variant, before, generated_pool, settings.rho)
    want = wanted(variant, before, generated_pool, settings.rho)
    if settings.pool == "copies":
        if variant == "identities":
            raise FersynthError("augment: new identities have no seed image, so no copy twins")
        taken = select(generated, additions, seed)["id"]
        candidates = pools["copies"]
        pool = _counts(candidates[candidates["v_accepted"] == "true"])
        want = dict(additions)  # the twin asks for what its row took
        additions = {name: min(additions[name], pool[name]) for name in CLASSES}
        added = select(candidates, additions, seed, first=[f"{i}{COPY_SUFFIX}" for i in taken]).copy()
    else:
        candidates, pool = generated, generated_pool
        added = select(candidates, additions, seed).copy()
    clash = sorted(set(added["id"]) & set(original.manifest["id"]))
    if clash:
        raise FersynthError(f"{settings.synthetic}: ids also used by the original data, e.g. {clash[:3]}")
    added["path"] = [f"{SYNTHETIC_FOLDER}/{path}" for path in added["path"]]
    kept = original.manifest
    if variant in SYNTHETIC_ONLY:  # train on synthetic images alone; validate and test on real ones
        kept = kept[kept["split"] != TRAIN_SPLIT]
    frame = pd.concat([kept, added], ignore_index=True)
    text = frame.select_dtypes(exclude="number").columns
    frame[text] = frame[text].fillna("")  # columns that only one side has
    after = _counts(frame[frame["split"] == TRAIN_SPLIT])
    result = AugmentResult(
        Path(settings.output), frame, before, pool, _counts(added), after, want, dropped_seeds
    )
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
    from fersynth.origin_check import origin_check

    table = class_table(result)
    # Size and sharpness by origin of the training images written, against stated tolerances.
    check = origin_check(folder, seeds=settings.original) if (folder / "manifest.csv").is_file() else None
    summary = {
        "variant": settings.variant,
        "pool": settings.pool,
        "rho": settings.rho
        if settings.variant in ("rho", "identities")
        else VARIANT_RHO.get(settings.variant),
        "ratio_before": result.ratio_before,
        "ratio_after": result.ratio_after,
        "per_class": json.loads(table.to_json(orient="index")),
        # Synthetic candidates left out because their seed is no training image, by reason.
        "dropped_seeds": result.dropped_seeds,
        "short_pools": result.shortfalls,  # classes whose pool had fewer than the variant wanted
        "origin_check": check.to_dict() if check else None,
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
        dropped_seeds=result.dropped_seeds,
        short_pools=result.shortfalls,
        origin_table=markdown.table(check.table(), default=".1f") if check and check.by_origin else "",
        origin_warning=check.warning() if check else "",
    )
    atomic_write_text(folder / REPORT_MD, text)
