"""What DVC compares between experiments: each grid row's metrics file and plots.

`fersynth evaluate --row` writes, beside the row's results, the files dvc.yaml declares as the
row's `metrics` and `plots`, so that `dvc exp show`, `dvc metrics diff` and `dvc plots diff`
compare runs as DVC users expect (iterative/example-get-started does the same):

- `runs/<experiment>/metrics/<row>.json`: per test set, the total and mean per-class accuracy
  and each class' accuracy, in %, the mean over the row's seeds, with their standard deviation
  (`*_std`, the sample standard deviation; 0 for one seed) and the number of seeds.
- `runs/<experiment>/plots/<row>/confusion/<test set>.csv`: `label,predicted` per test image
  and seed (DVC's confusion template).
- `runs/<experiment>/plots/<row>/validation/seed_<s>.csv`: validation accuracy against images
  seen, one file per seed (from `train_log.jsonl`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fersynth.classes import CLASSES
from fersynth.files import atomic_write_text, staged_folder
from fersynth.settings import seed_folder

ROUND = 2  # to the hundredth of a percent, as the results page


def _spread(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float) * 100
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return round(float(array.mean()), ROUND), round(std, ROUND)


def row_metrics(outcomes: list[tuple[int, list]]) -> dict[str, Any]:
    """{test set: {accuracy, accuracy_std, mean_accuracy, mean_accuracy_std, per_class: {class:
    value}, per_class_std, seeds}} from `stages.evaluate_row`'s [(seed, [TestSetResult])];
    {"skipped": 1} when no seed has results (a row with nothing to train on)."""
    by_set: dict[str, list[dict[str, Any]]] = {}
    for _, results in outcomes:
        for result in results:
            by_set.setdefault(result.name, []).append(result.metrics)
    if not by_set:
        return {"skipped": 1}
    table: dict[str, Any] = {}
    for name, runs in by_set.items():
        entry: dict[str, Any] = {"seeds": len(runs)}
        for key in ("accuracy", "mean_accuracy"):
            entry[key], entry[f"{key}_std"] = _spread([run[key] for run in runs])
        per_class, per_class_std = {}, {}
        for cls in CLASSES:
            values = [
                run["per_class_accuracy"][cls] for run in runs if run["per_class_accuracy"][cls] is not None
            ]
            if values:
                per_class[cls], per_class_std[cls] = _spread(values)
        entry["per_class"], entry["per_class_std"] = per_class, per_class_std
        table[name] = entry
    return table


def write_row_files(
    metrics_file: Path, plots_folder: Path, outcomes: list[tuple[int, list]], models: Path
) -> None:
    """Write a row's metrics file and plots (see the module's docstring); atomic, replacing
    what an earlier run left."""
    from fersynth.train.loop import validation_curve

    atomic_write_text(metrics_file, json.dumps(row_metrics(outcomes), indent=2, sort_keys=True) + "\n")
    with staged_folder(plots_folder, force=True) as staging:
        confusion: dict[str, list[pd.DataFrame]] = {}
        for seed, results in outcomes:
            for result in results:
                predictions = pd.read_csv(result.folder / "predictions.csv", usecols=["label", "predicted"])
                confusion.setdefault(result.name, []).append(predictions.assign(seed=seed))
        for name, frames in confusion.items():
            target = staging / "confusion" / f"{name}.csv"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(pd.concat(frames).to_csv(index=False, lineterminator="\n"))
        for seed, results in outcomes:
            folder = Path(models) / seed_folder(seed)
            settings_file, log_file = folder / "settings.json", folder / "train_log.jsonl"
            if not results or not settings_file.is_file() or not log_file.is_file():
                continue
            batch = json.loads(settings_file.read_text())["train"]["batch_size"]
            curve = pd.DataFrame(validation_curve(folder, batch))
            target = staging / "validation" / f"{seed_folder(seed)}.csv"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(curve.to_csv(index=False, lineterminator="\n"))
