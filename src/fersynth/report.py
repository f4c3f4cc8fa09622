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

from fersynth import markdown
from fersynth.classes import CLASSES
from fersynth.compare import (
    SKIPPED,
    family_sizes,
    paired_changes,
    read_comparison,
    seeds_of,
    spread_footnote,
    to_markdown,
)
from fersynth.errors import FersynthError
from fersynth.figures import save_figure
from fersynth.files import atomic_write_text, staged_folder
from fersynth.settings import SEED_PREFIX, ReportSettings

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
REPORT_TEMPLATE = "report.md.j2"
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
    """Accuracy points each row on synthetic data gains over each row it must beat, per class
    (the mean of the per-seed differences); rows "<row> - <baseline> (<test set>)"."""
    return wide_changes(paired_changes(table, pairs, test_set), list(table.columns))


def wide_changes(paired: pd.DataFrame, columns: list[str], value: str = "mean") -> pd.DataFrame:
    """`compare.paired_changes`' long table as changes x columns of one of its values."""
    if paired.empty:
        return pd.DataFrame(columns=columns, dtype=float)
    wide = paired.pivot(index="change", columns="column", values=value)
    order = list(dict.fromkeys(paired["change"]))
    return wide.reindex(index=order, columns=columns).rename_axis(index=None, columns=None)


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


def _copy(source: Path, folder: Path, name: str) -> str | None:
    """Copy a picture into the report folder; its relative name, or None when absent."""
    if not source.is_file():
        return None
    shutil.copy2(source, folder / name)
    return name


def _folder(value: Path | None) -> Path | None:
    return None if value is None else Path(value)


def _stage(folder: Path | None, report_json: str) -> dict:
    """A stage's folder (None: not in this run) and its JSON report (None: not found)."""
    return {
        "folder": None if folder is None else str(folder),
        "report": None if folder is None else _read_json(folder / report_json),
    }


def _per_class(report: dict) -> dict[str, dict]:
    """The report's non-empty per-class rows, in canonical class order."""
    return {name: report["per_class"][name] for name in CLASSES if report["per_class"].get(name)}


def changes_markdown(paired: pd.DataFrame, columns: list[str]) -> str:
    """The per-class changes as a table: signed mean over seeds, ± the spread of the paired
    differences where there are several seeds, and * where the change is beyond that spread."""
    means = wide_changes(paired, columns)
    spread = wide_changes(paired, columns, "std")
    marked = wide_changes(paired, columns, "marked")
    counts = wide_changes(paired, columns, "n")
    most = int(paired["n"].max()) if not paired.empty else 0
    cells = means.astype(object).copy()
    for change in means.index:
        for column in columns:
            value = means.at[change, column]
            if pd.isna(value):
                cells.at[change, column] = "-"
                continue
            text = f"{value:+.2f}"
            deviation = spread.at[change, column]
            if not pd.isna(deviation):
                text += f" ± {deviation:.2f}"
            flag = marked.at[change, column]
            if pd.notna(flag) and bool(flag):
                text += " *"
            count = counts.at[change, column]
            if pd.notna(count) and int(count) == 0:
                text += " (unpaired)"  # the two rows share no seed
            elif pd.notna(count) and int(count) < most:  # fewer seeds in common than the table has
                text += f" (n={int(count)})"
            cells.at[change, column] = text
    return markdown.table(cells.rename_axis("change"), preformatted=True)


def quality_class_table(report: dict) -> pd.DataFrame:
    """Training images, flagged images and their share per class (from quality_report.json)."""
    columns = ["train images", "flagged", "flagged %"]
    return pd.DataFrame(report["per_class"], columns=["class", *columns]).set_index("class")


def verify_class_table(report: dict) -> pd.DataFrame:
    """Generated and accepted images, Frechet distance and diversity per class (from
    verify_report.json); an empty value (a class with nothing to compare) stays NaN."""
    columns = ["generated", "accepted", "acceptance_rate", "frechet_distance"]
    columns += ["diversity_real", "diversity_synthetic", "seed_distance"]
    rows = pd.DataFrame.from_dict(_per_class(report), orient="index").reindex(columns=columns)
    table = pd.DataFrame(
        {
            "generated": rows["generated"],
            "accepted": rows["accepted"],
            "acceptance %": 100 * rows["acceptance_rate"].astype(float),
            "Frechet distance": rows["frechet_distance"].astype(float),
            "diversity real": rows["diversity_real"].astype(float),
            "diversity synthetic": rows["diversity_synthetic"].astype(float),
            "distance to seed": rows["seed_distance"].astype(float),
        }
    )
    table.index.name = "class"
    return table


def augment_class_table(report: dict) -> pd.DataFrame:
    """Original, pool, added and final training counts per class (from augment_report.json)."""
    columns = ["original", "accepted pool", "added", "training set"]
    table = pd.DataFrame.from_dict(_per_class(report), orient="index").reindex(columns=columns)
    table.index.name = "class"
    return table


def _quality(folder: Path | None, out: Path) -> dict:
    stage = _stage(folder, "quality_report.json")
    if stage["report"] is not None:
        stage["table"] = markdown.table(quality_class_table(stage["report"]), {"flagged %": ".1f"})
        stage["picture"] = _copy(folder / "quality_histograms.png", out, "quality_histograms.png")
    return stage


def _verify(folder: Path | None, out: Path) -> dict:
    stage = _stage(folder, "verify_report.json")
    if stage["report"] is not None:
        decimals = dict.fromkeys(
            ["Frechet distance", "diversity real", "diversity synthetic", "distance to seed"], ".2f"
        )
        stage["table"] = markdown.table(
            verify_class_table(stage["report"]), {"acceptance %": ".1f", **decimals}
        )
        stage["pictures"] = [
            {"name": picture, "caption": caption}
            for name, caption in (
                ("verify_classes.png", "acceptance per class"),
                ("verify_examples.png", "examples"),
            )
            if (picture := _copy(folder / name, out, name))
        ]
    return stage


def _augment(folder: Path | None) -> dict:
    stage = _stage(folder, "augment_report.json")
    if stage["report"] is not None:
        stage["table"] = markdown.table(augment_class_table(stage["report"]))
    return stage


def generation_table(settings: ReportSettings) -> pd.DataFrame | None:
    """Per class: real training images, accepted images the grid's variants need, the expected
    acceptance, images generated (planned: seeds x K), and accepted by the vote, of the
    generator and of its copy twins (from the merged set's sizing.json and the verified
    manifest). None when generation did not run."""
    sizing = _read_json(Path(settings.generated) / "sizing.json") if settings.generated else None
    if sizing is None or not sizing.get("per_class"):  # no generation, or edits only
        return None
    plan = pd.DataFrame.from_dict(sizing["per_class"], orient="index")
    table = pd.DataFrame(
        {
            "real": plan["real"],
            "needed": plan["needed"],
            "expected acceptance %": 100 * plan["acceptance"].astype(float),
            "seeds x K": [f"{s} x {k}" if s else "-" for s, k in zip(plan["seeds"], plan["k"], strict=True)],
        }
    )
    merged = Path(settings.generated) / "manifest.csv"
    if merged.is_file():  # what was generated per label (expansions and edits; not the copy twins)
        made = pd.read_csv(merged, dtype=str, keep_default_na=False)
        kind = made["gen_kind"] if "gen_kind" in made else pd.Series("", index=made.index)
        table["generated"] = made[~kind.isin(["copy", "identity"])]["label"].value_counts()
    manifest = Path(settings.verify) / "manifest.csv" if settings.verify else None
    if manifest is not None and manifest.is_file():
        voted = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        accepted = voted[voted["v_accepted"] == "true"]
        kind = accepted["gen_kind"] if "gen_kind" in accepted else pd.Series("", index=accepted.index)
        table["accepted"] = accepted[~kind.isin(["copy", "identity"])]["label"].value_counts()
        if "generated" in table:
            table["acceptance %"] = (
                100 * table["accepted"].fillna(0) / table["generated"].where(table["generated"] > 0)
            )
        if sizing.get("copy_twins"):
            table["accepted copies"] = accepted[kind == "copy"]["label"].value_counts()
    table = table.reindex([name for name in CLASSES if name in table.index])
    counted = [c for c in ("generated", "accepted", "accepted copies") if c in table]
    table[counted] = table[counted].fillna(0).astype(int)
    table.index.name = "class"
    return table


def row_counts_tables(settings: ReportSettings) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per grid row: synthetic images added to each class, the largest/smallest class ratio
    reached, and each class' share of training draws (%) under the row's sampler (plain: its
    share of the images; balanced: an equal share of every class present). From each training
    set's augment_report.json; None when no row trains on an augmented set."""
    if not settings.training_sets or settings.augment is None:
        return None
    parent = Path(settings.augment).parent
    added, shares, original = {}, {}, None
    reports = {}
    for run, (folder, _) in settings.training_sets.items():
        if folder:
            reports[run] = _read_json(parent / folder / "augment_report.json")
            if reports[run] is not None:
                original = {c: v["original"] for c, v in reports[run]["per_class"].items()}
    if original is None:
        return None
    for run, (folder, sampler) in settings.training_sets.items():
        report = reports.get(run)
        if folder and report is None:
            continue  # its set was not built (a skipped stage)
        counts = {c: v["training set"] for c, v in report["per_class"].items()} if report else original
        present = [c for c in CLASSES if counts.get(c, 0) > 0]
        row = {c: (report["per_class"][c]["added"] if report else 0) for c in CLASSES}
        values = [counts[c] for c in present]
        row["ratio"] = max(values) / min(values) if values else float("nan")
        added[run] = row
        total = sum(counts.get(c, 0) for c in CLASSES)
        shares[run] = {  # an empty set (the vote accepted nothing): no draws, NaN
            c: float("nan")
            if not total
            else (100 / len(present) if c in present else 0.0)
            if sampler == "balanced"
            else 100 * counts.get(c, 0) / total
            for c in CLASSES
        }
    added_table = pd.DataFrame.from_dict(added, orient="index")
    added_table.index.name = "run"
    share_table = pd.DataFrame.from_dict(shares, orient="index")
    share_table.index.name = "run"
    return added_table, share_table


def _row_results(evaluations: Path, table: pd.DataFrame, run: str, row_keys: dict[str, str] | None) -> Path:
    """The folder of a table row's results: a row with seeds, its first seed's (the others are
    in MLflow). `row_keys`: table label -> the row key its results are filed under."""
    key = (row_keys or {}).get(run, run.lower())
    first = seeds_of(table)[:1]
    return evaluations / key / f"{SEED_PREFIX}{first[0]}" if first else evaluations / key


def _confusion(
    evaluations: Path | None,
    test_set: str,
    table: pd.DataFrame,
    out: Path,
    row_keys: dict[str, str] | None = None,
) -> list[dict]:
    """Each in-domain row's confusion matrix, copied into the report, or why there is none
    (`row_keys`: table label -> the row key its results are filed under)."""
    skipped = table.attrs.get(SKIPPED) or {}
    rows = []
    for run in table.index:
        key = (row_keys or {}).get(run, run.lower())
        source = None
        if evaluations is not None:
            source = _row_results(evaluations, table, run, row_keys) / test_set / "confusion.png"
        picture = source and _copy(source, out, f"confusion_{key}.png")
        rows.append({"run": run, "picture": picture or None, "skipped": skipped.get(run)})
    return rows


def _samples(generated: Path | None, out: Path) -> list[dict]:
    """The generated contact sheet of each class, copied into the report."""
    if generated is None:
        return []
    return [
        {"name": name, "picture": picture}
        for name in CLASSES
        if (picture := _copy(generated / f"samples_{name}.png", out, f"samples_{name}.png"))
    ]


def acceptance_table(verify_folder: Path | None) -> pd.DataFrame | None:
    """Generated and accepted synthetic images per class, and the accepted images' diversity and
    distance to their seed images as % of the real images' diversity (from verify_report.json;
    a report written before seed distances existed leaves that column out)."""
    report = _read_json(verify_folder / "verify_report.json") if verify_folder else None
    if report is None:
        return None
    per_class = pd.DataFrame.from_dict(report["per_class"], orient="index")
    table = per_class[["generated", "accepted"]].copy()
    table["acceptance %"] = (
        100 * table["accepted"] / table["generated"].where(table["generated"] > 0)
    ).round(1)
    real = per_class["diversity_real"].astype(float)
    table["diversity % of real"] = (100 * per_class["diversity_synthetic"].astype(float) / real).round(1)
    if "seed_distance" in per_class:
        distance = per_class["seed_distance"].astype(float)
        table["distance to seed % of real diversity"] = (100 * distance / real).round(1)
    table.index.name = "class"
    return table


def rejection_table(verify_folder: Path | None) -> tuple[pd.DataFrame | None, dict[str, str]]:
    """Per class, how many synthetic images each rule of the vote rejected (an image can fail
    several), and for each class without an accepted image, why (from verify_report.json)."""
    report = _read_json(verify_folder / "verify_report.json") if verify_folder else None
    if report is None or not report.get("rejected_by_class"):
        return None, {}
    table = pd.DataFrame.from_dict(report["rejected_by_class"], orient="index")
    table = table.drop(columns=[c for c in ("verified", "accepted") if c in table.columns])
    table = table.loc[:, (table != 0).any(axis=0)] if not table.empty else table
    table.index.name = "class"
    return table, dict(report.get("no_accepted_because") or {})


def confusion_tables(evaluations: Path | None, test_set: str, table: pd.DataFrame, row_keys) -> list[dict]:
    """Each row's confusion matrix on `test_set` as % of each true class (the first seed's, as
    in the report's pictures), or None where the row has no results."""
    if evaluations is None:
        return []
    first = seeds_of(table)[:1]
    out = []
    for run in table.index:
        source = _row_results(evaluations, table, run, row_keys) / test_set / "confusion_normalised.csv"
        matrix = None
        if source.is_file():
            matrix = pd.read_csv(source, index_col=0) * 100
            matrix.index.name = "true \\ predicted"
        out.append(
            {
                "run": run,
                "seed": first[0] if first else None,
                "markdown": markdown.table(matrix, default=".1f") if matrix is not None else "",
            }
        )
    return out


def write_results_page(
    path: Path,
    experiment: str,
    comparisons,
    paired: pd.DataFrame,
    settings: ReportSettings,
    added: pd.DataFrame | None = None,
    counts: dict[str, str] | None = None,
) -> Path:
    """The results page a run writes for the repository (docs/results/<experiment>.md): the
    comparison tables, what the synthetic data bought, the confusion matrices, the acceptance
    per class with the vote's reasons, and each stage's wall time."""
    from fersynth.stage_times import times_markdown

    acceptance = acceptance_table(_folder(settings.verify))
    rejections, none_accepted = rejection_table(_folder(settings.verify))
    test_set, in_domain = comparisons[0]
    text = markdown.render(
        RESULTS_TEMPLATE,
        experiment=experiment,
        report_folder=str(settings.output),
        tables=[
            {
                "title": f"{name} ({'in-domain' if i == 0 else 'cross-dataset'})",
                "markdown": to_markdown(t).strip(),
            }
            for i, (name, t) in enumerate(comparisons)
        ],
        changes=changes_markdown(paired, list(in_domain.columns)) if not paired.empty else "",
        changes_footnote=spread_footnote(seeds_of(in_domain), family_sizes(paired)),
        generator_added=changes_markdown(added, list(in_domain.columns))
        if added is not None and not added.empty
        else "",
        generator_footnote=spread_footnote(seeds_of(in_domain), family_sizes(added))
        if added is not None and not added.empty
        else "",
        counts=counts if counts is not None else counts_markdown(settings),
        acceptance=markdown.table(acceptance, dict.fromkeys(acceptance.columns[2:], ".1f"))
        if acceptance is not None
        else "",
        rejections=markdown.table(rejections) if rejections is not None and not rejections.empty else "",
        none_accepted=none_accepted,
        confusion_test_set=test_set,
        confusion=confusion_tables(_folder(settings.evaluations), test_set, in_domain, settings.row_keys),
        stage_times=times_markdown(settings.stage_times) if settings.stage_times is not None else "",
    )
    atomic_write_text(Path(path), text)
    return Path(path)


def counts_markdown(settings: ReportSettings) -> dict[str, str]:
    """The generation and per-row count tables as markdown ("" where a table has no data)."""
    generation = generation_table(settings)
    rows = row_counts_tables(settings)
    return {
        "generation": markdown.table(generation, {"expected acceptance %": ".0f", "acceptance %": ".1f"})
        if generation is not None
        else "",
        "added": markdown.table(rows[0], {"ratio": ".2f"}) if rows is not None else "",
        "shares": markdown.table(rows[1], default=".1f") if rows is not None else "",
    }


def generator_changes(comparisons, twins: list[tuple[str, str]] | None) -> pd.DataFrame:
    """Each row on generated images minus its copy twin, per class, paired over seeds (one
    Holm family per test set): what the generator added beyond copying its seeds."""
    if not twins:
        return pd.DataFrame(columns=["change", "column", "mean", "std", "n", "p", "marked"])
    return pd.concat([paired_changes(table, twins, name) for name, table in comparisons], ignore_index=True)


def run_report(settings: ReportSettings, *, force: bool = False, experiment: str = "") -> ReportResult:
    if not settings.comparisons:
        raise FersynthError("report.comparisons: give at least one `fersynth compare` output folder")
    comparisons = [read_comparison(folder) for folder in settings.comparisons]
    test_set, in_domain = comparisons[0]
    columns = list(in_domain.columns)
    paired = pd.concat(
        [paired_changes(table, settings.changes or [], name) for name, table in comparisons],
        ignore_index=True,
    )
    changes = wide_changes(paired, columns)
    added = generator_changes(comparisons, settings.twins)
    counts = counts_markdown(settings)
    footnote = spread_footnote(seeds_of(in_domain), family_sizes(paired))  # Holm: one family per test set
    skipped = in_domain.attrs.get(SKIPPED) or {}
    with staged_folder(settings.output, force=force) as out:
        text = markdown.render(
            REPORT_TEMPLATE,
            comparisons=[
                to_markdown(table, f"Accuracy (%) on {name} ({'in-domain' if i == 0 else 'cross-dataset'})")
                for i, (name, table) in enumerate(comparisons)
            ],
            changes=changes_markdown(paired, columns) if not changes.empty else "",
            changes_footnote=footnote,
            changes_chart=changes_chart(changes, out / "changes.png").name if not changes.empty else "",
            generator_added=changes_markdown(added, columns) if not added.empty else "",
            generator_footnote=spread_footnote(seeds_of(in_domain), family_sizes(added))
            if not added.empty
            else "",
            counts=counts,
            confusion=_confusion(_folder(settings.evaluations), test_set, in_domain, out, settings.row_keys),
            quality=_quality(_folder(settings.quality), out),
            verify=_verify(_folder(settings.verify), out),
            augment=_augment(_folder(settings.augment)),
            samples=_samples(_folder(settings.generated), out),
            generated=None if settings.generated is None else str(settings.generated),
        )
        atomic_write_text(out / REPORT_MD, text)
        summary = {
            "comparisons": {name: _json_table(table) for name, table in comparisons},
            "changes": changes.round(4).to_dict(orient="index"),
            # Per change and column: test_set, mean, std, n (seeds), p (paired t-test), p_holm
            # (Holm-corrected within the test set), marked (p_holm < ALPHA).
            "paired_changes": json.loads(paired.round(4).to_json(orient="records")),
            # The same for each row on generated images minus its copy twin, long and wide.
            "generator_added": json.loads(added.round(4).to_json(orient="records")),
            "generator_changes": wide_changes(added, columns).round(4).to_dict(orient="index"),
            "skipped": skipped,
        }
        atomic_write_text(out / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    if settings.results_page is not None:
        write_results_page(settings.results_page, experiment, comparisons, paired, settings, added, counts)
    return ReportResult(Path(settings.output), changes)
