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
from fersynth.verify.voting import CODE_SEPARATOR, REJECTION_CODES, rejection_labels

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


def rejection_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Rejected images per rejection code (voting.REJECTION_CODES), counted from the structured
    `v_rejected_by` column; an image rejected for both reasons counts under each."""
    counts = Counter(code for codes in frame["v_rejected_by"] for code in codes.split(CODE_SEPARATOR) if code)
    return {code: counts[code] for code in REJECTION_CODES}


def rejection_table(frame: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """Per class: images verified, accepted, and rejected under each reason (an image rejected
    for several reasons counts under each), from the structured `v_rejected_by` codes."""
    rows = {}
    for name in CLASSES:
        group = frame[frame["label"] == name]
        codes = Counter(c for value in group["v_rejected_by"] for c in value.split(CODE_SEPARATOR) if c)
        rows[name] = {
            "verified": len(group),
            "accepted": int((group["v_accepted"] == "true").sum()),
            **{labels[code]: codes[code] for code in REJECTION_CODES},
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
    rejected_by = rejection_counts(frame)
    labels = rejection_labels(
        len(result.voters), settings.min_votes, settings.min_probability, settings.min_recall
    )
    reasons_by_class = rejection_table(frame, labels)
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
        "recognised": result.recognised,
        "probability_thresholds": result.thresholds,  # tau per class, calibrated on validation
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
        verdicts=verdicts,
        classes_png=VERIFY_PNG,
        examples_png=EXAMPLES_PNG,
        unreadable=result.unreadable,
        **_leak_values(result.leaks, max_distance, leak_picture),
    )
    atomic_write_text(folder / VERIFY_MD, text)
