"""Reports of the guard and the verification: Markdown with PNGs, JSON and CSV tables."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fersynth import markdown
from fersynth.classes import CLASSES
from fersynth.dataset import ImageDecodeError, load_image
from fersynth.figures import contact_sheet, save_figure, save_png
from fersynth.files import atomic_write_text
from fersynth.folds import fold_folder
from fersynth.verify.voting import (
    CODE_SEPARATOR,
    NEAR_COPY,
    REJECTION_CODES,
    SEED_COPY_SOURCE,
    VOTE_CODES,
    rejection_labels,
)

if TYPE_CHECKING:
    from fersynth.settings import GuardSettings, VerifySettings
    from fersynth.verify import GuardResult, VerifyResult

LEAKS_CSV = "leakage.csv"
LEAK_PAIRS_PNG = "leakage_pairs.png"
GUARD_MD = "guard_report.md"
GUARD_JSON = "guard_report.json"
VERIFY_MD = "verify_report.md"
GUARD_TEMPLATE = "guard_report.md.j2"
VERIFY_TEMPLATE = "verify_report.md.j2"
VERIFY_JSON = "verify_report.json"
FIDELITY_CSV = "fidelity.csv"
VERIFY_PNG = "verify_classes.png"
EXAMPLES_PNG = "verify_examples.png"


def _image(path: Path) -> np.ndarray:
    try:
        return load_image(path)
    except ImageDecodeError:
        return np.full((8, 8, 3), 128, np.uint8)


def _leak_summary(leaks: pd.DataFrame) -> dict:
    return {
        "removed": len(leaks),
        "exact": int((leaks["kind"] == "exact").sum()),
        "perceptual": int((leaks["kind"] == "perceptual").sum()),
        "distinct_test_images": int(leaks[["test_set", "test_id"]].drop_duplicates().shape[0]),
        "by_split_and_kind": {
            f"{split}/{kind}": int(n) for (split, kind), n in leaks.groupby(["split", "kind"]).size().items()
        },
    }


def _leak_pairs(root: Path, leaks: pd.DataFrame, path: Path, pairs_per_row: int = 4, rows: int = 6) -> Path:
    shown = leaks.sort_values("distance", ascending=False, kind="stable").head(pairs_per_row * rows)
    bands = []
    for start in range(0, len(shown), pairs_per_row):
        chunk = shown.iloc[start : start + pairs_per_row]
        images = []
        for _, leak in chunk.iterrows():
            images += [_image(root / leak["path"]), _image(Path(leak["test_path"]))]
        distances = ", ".join(f"d={d}" for d in chunk["distance"])
        bands.append((f"(image, test image) pairs: {distances}", images))
    return save_png(path, contact_sheet(bands, tile=72, columns=2 * pairs_per_row))


LEAKS_SHOWN = 20  # rows of the leak table on the page; all of them are in LEAKS_CSV


def leak_table(leaks: pd.DataFrame, rows: int = LEAKS_SHOWN) -> pd.DataFrame:
    """The first `rows` leaks: the removed image, its split, the test image it copies, how."""
    shown = leaks.head(rows)
    return pd.DataFrame(
        {
            "image": shown["path"],
            "split": shown["split"],
            "test image": shown["test_set"].astype(str) + ": " + shown["test_id"].astype(str),
            "kind": shown["kind"],
            "distance": shown["distance"],
            "correlation": shown["correlation"],
        }
    ).set_index("image")


def _leak_values(leaks: pd.DataFrame, max_distance: int, picture: bool) -> dict:
    """What the leak section of both pages (templates/_leaks.md.j2) shows."""
    return {
        "leaks": _leak_summary(leaks),
        "max_distance": max_distance,
        "leak_table": markdown.table(leak_table(leaks)) if len(leaks) else "",
        "leaks_not_shown": max(0, len(leaks) - LEAKS_SHOWN),
        "leaks_csv": LEAKS_CSV,
        "leak_picture": LEAK_PAIRS_PNG if picture else None,
    }


def write_guard_report(folder: Path, result: GuardResult, settings: GuardSettings) -> None:
    folder = Path(folder)
    atomic_write_text(folder / LEAKS_CSV, result.leaks.to_csv(index=False, lineterminator="\n"))
    picture = len(result.leaks) > 0
    if picture:
        _leak_pairs(Path(settings.data), result.leaks, folder / LEAK_PAIRS_PNG)
    summary = {
        "data": str(settings.data),
        "tests": result.tests,
        "max_distance": settings.max_distance,
        **_leak_summary(result.leaks),
        "kept": len(result.manifest),
        "unreadable": [{"path": p, "reason": r} for p, r in result.unreadable],
    }
    atomic_write_text(folder / GUARD_JSON, json.dumps(summary, indent=2) + "\n")
    text = markdown.render(
        GUARD_TEMPLATE,
        data=str(settings.data),
        tests=result.tests,
        kept=len(result.manifest),
        unreadable=result.unreadable,
        **_leak_values(result.leaks, settings.max_distance, picture),
    )
    atomic_write_text(folder / GUARD_MD, text)


def _class_chart(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    x = np.arange(len(table))
    left.bar(x, 100 * table["acceptance_rate"].fillna(0), color="#4c72b0")
    left.set_xticks(x, table.index, rotation=30)
    left.set_ylim(0, 100)
    left.set_ylabel("accepted %")
    left.set_title("acceptance by the voters")
    right.bar(x - 0.27, table["diversity_real"].fillna(0), 0.27, label="real")
    right.bar(x, table["diversity_synthetic"].fillna(0), 0.27, label="synthetic")
    seed_distance = table.get("seed_distance", pd.Series(np.nan, index=table.index))
    right.bar(x + 0.27, seed_distance.fillna(0), 0.27, label="synthetic to its seed")
    right.set_xticks(x, table.index, rotation=30)
    right.set_ylabel("mean pairwise feature distance")
    right.set_title("diversity")
    right.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def _examples(root: Path, frame: pd.DataFrame, path: Path, per_kind: int = 4) -> Path:
    rows = []
    for name in CLASSES:
        group = frame[frame["label"] == name]
        if group.empty:
            continue
        accepted = group[group["v_accepted"] == "true"].head(per_kind)
        rejected = group[group["v_accepted"] != "true"].head(per_kind)
        images = [_image(root / p) for p in accepted["path"]] + [_image(root / p) for p in rejected["path"]]
        rows.append((f"{name}: {len(accepted)} accepted | {len(rejected)} rejected", images))
    return save_png(path, contact_sheet(rows, tile=64, columns=2 * per_kind))


def verify_class_table(fidelity: pd.DataFrame) -> pd.DataFrame:
    """Per class: generated and accepted images, acceptance in percent, Frechet distance, KID
    (x1000), the diversity of real and synthetic images and the synthetic images' distance to
    their seed images, from the fidelity table."""
    table = pd.DataFrame(
        {
            "generated": fidelity["generated"].astype(int),
            "accepted": fidelity["accepted"].astype(int),
            "accepted %": 100 * fidelity["acceptance_rate"],
            "Frechet distance": fidelity["frechet_distance"],
            "KID x1000": 1000 * fidelity["kid_mean"],
            "diversity real": fidelity["diversity_real"],
            "diversity synthetic": fidelity["diversity_synthetic"],
            "distance to seed": fidelity.get("seed_distance", np.nan),
        }
    )
    table.index.name = "class"
    return table


def rejection_counts(frame: pd.DataFrame, codes: tuple[str, ...] = VOTE_CODES) -> dict[str, int]:
    """Rejected images per rejection code (`codes`, of voting.REJECTION_CODES: by default the
    vote's own rules; add NEAR_COPY for a run that checked near copies), counted from the
    structured `v_rejected_by` column; an image rejected for both reasons counts under each."""
    counts = Counter(code for codes in frame["v_rejected_by"] for code in codes.split(CODE_SEPARATOR) if code)
    return {code: counts[code] for code in codes}


def rejection_table(
    frame: pd.DataFrame, labels: dict[str, str], codes: tuple[str, ...] = VOTE_CODES
) -> pd.DataFrame:
    """Per class: images verified, accepted, and rejected under each reason (`codes`, as in
    rejection_counts; an image rejected for several reasons counts under each), from the
    structured `v_rejected_by` codes."""
    rows = {}
    for name in CLASSES:
        group = frame[frame["label"] == name]
        found = Counter(c for value in group["v_rejected_by"] for c in value.split(CODE_SEPARATOR) if c)
        rows[name] = {
            "verified": len(group),
            "accepted": int((group["v_accepted"] == "true").sum()),
            **{labels[code]: found[code] for code in codes},
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "class"
    return table


def class_verdicts(
    frame: pd.DataFrame, recall: pd.DataFrame, recognised: dict[str, bool], settings
) -> dict[str, str]:
    """Per class with generated images but none accepted: why, in one sentence (the voters'
    validation recall when they do not recognise it, else the images' own votes)."""
    verdicts = {}
    for name in CLASSES:
        group = frame[frame["label"] == name]
        if group.empty or (group["v_accepted"] == "true").any():
            continue
        if not recognised.get(name, True):
            values = (
                ", ".join(f"{v} {recall.at[v, name]:.0f}%" for v in recall.index) if not recall.empty else ""
            )
            verdicts[name] = (
                f"the voters do not recognise {name} on validation (recall {values}; "
                f"{settings.min_votes} voters need {settings.min_recall:.0%})"
            )
        else:
            agree = pd.to_numeric(group["v_agree"]).mean()
            verdicts[name] = (
                f"the voters recognise {name}, but on average only {agree:.1f} of them agree with "
                f"these images (need {settings.min_votes}): the images do not show it"
            )
    return verdicts


def _number(value: float) -> float | None:
    """A float for JSON: NaN (no value) becomes null."""
    return None if value is None or np.isnan(value) else float(value)


def fold_summary(result: VerifyResult) -> list[dict]:
    """Per fold of the vote (one entry, fold null, when not cross-fitted): which voter models
    voted on it, its images, and the values they were decided with."""
    return [
        {
            "fold": group.fold,
            "models": group.models,
            "images": group.images,
            "images_without_seed": group.without_seed,
            "recognised": group.recognised,
            "probability_thresholds": {k: _number(v) for k, v in group.thresholds.items()},
            "near_copy_thresholds": {k: _number(v) for k, v in group.near_copy_thresholds.items()},
        }
        for group in result.folds
    ]


def fold_table(result: VerifyResult) -> pd.DataFrame:
    """One row per fold: the voter models that voted on its images, and how many there were."""
    rows = {
        fold_folder(group.fold) if group.fold is not None else "all": {
            "voter models": ", ".join(f"`{model}`" for model in group.models),
            "images": group.images,
            "of them without a seed": group.without_seed,
        }
        for group in result.folds
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "fold"
    return table


def threshold_table(result: VerifyResult, near_copy: bool) -> pd.DataFrame:
    """Per class: tau, and the near-copy distance (when checked), of each fold (or of the
    plain voters); empty where a class has no near-copy threshold."""
    columns = {}
    for group in result.folds:
        suffix = f" ({fold_folder(group.fold)})" if group.fold is not None else ""
        columns[f"tau{suffix}"] = pd.Series(group.thresholds)
        if near_copy:
            columns[f"near-copy distance{suffix}"] = pd.Series(group.near_copy_thresholds)
    table = pd.DataFrame(columns).reindex(list(CLASSES))
    table.index.name = "class"
    return table


def write_verify_report(
    folder: Path, result: VerifyResult, settings: VerifySettings, max_distance: int
) -> None:
    folder = Path(folder)
    frame, table = result.manifest, result.fidelity
    atomic_write_text(folder / FIDELITY_CSV, table.to_csv(lineterminator="\n"))
    atomic_write_text(folder / LEAKS_CSV, result.leaks.to_csv(index=False, lineterminator="\n"))
    leak_picture = len(result.leaks) > 0
    if leak_picture:
        _leak_pairs(Path(settings.data), result.leaks, folder / LEAK_PAIRS_PNG)
    _class_chart(table, folder / VERIFY_PNG)
    _examples(folder, frame, folder / EXAMPLES_PNG)
    accepted = int((frame["v_accepted"] == "true").sum())
    # The near-copy check ran when it is on and the vote says with which values (a report of a
    # run without it does not count a reason it never checked).
    near_copy = settings.near_copy_percentile is not None and bool(result.folds)
    codes = REJECTION_CODES if near_copy else VOTE_CODES
    rejected_by = rejection_counts(frame, codes)
    labels = rejection_labels(
        len(result.voters),
        settings.min_votes,
        settings.min_probability,
        settings.min_recall,
        settings.near_copy_percentile,
    )
    reasons_by_class = rejection_table(frame, labels, codes)
    no_threshold = sorted(
        {name for group in result.folds for name, v in group.near_copy_thresholds.items() if np.isnan(v)},
        key=CLASSES.index,
    )
    seed_copy = int((frame.get("source", pd.Series("", index=frame.index)) == SEED_COPY_SOURCE).sum())
    verdicts = class_verdicts(frame, result.recall, result.recognised, settings)
    summary = {
        "data": str(settings.data),
        "voters": result.voters,
        "mode": settings.mode,
        "min_votes": settings.min_votes,
        "min_probability": settings.min_probability,
        "verified": len(frame),
        "accepted": accepted,
        "rejected": len(frame) - accepted,
        "leaks": _leak_summary(result.leaks),
        "rejected_by": rejected_by,  # per code (fersynth.verify.voting.REJECTION_CODES)
        # The same counts under their human labels, most frequent first.
        "rejection_reasons": {
            labels[code]: n for code, n in sorted(rejected_by.items(), key=lambda item: -item[1]) if n
        },
        "per_class": json.loads(table.to_json(orient="index")),
        "rejected_by_class": json.loads(reasons_by_class.to_json(orient="index")),
        "min_recall": settings.min_recall,
        # Each voter's recall per class on the real validation split (%), and which classes
        # enough voters recognise to be verified.
        "voter_recall": json.loads(result.recall.round(2).to_json(orient="index"))
        if not result.recall.empty
        else {},
        "recognised": result.recognised,  # per class; when cross-fitted: in every fold
        # tau per class, calibrated on validation; when cross-fitted, the lowest of the folds'
        # (each fold's values are under "folds").
        "probability_thresholds": result.thresholds,
        # Whether each image was voted on only by voter models that never trained on its seed.
        "cross_fitted": result.cross_fitted,
        "folds": fold_summary(result),
        "near_copy": {
            "percentile": settings.near_copy_percentile if near_copy else None,
            "rejected": rejected_by.get(NEAR_COPY, 0),
            "exempt_source": SEED_COPY_SOURCE,
            "exempt_images": seed_copy,
            "classes_without_threshold": no_threshold if near_copy else [],
        },
        "no_accepted_because": verdicts,
        "unreadable": [{"path": p, "reason": r} for p, r in result.unreadable],
    }
    atomic_write_text(folder / VERIFY_JSON, json.dumps(summary, indent=2) + "\n")
    decimals = ["Frechet distance", "KID x1000", "diversity real", "diversity synthetic", "distance to seed"]
    text = markdown.render(
        VERIFY_TEMPLATE,
        settings=settings,
        voters=result.voters,
        accepted=accepted,
        verified=len(frame),
        class_table=markdown.table(
            verify_class_table(table), {"accepted %": ".1f", **dict.fromkeys(decimals, ".2f")}
        ),
        rejection_reasons=summary["rejection_reasons"],
        rejection_table=markdown.table(reasons_by_class),
        recall_table=markdown.table(result.recall, default=".0f") if not result.recall.empty else "",
        recognised=result.recognised,
        thresholds=result.thresholds,
        cross_fitted=result.cross_fitted,
        fold_table=markdown.table(fold_table(result)) if result.folds else "",
        folds=result.folds,
        threshold_table=markdown.table(threshold_table(result, near_copy), default=".3f")
        if result.folds
        else "",
        near_copy=near_copy,
        no_near_copy_threshold=no_threshold,
        seed_copy=seed_copy,
        verdicts=verdicts,
        classes_png=VERIFY_PNG,
        examples_png=EXAMPLES_PNG,
        unreadable=result.unreadable,
        **_leak_values(result.leaks, max_distance, leak_picture),
    )
    atomic_write_text(folder / VERIFY_MD, text)
