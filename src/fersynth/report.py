"""`fersynth report`: one page per run of the grid, for a person to read.

Markdown with PNGs in one folder: the comparison tables (in-domain and cross-dataset), what
the synthetic data changed per class (each synthetic row against its original row), the
confusion matrices, and the quality, verification, augmentation and generation summaries.
Every input is optional except the comparisons: a section whose stage did not run says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fersynth.classes import CLASSES
from fersynth.compare import SKIPPED, read_comparison, to_markdown
from fersynth.errors import FersynthError
from fersynth.figures import save_figure
from fersynth.files import atomic_write_text, staged_folder
from fersynth.settings import ReportSettings

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
RESULTS_TEMPLATE = "results.md.j2"


@dataclass
class ReportResult:
    output: Path
    changes: pd.DataFrame  # rows "<row> - <baseline> (<test set>)", columns classes + Total + Mean


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _json_table(table: pd.DataFrame) -> dict:
    """Rows as dicts, an empty cell (a skipped row, a class without test images) as null."""
    return table.round(4).astype(object).where(table.notna(), None).to_dict(orient="index")


def class_changes(table: pd.DataFrame, pairs: list[tuple[str, str]], test_set: str) -> pd.DataFrame:
    """Accuracy points each row on synthetic data gains over each row it must beat, per class."""
    rows = {}
    for row, baseline in pairs:
        if row in table.index and baseline in table.index:
            change = table.loc[row] - table.loc[baseline]
            if change.notna().any():  # a skipped row has no change to show
                rows[f"{row} - {baseline} ({test_set})"] = change
    return pd.DataFrame.from_dict(rows, orient="index")


def changes_chart(changes: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: per-class change in accuracy points, one colour per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(changes.columns)
    x = np.arange(len(columns))
    width = 0.8 / max(1, len(changes))
    figure, axis = plt.subplots(figsize=(8, 3.4), dpi=110)
    for i, (label, values) in enumerate(changes.iterrows()):
        axis.bar(x + (i - (len(changes) - 1) / 2) * width, values.to_numpy(), width, label=label)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(x, columns, rotation=20)
    axis.set_ylabel("accuracy points")
    axis.set_title("What the synthetic data changed")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def _signed_markdown(changes: pd.DataFrame) -> str:
    header = "| change | " + " | ".join(changes.columns) + " |"
    lines = [header, "|---" * (len(changes.columns) + 1) + "|"]
    for label, row in changes.iterrows():
        cells = ["-" if pd.isna(v) else f"{v:+.2f}" for v in row]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _copy(source: Path, folder: Path, name: str) -> str | None:
    """Copy a picture into the report folder; its relative name, or None when absent."""
    if not source.is_file():
        return None
    shutil.copy2(source, folder / name)
    return name


def _folder(value: Path | None) -> Path | None:
    return None if value is None else Path(value)


def _quality_section(folder: Path | None, out: Path) -> list[str]:
    if folder is None:
        return ["No quality stage in this run."]
    report = _read_json(folder / "quality_report.json")
    if report is None:
        return ["Quality stage output not found at " + str(folder) + "."]
    lines = [
        f"{report['train_images']} training images scored; {report['flagged']} flagged "
        f"(score under {report['score_cutoff']:.3f}, {report['threshold_mode']} {report['threshold']}); "
        f"{report['enhanced']} enhanced with super-resolution"
        + ("" if report.get("sr_models") else " (no SwinIR weights configured)")
        + ".",
        "",
        "| class | train images | flagged | flagged % |",
        "|---|---|---|---|",
    ]
    for row in report["per_class"]:
        lines.append(f"| {row['class']} | {row['train images']} | {row['flagged']} | {row['flagged %']} |")
    if picture := _copy(folder / "quality_histograms.png", out, "quality_histograms.png"):
        lines += ["", f"![quality scores]({picture})"]
    return lines


def _verify_section(folder: Path | None, out: Path) -> list[str]:
    if folder is None:
        return ["No verification in this run."]
    report = _read_json(folder / "verify_report.json")
    if report is None:
        return ["Verification output not found at " + str(folder) + "."]
    leaks = report.get("leaks", {})
    lines = [
        f"{report['verified']} generated images voted on by {len(report['voters'])} models "
        f"(accept when at least {report['min_votes']} agree with mean probability at least "
        f"{report['min_probability']}): **{report['accepted']} accepted**; "
        f"{leaks.get('removed', 0)} removed as copies of test images.",
        "",
        "| class | generated | accepted | acceptance | Frechet distance | diversity real / synthetic |",
        "|---|---|---|---|---|---|",
    ]

    def number(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    for name in CLASSES:
        row = report["per_class"].get(name)
        if row:
            lines.append(
                f"| {name} | {row['generated']} | {row['accepted']} "
                f"| {number(row['acceptance_rate'] * 100, 1)}% "
                f"| {number(row['frechet_distance'])} | {number(row['diversity_real'])} / "
                f"{number(row['diversity_synthetic'])} |"
            )
    reasons = report.get("rejection_reasons", {})
    if reasons:
        lines += ["", "Rejections: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + "."]
    for name, caption in (
        ("verify_classes.png", "acceptance per class"),
        ("verify_examples.png", "examples"),
    ):
        if picture := _copy(folder / name, out, name):
            lines += ["", f"![{caption}]({picture})"]
    return lines


def _augment_section(folder: Path | None) -> list[str]:
    if folder is None:
        return ["No rebalancing in this run."]
    report = _read_json(folder / "augment_report.json")
    if report is None:
        return ["Augmentation output not found at " + str(folder) + "."]
    lines = [
        f"Variant `{report['variant']}`: class ratio {report['ratio_before']} -> {report['ratio_after']} "
        f"(target rho {report['rho']}).",
        "",
        "| class | original | accepted pool | added | training set |",
        "|---|---|---|---|---|",
    ]
    for name in CLASSES:
        row = report["per_class"].get(name)
        if row:
            lines.append(
                f"| {name} | {row['original']} | {row['accepted pool']} | {row['added']} "
                f"| {row['training set']} |"
            )
    return lines


def _template(name: str):
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fersynth", "templates"),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, not an empty cell
    )
    return environment.get_template(name)


def acceptance_table(verify_folder: Path | None) -> pd.DataFrame | None:
    """Generated and accepted synthetic images per class (from verify_report.json)."""
    report = _read_json(verify_folder / "verify_report.json") if verify_folder else None
    if report is None:
        return None
    table = pd.DataFrame.from_dict(report["per_class"], orient="index")[["generated", "accepted"]]
    table["acceptance %"] = (
        100 * table["accepted"] / table["generated"].where(table["generated"] > 0)
    ).round(1)
    table.index.name = "class"
    return table


def write_results_page(
    path: Path, experiment: str, comparisons, changes: pd.DataFrame, settings: ReportSettings
) -> Path:
    """The results page a run writes for the repository (docs/results/<experiment>.md): the
    comparison tables, what the synthetic data bought, and the acceptance per class."""
    acceptance = acceptance_table(_folder(settings.verify))
    text = _template(RESULTS_TEMPLATE).render(
        experiment=experiment,
        report_folder=str(settings.output),
        tables=[
            {
                "title": f"{name} ({'in-domain' if i == 0 else 'cross-dataset'})",
                "markdown": to_markdown(t).strip(),
            }
            for i, (name, t) in enumerate(comparisons)
        ],
        changes=_signed_markdown(changes) if not changes.empty else "",
        acceptance=acceptance.to_markdown() if acceptance is not None else "",
    )
    atomic_write_text(Path(path), text)
    return Path(path)


def run_report(settings: ReportSettings, *, force: bool = False, experiment: str = "") -> ReportResult:
    if not settings.comparisons:
        raise FersynthError("report.comparisons: give at least one `fersynth compare` output folder")
    comparisons = [read_comparison(folder) for folder in settings.comparisons]
    with staged_folder(settings.output, force=force) as out:
        lines = ["# fersynth run report", ""]
        changes = pd.concat(
            [class_changes(table, settings.changes or [], name) for name, table in comparisons]
        )
        lines += ["## Comparison", ""]
        for name, table in comparisons:
            kind = "in-domain" if name == comparisons[0][0] else "cross-dataset"
            lines += [to_markdown(table, f"Accuracy (%) on {name} ({kind})"), ""]
        lines += ["## What the synthetic data changed", ""]
        if changes.empty:
            note = "No synthetic row has results beside its original row"
            lines += [f"{note} (a skipped row is named under the tables).", ""]
        else:
            lines += [
                "Accuracy points of each synthetic row minus its original row, per class.",
                "",
                _signed_markdown(changes),
                f"![changes]({changes_chart(changes, out / 'changes.png').name})",
                "",
            ]
        lines += ["## Confusion matrices (row-normalised, in-domain)", ""]
        test_set, table = comparisons[0]
        skipped = table.attrs.get(SKIPPED) or {}
        for run in table.index:
            evaluations = _folder(settings.evaluations)
            picture = evaluations and _copy(
                evaluations / run.lower() / test_set / "confusion.png", out, f"confusion_{run.lower()}.png"
            )
            if picture:
                shown = f"![{run}]({picture})"
            else:
                shown = f"(skipped: {skipped[run]})" if run in skipped else "(no figure)"
            lines += [f"**{run}**", "", shown, ""]
        lines += ["## Quality", "", *_quality_section(_folder(settings.quality), out), ""]
        lines += [
            "## Verification of the synthetic images",
            "",
            *_verify_section(_folder(settings.verify), out),
            "",
        ]
        lines += ["## Rebalancing (Algorithm 4)", "", *_augment_section(_folder(settings.augment)), ""]
        lines += ["## Generated samples per class", ""]
        found = False
        generated = _folder(settings.generated)
        for name in CLASSES if generated is not None else ():
            picture = _copy(generated / f"samples_{name}.png", out, f"samples_{name}.png")
            if picture:
                found = True
                lines += [f"**{name}**", "", f"![{name}]({picture})", ""]
        if not found:
            lines += [f"No contact sheets found in {settings.generated}.", ""]
        atomic_write_text(out / REPORT_MD, "\n".join(lines))
        summary = {
            "comparisons": {name: _json_table(table) for name, table in comparisons},
            "changes": changes.round(4).to_dict(orient="index"),
            "skipped": skipped,
        }
        atomic_write_text(out / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    if settings.results_page is not None:
        write_results_page(settings.results_page, experiment, comparisons, changes, settings)
    return ReportResult(Path(settings.output), changes)
