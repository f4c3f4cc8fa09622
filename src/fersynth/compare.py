"""`fersynth compare`: the thesis' comparison table from several evaluation results.

One row per run (Original_SL, Expanded_SL, Original_MEK, ...); columns are the classes
sorted by their training count (most first, as the reference run was trained), then Total and
Mean accuracy. The best value of each column is marked. A skipped row (fersynth.skipped: e.g.
a synthetic-only set the vote left empty) stays in the table, empty, with its reason below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.skipped import SKIPPED_JSON, skipped_reason

SKIPPED = "skipped"  # table.attrs key: {row: reason}
# What `fersynth evaluate` writes per test set; defined here so that reading results (compare,
# report) does not import torch (7 s on two cores).
METRICS_JSON = "metrics.json"


@dataclass(frozen=True)
class RunResult:
    name: str
    metrics: dict | None
    skipped: str | None = None  # the reason, when the run had nothing to train on


def load_result(name: str, folder: Path, test_set: str | None) -> RunResult:
    """Metrics of one run: `folder` is an evaluate output (one sub-folder per test set) or a
    test-set folder holding metrics.json."""
    folder = Path(folder)
    reason = skipped_reason(folder)
    if reason is not None:
        return RunResult(name, None, skipped=reason)
    direct = folder / METRICS_JSON
    if direct.is_file():
        return RunResult(name, json.loads(direct.read_text()))
    candidates = sorted(p.parent.name for p in folder.glob(f"*/{METRICS_JSON}"))
    if not candidates:
        raise FersynthError(f"{folder}: no evaluation results ({METRICS_JSON}) for run {name!r}")
    chosen = test_set or candidates[0]
    if chosen not in candidates:
        raise FersynthError(f"{folder}: no test set {chosen!r} (has {', '.join(candidates)})")
    return RunResult(name, json.loads((folder / chosen / METRICS_JSON).read_text()))


def column_order(train_counts: dict[str, int] | None) -> list[str]:
    """Classes by training count, largest first (canonical order breaks ties)."""
    if not train_counts:
        return list(CLASSES)
    return sorted(CLASSES, key=lambda name: (-train_counts.get(name, 0), CLASSES.index(name)))


def comparison_table(runs: list[RunResult], order_by: dict[str, int] | None = None) -> pd.DataFrame:
    """Accuracies in percent: rows = runs, columns = classes by training count, Total, Mean."""
    if not runs:
        raise FersynthError("compare: give at least one NAME=RESULTS pair")
    ran = [run for run in runs if run.metrics is not None]
    order = column_order(order_by or (ran[0].metrics.get("train_counts") if ran else None))
    rows = {}
    for run in runs:
        if run.metrics is None:
            rows[run.name] = dict.fromkeys([*order, "Total", "Mean"], float("nan"))
            continue
        per_class = run.metrics["per_class_accuracy"]
        row = {name: per_class[name] * 100 if per_class[name] is not None else float("nan")
               for name in order}  # fmt: skip
        row["Total"] = run.metrics["accuracy"] * 100
        row["Mean"] = run.metrics["mean_accuracy"] * 100
        rows[run.name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    table.attrs[SKIPPED] = {run.name: run.skipped for run in runs if run.skipped}
    return table


def to_markdown(table: pd.DataFrame, title: str = "") -> str:
    """Markdown with the best value of each column in bold."""
    best = table.max(axis=0, skipna=True)
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
            else:
                text = f"{value:.2f}"
                cells.append(f"**{text}**" if abs(value - best[column]) < 1e-9 else text)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
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
    # The skipped rows' reasons ({} when every row ran), for the report.
    atomic_write_text(output / SKIPPED_JSON, json.dumps(table.attrs.get(SKIPPED) or {}, indent=2) + "\n")
    return markdown_path, csv_path


def read_comparison(folder: Path) -> tuple[str, pd.DataFrame]:
    """(test set name, table in percent, skipped rows in `attrs`) from a compare output folder."""
    folder = Path(folder)
    csv = folder / "comparison.csv"
    if not csv.is_file():
        raise FersynthError(f"{folder}: no comparison.csv (run `fersynth compare` first)")
    table = pd.read_csv(csv, index_col="run")
    skipped = folder / SKIPPED_JSON
    table.attrs[SKIPPED] = json.loads(skipped.read_text()) if skipped.is_file() else {}
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
