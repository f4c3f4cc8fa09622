"""DVC's own comparison: each row's metrics file and plots, declared in dvc.yaml, read by
`dvc metrics show` and `dvc plots show` in a DVC project laid out as `make run` leaves it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fersynth.classes import CLASSES
from fersynth.dvc_metrics import row_metrics, write_row_files
from fersynth.evaluate import TestSetResult as SetResult  # not a test class to pytest
from fersynth.settings import load_settings
from helpers import REPO

ROOT = REPO
DVC = str(Path(sys.executable).parent / "dvc")


def _result(folder: Path, name: str, accuracy: float, per_class: list[float | None], seed: int) -> SetResult:
    folder.mkdir(parents=True)
    labels = [c for c in CLASSES for _ in range(2)]
    predicted = [c if i % 2 == 0 or c == "happy" else "happy" for i, c in enumerate(labels)]
    (folder / "predictions.csv").write_text(
        "path,label,predicted\n"
        + "".join(f"{i}.png,{a},{b}\n" for i, (a, b) in enumerate(zip(labels, predicted, strict=True)))
    )
    metrics = {
        "accuracy": accuracy,
        "mean_accuracy": float(
            sum(v for v in per_class if v is not None) / sum(v is not None for v in per_class)
        ),
        "per_class_accuracy": dict(zip(CLASSES, per_class, strict=True)),
    }
    return SetResult(name, folder, metrics)


def _model(folder: Path, batch: int) -> None:
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({"seed": 1, "train": {"batch_size": batch}}))
    lines = [{"step": 5, "loss": 1.0, "lr": 0.1}, {"step": 10, "val_accuracy": 0.5, "val_mean_accuracy": 0.4}]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_row_metrics_are_the_seed_mean_and_spread_in_percent():
    a = [0.5, 0.25, None, 1.0, 0.5, 0.5, 0.5]
    b = [0.7, 0.35, None, 1.0, 0.5, 0.5, 0.5]

    def seed(accuracy: float, mean: float, per_class: list) -> list:
        metrics = {"accuracy": accuracy, "mean_accuracy": mean}
        return [
            SetResult(
                "in_domain",
                Path("."),
                {**metrics, "per_class_accuracy": dict(zip(CLASSES, per_class, strict=True))},
            )
        ]

    outcomes = [(1, seed(0.6, 0.54, a)), (2, seed(0.7, 0.6, b))]
    table = row_metrics(outcomes)["in_domain"]
    assert (
        table["seeds"] == 2
        and table["accuracy"] == 65.0
        and table["accuracy_std"] == pytest.approx(7.07, abs=0.01)
    )
    assert table["per_class"]["surprise"] == 60.0 and table["per_class_std"]["fear"] == pytest.approx(
        7.07, abs=0.01
    )
    assert "disgust" not in table["per_class"]  # no test image of it: no accuracy, not a zero
    assert row_metrics([(1, []), (2, [])]) == {"skipped": 1}


def test_dvc_metrics_show_and_plots_show_read_every_row(tmp_path):
    """The demo profile's dvc.yaml and params in a fresh git + DVC project, each row's files
    written by the evaluate stage's writer: DVC finds every row's metrics and both plots."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(ROOT / "profiles" / "demo.yaml", project / "params.yaml")
    for command in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True, timeout=120)
    settings = load_settings(project / "params.yaml")
    rows = list(settings.experiment.grid.rows())
    for index, row in enumerate(rows):
        outcomes = []
        for seed in settings.seeds:
            folder = project / settings.layout.evaluation(row) / f"seed_{seed}"
            results = [
                _result(folder / "in_domain", "in_domain", 0.5 + index / 100, [0.5] * 7, seed),
                _result(folder / "cross", "cross", 0.4, [0.4] * 7, seed),
            ]
            _model(project / settings.row_folder(row) / f"seed_{seed}", 16)
            outcomes.append((seed, results))
        write_row_files(
            project / settings.layout.row_metrics(row),
            project / settings.layout.row_plots(row),
            outcomes,
            project / settings.row_folder(row),
        )
    shown = subprocess.run(
        [DVC, "metrics", "show", "--json"], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    data = next(iter(json.loads(shown.stdout).values()))["data"]
    for index, row in enumerate(rows):
        values = data[settings.layout.row_metrics(row).as_posix()]["data"]
        assert values["in_domain"]["accuracy"] == round(50 + index, 2)
        assert values["in_domain"]["per_class"]["fear"] == 50.0 and values["cross"]["mean_accuracy"] == 40.0
    plots = subprocess.run(
        [DVC, "plots", "show", "--json"], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert plots.returncode == 0, plots.stderr[-2000:]
    shown_plots = json.loads(plots.stdout)["data"]
    for row in rows:
        confusion = shown_plots[f"runs/demo/plots/{row}/confusion/in_domain.csv"][0]["content"]
        encoding = confusion["spec"]["encoding"]  # DVC's confusion template: label x predicted
        assert encoding["x"]["field"] == "predicted" and encoding["y"]["field"] == "label"
        assert len(confusion["data"]["values"]) == len(settings.seeds) * 14  # every seed's rows
        validation = shown_plots[f"runs/demo/plots/{row}/validation/seed_{settings.seeds[0]}.csv"][0][
            "content"
        ]
        assert float(validation["data"]["values"][0]["images_seen"]) == 160  # step 10 x batch 16
