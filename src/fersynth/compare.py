"""`fersynth compare`: the thesis' comparison table from several evaluation results.

One row per run (Original_SL, Expanded_SL, Original_MEK, ...); columns are the classes
sorted by their training count (most first, as the reference run was trained), then Total and
Mean accuracy. The best value of each column is marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.evaluate import METRICS_JSON
from fersynth.files import atomic_write_text


@dataclass(frozen=True)
class RunResult:
    name: str
    metrics: dict


def load_result(name: str, folder: Path, test_set: str | None) -> RunResult:
    """Metrics of one run: `folder` is an evaluate output (one sub-folder per test set) or a
    test-set folder holding metrics.json."""
    folder = Path(folder)
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
    order = column_order(order_by or runs[0].metrics.get("train_counts"))
    rows = {}
    for run in runs:
        per_class = run.metrics["per_class_accuracy"]
        row = {name: per_class[name] * 100 if per_class[name] is not None else float("nan")
               for name in order}  # fmt: skip
        row["Total"] = run.metrics["accuracy"] * 100
        row["Mean"] = run.metrics["mean_accuracy"] * 100
        rows[run.name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
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
    return "\n".join(lines) + "\n"


def write_comparison(table: pd.DataFrame, output: Path, title: str = "") -> tuple[Path, Path]:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    markdown_path, csv_path = output / "comparison.md", output / "comparison.csv"
    atomic_write_text(markdown_path, to_markdown(table, title))
    atomic_write_text(csv_path, table.round(4).to_csv(lineterminator="\n"))
    return markdown_path, csv_path


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
