"""Grid rows trained with several seeds: the table's mean and spread, and paired changes that
are marked only beyond the spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fersynth.classes import CLASSES
from fersynth.compare import (
    comparison_table,
    load_result,
    paired_changes,
    read_comparison,
    to_markdown,
    write_comparison,
)
from fersynth.errors import FersynthError
from fersynth.settings import load_settings
from helpers import make_demo_dataset, markdown_rows

REPO = Path(__file__).resolve().parents[1]


def seeded_results(folder: Path, values: dict[int, float], fear: dict[int, float]) -> Path:
    """Results of one row with one `seed_<s>/test/metrics.json` per seed: every class at
    `values[seed]` except fear at `fear[seed]` (accuracies, 0..1)."""
    for seed, value in values.items():
        per_class = {name: value for name in CLASSES}
        per_class["fear"] = fear[seed]
        target = folder / f"seed_{seed}" / "test"
        target.mkdir(parents=True)
        metrics = {
            "accuracy": value,
            "mean_accuracy": float(np.mean(list(per_class.values()))),
            "per_class_accuracy": per_class,
            "test_set": "test",
            "train_counts": {},
        }
        (target / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def three_rows(tmp_path):
    seeds = (1, 2, 3)
    base = seeded_results(
        tmp_path / "base",
        dict(zip(seeds, (0.50, 0.52, 0.48), strict=True)),
        dict(zip(seeds, (0.10, 0.20, 0.15), strict=True)),
    )
    # Fear up by 30 points on every seed (beyond the spread); everything else within noise.
    better = seeded_results(
        tmp_path / "better",
        dict(zip(seeds, (0.53, 0.49, 0.50), strict=True)),
        dict(zip(seeds, (0.41, 0.49, 0.46), strict=True)),
    )
    return [load_result("Base", base, "test"), load_result("Better", better, "test")]


def test_rows_with_seeds_show_mean_and_spread(three_rows, tmp_path):
    table = comparison_table(three_rows)
    assert table.at["Base", "Total"] == pytest.approx(50.0)
    assert table.at["Better", "fear"] == pytest.approx((41 + 49 + 46) / 3)
    spread = table.attrs["spread"]
    assert spread["Base"]["Total"] == pytest.approx(np.std([50, 52, 48], ddof=1))
    text = to_markdown(table)
    assert "50.00 ± 2.00" in text and "over 3 training seeds (1, 2, 3)" in text
    # Written and read back: the spread and every seed's value survive.
    write_comparison(table, tmp_path / "compare" / "test")
    _, back = read_comparison(tmp_path / "compare" / "test")
    assert back.attrs["spread"]["Base"]["Total"] == pytest.approx(2.0)
    assert len(back.attrs["per_seed"]) == 2 * 3 * len(table.columns)


def test_a_change_is_marked_only_beyond_the_seed_spread(three_rows):
    table = comparison_table(three_rows)
    changes = paired_changes(table, [("Better", "Base")], "test").set_index("column")
    fear, total = changes.loc["fear"], changes.loc["Total"]
    assert fear["mean"] == pytest.approx(((41 - 10) + (49 - 20) + (46 - 15)) / 3)
    assert fear["n"] == 3 and fear["p"] < 0.05 and bool(fear["marked"])
    assert total["mean"] == pytest.approx((3 - 3 + 2) / 3)  # +3, -3, +2 points: noise
    assert total["p"] > 0.05 and not bool(total["marked"])


def test_the_report_table_marks_what_is_beyond_the_spread(three_rows, tmp_path):
    from fersynth.report import changes_markdown

    write_comparison(comparison_table(three_rows), tmp_path / "test")  # every cell filled
    _, table = read_comparison(tmp_path / "test")
    paired = paired_changes(table, [("Better", "Base")], "test")
    cells = dict(
        zip(table.columns, markdown_rows(changes_markdown(paired, list(table.columns)))[1][1:], strict=True)
    )
    assert cells["fear"] == "+30.33 ± 1.15 *" and cells["Total"] == "+0.67 ± 3.21"


def test_rows_without_a_seed_in_common_are_compared_unpaired(tmp_path):
    a = seeded_results(tmp_path / "a", {1: 0.6, 2: 0.6}, {1: 0.5, 2: 0.5})
    b = seeded_results(tmp_path / "b", {3: 0.5, 4: 0.5}, {3: 0.5, 4: 0.5})
    table = comparison_table([load_result("A", a, "test"), load_result("B", b, "test")])
    changes = paired_changes(table, [("A", "B")], "test").set_index("column")
    assert changes.at["Total", "mean"] == pytest.approx(10) and changes.at["Total", "n"] == 0
    assert not changes["marked"].any()


def test_stale_seed_folders_do_not_count(tmp_path):
    folder = seeded_results(tmp_path / "row", {1: 0.5, 2: 0.7, 9: 0.1}, {1: 0.5, 2: 0.7, 9: 0.1})
    assert sorted(load_result("R", folder, "test", seeds=[1, 2]).by_seed) == ["1", "2"]
    with pytest.raises(FersynthError, match="no results for seed 3"):
        load_result("R", folder, "test", seeds=[1, 3])


def test_one_seed_marks_nothing(tmp_path):
    base = seeded_results(tmp_path / "a", {7: 0.5}, {7: 0.1})
    other = seeded_results(tmp_path / "b", {7: 0.9}, {7: 0.9})
    table = comparison_table([load_result("A", base, "test"), load_result("B", other, "test")])
    changes = paired_changes(table, [("B", "A")], "test")
    assert (changes["n"] == 1).all() and not changes["marked"].any()
    assert changes["p"].map(math.isnan).all()
    assert "One training seed: no spread is known" in to_markdown(table)


def test_a_grid_row_trains_once_per_seed_into_its_own_folders(tmp_path, monkeypatch):
    """`fersynth train --row` and `evaluate --row` with experiment.grid.seeds=[5, 6]."""
    from fersynth import stages

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_demo_dataset(tmp_path, train_size=70, test_size=21)
    settings = load_settings(
        REPO / "profiles" / "demo.yaml",
        [
            "experiment.name=seeds",
            "experiment.grid.seeds=[5, 6]",
            f"train.data={data}",
            f"train.output={tmp_path / 'unused'}",
            "train.steps=2",
            "train.eval_every=1",
            "train.arch=resnet18",
            "train.image_size=32",
            "train.batch_size=8",
            "train.warmup_steps=1",
            "train.workers=0",
            f"evaluate.data=[{data}]",
            "evaluate.workers=0",
        ],
    )
    monkeypatch.chdir(tmp_path)
    row = stages.row_settings(settings, "original_sl_balanced")
    outcomes = stages.train(row, "original_sl_balanced", progress=False)
    folder = settings.row_folder("original_sl_balanced")
    assert [result.output for result, _ in outcomes] == [folder / "seed_5", folder / "seed_6"]
    saved = [json.loads((folder / f"seed_{s}" / "settings.json").read_text())["seed"] for s in (5, 6)]
    assert saved == [5, 6]
    weights = [(folder / f"seed_{s}" / "model.pt").read_bytes() for s in (5, 6)]
    assert weights[0] != weights[1]  # different seeds, different models
    # The validation split is the dataset's own, the same for both seeds.
    val = [(folder / f"seed_{s}" / "val_ids.csv").read_text() for s in (5, 6)]
    assert val[0] == val[1] and len(val[0].splitlines()) > 7
    # A voter trains once, with its own seed and the balanced sampler.
    voter = stages.row_settings(settings, "voter_1")
    assert voter.train.balanced_sampler and voter.train.output == settings.layout.voter("voter_1")
    evaluated = stages.evaluate_row(settings, "original_sl_balanced", progress=False)
    assert [seed for seed, _ in evaluated] == [5, 6]
    result = load_result("Original_SL_balanced", settings.layout.evaluation("original_sl_balanced"), "ds")
    assert sorted(result.by_seed) == ["5", "6"]
