"""Reports of the guard and the verification: Markdown with PNGs, JSON and CSV tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fersynth.classes import CLASSES
from fersynth.dataset import ImageDecodeError, load_image
from fersynth.figures import contact_sheet, save_figure, save_png
from fersynth.files import atomic_write_text

if TYPE_CHECKING:
    from fersynth.settings import GuardSettings, VerifySettings
    from fersynth.verify import GuardResult, VerifyResult

LEAKS_CSV = "leakage.csv"
LEAK_PAIRS_PNG = "leakage_pairs.png"
GUARD_MD = "guard_report.md"
GUARD_JSON = "guard_report.json"
VERIFY_MD = "verify_report.md"
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


def _leak_markdown(leaks: pd.DataFrame, max_distance: int, picture: bool) -> list[str]:
    summary = _leak_summary(leaks)
    lines = [
        f"Removed **{summary['removed']}** images: {summary['exact']} exact copies and "
        f"{summary['perceptual']} near-duplicates (pHash within {max_distance} of 64 bits, confirmed by "
        "thumbnail correlation) "
        f"of {summary['distinct_test_images']} distinct test images. All of them, with both paths: "
        f"`{LEAKS_CSV}`.",
        "",
    ]
    if len(leaks):
        lines += [
            "| image | split | test image | kind | distance | correlation |",
            "|---|---|---|---|---|---|",
        ]
        for _, leak in leaks.head(20).iterrows():
            lines.append(
                f"| {leak['path']} | {leak['split']} | {leak['test_set']}: {leak['test_id']} "
                f"| {leak['kind']} | {leak['distance']} | {leak['correlation']} |"
            )
        if len(leaks) > 20:
            lines.append(f"| ... {len(leaks) - 20} more in `{LEAKS_CSV}` | | | | | |")
        lines.append("")
    if picture:
        lines += [f"![pairs]({LEAK_PAIRS_PNG})", ""]
    return lines


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
    lines = [
        f"# Test-leakage guard: {settings.data}",
        "",
        "Compared every training and validation image with every test image: "
        + "; ".join(result.tests)
        + ".",
        "",
        *_leak_markdown(result.leaks, settings.max_distance, picture),
        f"Kept {len(result.manifest)} rows.",
    ]
    if result.unreadable:
        lines += ["", f"{len(result.unreadable)} unreadable images (kept, not compared):"]
        lines += [f"- {p}: {r}" for p, r in result.unreadable[:20]]
    atomic_write_text(folder / GUARD_MD, "\n".join(lines) + "\n")


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
    right.bar(x - 0.2, table["diversity_real"].fillna(0), 0.4, label="real")
    right.bar(x + 0.2, table["diversity_synthetic"].fillna(0), 0.4, label="synthetic")
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


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if pd.isna(value) else f"{value:.{digits}f}"


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
    reasons = frame.loc[frame["v_accepted"] != "true", "v_reason"].str.split("; ").explode()
    reasons = reasons.str.replace(r"^\d+ of", "too few of", regex=True).str.replace(
        r"probability [\d.]+ <", "probability <", regex=True
    )
    summary = {
        "data": str(settings.data),
        "voters": result.voters,
        "mode": settings.mode,
        "min_votes": settings.min_votes,
        "min_probability": settings.min_probability,
        "verified": len(frame),
        "accepted": accepted,
        "leaks": _leak_summary(result.leaks),
        "rejection_reasons": {k: int(v) for k, v in reasons.value_counts().items()},
        "per_class": json.loads(table.to_json(orient="index")),
        "unreadable": [{"path": p, "reason": r} for p, r in result.unreadable],
    }
    atomic_write_text(folder / VERIFY_JSON, json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Synthetic expression check: {settings.data}",
        "",
        f"Voters ({len(result.voters)}, flip TTA {'on' if settings.tta_flip else 'off'}): "
        + ", ".join(f"`{v}`" for v in result.voters)
        + ".",
        f"Rule ({settings.mode} mode): at least {settings.min_votes} of {len(result.voters)} voters "
        f"predict the label, and their mean probability of it is at least {settings.min_probability}.",
        "",
        f"**{accepted} of {len(frame)}** synthetic images accepted.",
        "",
        "| class | generated | accepted | accepted % | Frechet distance | KID x1000 "
        "| diversity real | diversity synthetic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.iterrows():
        rate = "-" if pd.isna(row["acceptance_rate"]) else f"{100 * row['acceptance_rate']:.1f}"
        lines.append(
            f"| {name} | {int(row['generated'])} | {int(row['accepted'])} | {rate} "
            f"| {_fmt(row['frechet_distance'], 2)} | {_fmt(row['kid_mean'] * 1000, 2)} "
            f"| {_fmt(row['diversity_real'], 2)} | {_fmt(row['diversity_synthetic'], 2)} |"
        )
    lines += [
        "",
        "Features: pre-logit layer of the first voter. Frechet distance and KID compare the accepted "
        f"synthetic images of a class with up to {settings.fidelity_images_per_class} real training "
        "images of it; diversity is the mean pairwise feature distance within each. Small classes "
        "make these estimates noisy.",
        "",
        f"![classes]({VERIFY_PNG})",
        "",
        f"Examples (accepted first, then rejected): ![examples]({EXAMPLES_PNG})",
        "",
        "Why images were rejected: "
        + (", ".join(f"{k} ({v})" for k, v in summary["rejection_reasons"].items()) or "none")
        + ".",
        "",
        "## Test leakage",
        "",
        *_leak_markdown(result.leaks, max_distance, leak_picture),
    ]
    if result.unreadable:
        lines += [f"{len(result.unreadable)} unreadable synthetic images were dropped:"]
        lines += [f"- {p}: {r}" for p, r in result.unreadable[:20]]
    atomic_write_text(folder / VERIFY_MD, "\n".join(lines) + "\n")
