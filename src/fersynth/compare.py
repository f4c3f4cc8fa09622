"""`fersynth compare`: the thesis' comparison table from several evaluation results.

One row per run (Original_SL, Expanded_SL, Original_MEK, ...); columns are the classes
sorted by their training count (most first, as the reference run was trained), then Total and
Mean accuracy. The best value of each column is marked. A skipped row (fersynth.skipped: e.g.
a synthetic-only set the vote left empty) stays in the table, empty, with its reason below.

A row trained with several seeds (experiment.grid.seeds: results in `seed_<s>/` folders) shows
the mean and the standard deviation over its seeds; `paired_changes` compares two rows seed by
seed (paired t-test) and marks a difference only when it is beyond the seed spread, after a
Holm-Bonferroni correction for the number of cells compared (every change x column of one
call is one family), and never a difference with no spread over the seeds (the same
difference on every seed, or a single seed: p is NaN there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.settings import SEED_PREFIX
from fersynth.skipped import SKIPPED_JSON, skipped_reason

SKIPPED = "skipped"  # table.attrs key: {row: reason}
SPREAD = "spread"  # table.attrs key: {row: {column: standard deviation over seeds}}
PER_SEED = "per_seed"  # table.attrs key: long table run, seed, column, value
ALPHA = 0.05  # a paired difference is marked when its Holm-adjusted two-sided p is below this
MIN_SEEDS = 3  # ... and the two rows share at least this many seeds
# Per-seed differences spread less than this (accuracy points) count as no spread: the same
# difference on every seed up to float rounding (the CSVs keep 4 decimals) has no p-value.
NO_SPREAD = 1e-6
CHANGE_COLUMNS = ["change", "test_set", "column", "mean", "std", "n", "p", "p_holm", "marked"]
# What `fersynth evaluate` writes per test set; defined here so that reading results (compare,
# report) does not import torch (7 s on two cores).
METRICS_JSON = "metrics.json"
SPREAD_CSV = "comparison_std.csv"  # standard deviation over seeds, rows with several seeds
PER_SEED_CSV = "comparison_seeds.csv"  # every seed's value: run, seed, column, value


@dataclass(frozen=True)
class RunResult:
    name: str
    metrics: dict | None  # the first seed's (or the only) results
    skipped: str | None = None  # the reason, when the run had nothing to train on
    by_seed: dict[str, dict] = field(default_factory=dict)  # seed -> results, for several seeds


def _load_one(name: str, folder: Path, test_set: str | None) -> dict | None | str:
    reason = skipped_reason(folder)
    if reason is not None:
        return reason
    direct = folder / METRICS_JSON
    if direct.is_file():
        return json.loads(direct.read_text())
    candidates = sorted(p.parent.name for p in folder.glob(f"*/{METRICS_JSON}"))
    if not candidates:
        raise FersynthError(f"{folder}: no evaluation results ({METRICS_JSON}) for run {name!r}")
    chosen = test_set or candidates[0]
    if chosen not in candidates:
        raise FersynthError(f"{folder}: no test set {chosen!r} (has {', '.join(candidates)})")
    return json.loads((folder / chosen / METRICS_JSON).read_text())


def load_result(name: str, folder: Path, test_set: str | None, seeds: list[int] | None = None) -> RunResult:
    """Metrics of one run: `folder` is an evaluate output (one sub-folder per test set), a
    test-set folder holding metrics.json, or a grid row's results with one `seed_<s>` folder
    per training seed: those of `seeds` (the grid's, in order; a missing one is an error), or
    every one found, in seed order, when `seeds` is None."""
    folder = Path(folder)
    found = {p.name.removeprefix(SEED_PREFIX): p for p in folder.glob(f"{SEED_PREFIX}*") if p.is_dir()}
    if not found:
        loaded = _load_one(name, folder, test_set)
        if isinstance(loaded, str):
            return RunResult(name, None, skipped=loaded)
        return RunResult(name, loaded)
    if seeds is None:
        chosen = sorted(found, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    else:
        chosen = [str(seed) for seed in seeds]
        missing = [seed for seed in chosen if seed not in found]
        if missing:
            raise FersynthError(
                f"{folder}: no results for seed {', '.join(missing)} of experiment.grid.seeds "
                f"(has {', '.join(sorted(found))}); run `fersynth evaluate --row` for it"
            )
    by_seed = {}
    for seed in chosen:
        loaded = _load_one(name, found[seed], test_set)
        if isinstance(loaded, str):  # the row's data was empty: every seed is skipped alike
            return RunResult(name, None, skipped=loaded)
        by_seed[seed] = loaded
    return RunResult(name, next(iter(by_seed.values())), by_seed=by_seed)


def column_order(train_counts: dict[str, int] | None) -> list[str]:
    """Classes by training count, largest first (canonical order breaks ties)."""
    if not train_counts:
        return list(CLASSES)
    return sorted(CLASSES, key=lambda name: (-train_counts.get(name, 0), CLASSES.index(name)))


def _values(metrics: dict, order: list[str]) -> dict[str, float]:
    """One evaluation as percentages: the classes in `order`, Total and Mean."""
    per_class = metrics["per_class_accuracy"]
    row = {name: per_class[name] * 100 if per_class[name] is not None else float("nan") for name in order}
    row["Total"] = metrics["accuracy"] * 100
    row["Mean"] = metrics["mean_accuracy"] * 100
    return row


def comparison_table(runs: list[RunResult], order_by: dict[str, int] | None = None) -> pd.DataFrame:
    """Accuracies in percent: rows = runs, columns = classes by training count, Total, Mean.

    A run with several seeds shows its mean over them; `attrs[SPREAD]` holds the standard
    deviations (ddof 1) and `attrs[PER_SEED]` every seed's values (run, seed, column, value)."""
    if not runs:
        raise FersynthError("compare: give at least one NAME=RESULTS pair")
    ran = [run for run in runs if run.metrics is not None]
    order = column_order(order_by or (ran[0].metrics.get("train_counts") if ran else None))
    rows, spread, per_seed = {}, {}, []
    for run in runs:
        if run.metrics is None:
            rows[run.name] = dict.fromkeys([*order, "Total", "Mean"], float("nan"))
            continue
        seeds = run.by_seed or {"": run.metrics}
        values = pd.DataFrame({seed: _values(metrics, order) for seed, metrics in seeds.items()}).T
        rows[run.name] = values.mean(axis=0).to_dict()
        if len(values) > 1:
            spread[run.name] = values.std(axis=0, ddof=1).to_dict()
        for seed, row in values.iterrows():
            per_seed += [(run.name, seed, column, value) for column, value in row.items()]
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    table.attrs[SKIPPED] = {run.name: run.skipped for run in runs if run.skipped}
    table.attrs[SPREAD] = spread
    table.attrs[PER_SEED] = pd.DataFrame(per_seed, columns=["run", "seed", "column", "value"])
    return table


def seeds_of(table: pd.DataFrame) -> list[str]:
    """The seeds the table's rows were trained with ([] for single runs without seed folders)."""
    per_seed = table.attrs.get(PER_SEED)
    if per_seed is None or per_seed.empty:
        return []
    return list(dict.fromkeys(str(s) for s in per_seed["seed"] if str(s) != ""))  # first seen first


def paired_changes(table: pd.DataFrame, pairs: list[tuple[str, str]], test_set: str) -> pd.DataFrame:
    """Each (row, baseline) pair's change in accuracy points, per column, paired over seeds.

    Long table: change ("<row> - <baseline> (<test set>)"), test_set, column, mean (of the
    per-seed differences), std (their standard deviation, ddof 1), n (seeds both rows have; 0
    when they share none: the difference of the two means, unpaired), p (paired two-sided
    t-test, scipy.stats.ttest_rel; NaN where the difference has no spread over the seeds:
    fewer than two seeds, unpaired, or the same difference on every seed, zero or not), p_holm
    (p after the Holm-Bonferroni correction, `holm`, over every cell of this call that has a
    p: all changes x all columns are one family) and marked (p_holm < ALPHA over at least
    MIN_SEEDS shared seeds: the difference is beyond the seed spread)."""
    from scipy.stats import ttest_rel

    per_seed = table.attrs.get(PER_SEED)
    records = []
    for row, baseline in pairs:
        if row not in table.index or baseline not in table.index:
            continue
        label = f"{row} - {baseline} ({test_set})"
        for column in table.columns:
            if per_seed is not None and not per_seed.empty:
                a = per_seed[(per_seed["run"] == row) & (per_seed["column"] == column)].set_index("seed")[
                    "value"
                ]
                b = per_seed[(per_seed["run"] == baseline) & (per_seed["column"] == column)].set_index(
                    "seed"
                )["value"]
                both = a.index.intersection(b.index)
                if both.empty and len(a) and len(b):  # no seed in common: unpaired, never marked
                    a, b = np.array([a.astype(float).mean()]), np.array([b.astype(float).mean()])
                    if not (np.isnan(a[0]) or np.isnan(b[0])):
                        records.append(_change(label, test_set, column, a - b, 0, float("nan")))
                    continue
                a, b = a.loc[both].astype(float), b.loc[both].astype(float)
                keep = a.notna() & b.notna()
                a, b = a[keep].to_numpy(), b[keep].to_numpy()
            else:
                a = np.array([table.at[row, column]], dtype=float)
                b = np.array([table.at[baseline, column]], dtype=float)
                keep = ~(np.isnan(a) | np.isnan(b))
                a, b = a[keep], b[keep]
            if len(a) == 0:
                continue
            difference = a - b
            p = float("nan")  # no spread (one seed, or the same difference on every seed): no test
            if len(a) >= 2 and np.ptp(difference) > NO_SPREAD:
                p = float(ttest_rel(a, b).pvalue)
            records.append(_change(label, test_set, column, difference, len(a), p))
    changes = pd.DataFrame(records, columns=CHANGE_COLUMNS)
    changes["p_holm"] = holm(changes["p"].to_numpy(dtype=float))
    changes["marked"] = (changes["n"] >= MIN_SEEDS) & (changes["p_holm"] < ALPHA)  # NaN: False
    return changes


def _change(label: str, test_set: str, column: str, difference: np.ndarray, n: int, p: float) -> dict:
    return {
        "change": label,
        "test_set": test_set,
        "column": column,
        "mean": float(difference.mean()),
        "std": float(difference.std(ddof=1)) if len(difference) > 1 else float("nan"),
        "n": n,
        "p": p,
        "p_holm": float("nan"),  # set over the whole family by paired_changes
        "marked": False,
    }


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979, "A simple sequentially rejective multiple
    test procedure", Scand. J. Statist. 6:65-70), the step-down form of
    statsmodels.stats.multitest.multipletests(method="holm"): with the m non-NaN p-values sorted
    p_(1) <= ... <= p_(m), p_holm_(i) = min(1, max over j <= i of (m - j + 1) p_(j)). NaN stays
    NaN and does not count in m. Rejecting where p_holm < alpha keeps the family-wise error rate
    at alpha."""
    p = np.asarray(p, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def family_sizes(changes: pd.DataFrame) -> dict[str, int]:
    """The Holm family size m (cells with a p-value) of each test set in a `paired_changes`
    long table, or a concatenation of several (one call per test set), in order of appearance."""
    if changes.empty or "test_set" not in changes:
        return {}
    tested = changes[changes["p"].notna()]
    return {name: int((tested["test_set"] == name).sum()) for name in dict.fromkeys(changes["test_set"])}


def spread_footnote(seeds: list[str], cells: int | dict[str, int] | None = None) -> str:
    """What the ± and the marks mean, for the tables' footnotes. `cells`: the number of cells
    the Holm correction ran over (one `paired_changes` call's), or {test set: that number}
    when the table holds several calls' changes (`family_sizes`)."""
    if len(seeds) < 2:
        return "One training seed: no spread is known, so no difference is marked."
    if isinstance(cells, dict):
        cells = {name: count for name, count in cells.items() if count}
        if len(cells) == 1:
            cells = next(iter(cells.values()))
    if isinstance(cells, dict) and cells:
        family = (
            "Holm-corrected within each test set over its cells with a p-value ("
            + ", ".join(f"{count} on {name}" for name, count in cells.items())
            + ")"
        )
    elif isinstance(cells, int) and cells:
        family = (
            f"Holm-corrected over the {cells} cell{'' if cells == 1 else 's'} of this table with a p-value"
        )
    else:
        family = "Holm-corrected over the cells of the table of changes"
    text = (
        f"Mean ± standard deviation over {len(seeds)} training seeds ({', '.join(seeds)}). A change is "
        "marked * only when it is beyond the seed spread: paired t-test over the seeds, two-sided, "
        f"{family}, adjusted p < {ALPHA}, with at least {MIN_SEEDS} seeds; the same difference on every "
        "seed has no spread and is never marked; (n=k): only k seeds in common."
    )
    if len(seeds) < MIN_SEEDS:
        text += f" With {len(seeds)} seeds nothing is marked yet."
    return text


def to_markdown(table: pd.DataFrame, title: str = "") -> str:
    """Markdown with the best (mean) value of each column in bold; `mean ± std` where the row
    has several seeds."""
    best = table.max(axis=0, skipna=True)
    spread = table.attrs.get(SPREAD) or {}
    header = "| run | " + " | ".join(table.columns) + " |"
    lines = ([f"**{title}**", ""] if title else []) + [
        header,
        "|---" * (len(table.columns) + 1) + "|",
    ]
    for run, row in table.iterrows():
        cells = []
        for column, value in row.items():
            if pd.isna(value):
                cells.append("-")
                continue
            text = f"{value:.2f}"
            text = f"**{text}**" if abs(value - best[column]) < 1e-9 else text
            deviation = (spread.get(run) or {}).get(column)
            if deviation is not None and not pd.isna(deviation):
                text += f" ± {deviation:.2f}"
            cells.append(text)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    seeds = seeds_of(table)
    if seeds:
        lines += ["", spread_footnote(seeds)]
    skipped = table.attrs.get(SKIPPED) or {}
    if skipped:
        lines += ["", *(f"{run}: skipped, {reason}" for run, reason in skipped.items())]
    return "\n".join(lines) + "\n"


def write_comparison(table: pd.DataFrame, output: Path, title: str = "") -> tuple[Path, Path]:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    markdown_path, csv_path = output / "comparison.md", output / "comparison.csv"
    atomic_write_text(markdown_path, to_markdown(table, title))
    atomic_write_text(csv_path, table.round(4).to_csv(lineterminator="\n"))
    spread = pd.DataFrame.from_dict(table.attrs.get(SPREAD) or {}, orient="index").reindex(
        columns=table.columns
    )
    spread.index.name = "run"
    atomic_write_text(output / SPREAD_CSV, spread.round(4).to_csv(lineterminator="\n"))
    per_seed = table.attrs.get(PER_SEED)
    if per_seed is None:
        per_seed = pd.DataFrame(columns=["run", "seed", "column", "value"])
    atomic_write_text(
        output / PER_SEED_CSV, per_seed.round({"value": 4}).to_csv(index=False, lineterminator="\n")
    )
    # The skipped rows' reasons ({} when every row ran), for the report.
    atomic_write_text(output / SKIPPED_JSON, json.dumps(table.attrs.get(SKIPPED) or {}, indent=2) + "\n")
    return markdown_path, csv_path


def read_comparison(folder: Path) -> tuple[str, pd.DataFrame]:
    """(test set name, table in percent, skipped rows, spread and per-seed values in `attrs`)
    from a compare output folder."""
    folder = Path(folder)
    csv = folder / "comparison.csv"
    if not csv.is_file():
        raise FersynthError(f"{folder}: no comparison.csv (run `fersynth compare` first)")
    table = pd.read_csv(csv, index_col="run")
    skipped = folder / SKIPPED_JSON
    table.attrs[SKIPPED] = json.loads(skipped.read_text()) if skipped.is_file() else {}
    spread = folder / SPREAD_CSV
    table.attrs[SPREAD] = (
        {run: row.dropna().to_dict() for run, row in pd.read_csv(spread, index_col="run").iterrows()}
        if spread.is_file()
        else {}
    )
    table.attrs[SPREAD] = {run: values for run, values in table.attrs[SPREAD].items() if values}
    per_seed = folder / PER_SEED_CSV
    table.attrs[PER_SEED] = (
        pd.read_csv(per_seed, dtype={"seed": str}, keep_default_na=False, na_values=[""]).assign(
            seed=lambda f: f["seed"].fillna("")
        )
        if per_seed.is_file()
        else None
    )
    return folder.name, table


def parse_run_arguments(pairs: tuple[str, ...] | list[str]) -> list[tuple[str, Path]]:
    runs = []
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise FersynthError(f"compare: {pair!r} is not NAME=RESULTS_FOLDER")
        runs.append((name, Path(folder)))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise FersynthError(f"compare: run names repeat ({', '.join(names)})")
    return runs
