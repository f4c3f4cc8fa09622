"""Grid rows trained with several seeds: the table's mean and spread, and paired changes that
are marked only beyond the spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fersynth.classes import CLASSES
from fersynth.compare import (
    PER_SEED,
    comparison_table,
    family_sizes,
    holm,
    load_result,
    paired_changes,
    read_comparison,
    spread_footnote,
    to_markdown,
    write_comparison,
)
from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.folds import fold_of
from fersynth.settings import load_settings
from helpers import REPO, make_demo_dataset, markdown_rows

REPO = REPO


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


def paired_table(
    base: list[float], differences: dict[str, list[float]], rows: tuple[str, ...] = ("Better",)
) -> pd.DataFrame:
    """Row Base and `rows` over seeds 1..k: Base at `base[seed]` in every column, each of `rows`
    at Base plus that column's difference on that seed (accuracy points)."""
    seeds = [str(s + 1) for s in range(len(base))]
    per_seed = []
    for column, difference in differences.items():
        per_seed += [("Base", seed, column, value) for seed, value in zip(seeds, base, strict=True)]
        for row in rows:
            per_seed += [
                (row, seed, column, value + d) for seed, value, d in zip(seeds, base, difference, strict=True)
            ]
    long = pd.DataFrame(per_seed, columns=["run", "seed", "column", "value"])
    table = long.groupby(["run", "column"], sort=False)["value"].mean().unstack()[list(differences)]
    table.attrs[PER_SEED] = long
    return table


def test_the_same_difference_on_every_seed_has_no_spread_and_is_not_marked(tmp_path):
    """Was p = 0 and marked: a difference with no spread over the seeds has no p-value."""
    seeds = (1, 2, 3)
    base = seeded_results(
        tmp_path / "base", dict(zip(seeds, (0.50, 0.52, 0.48), strict=True)), dict.fromkeys(seeds, 0.10)
    )
    # Every column 5 points up on every seed (up to float rounding of 0.55 - 0.50 and so on).
    better = seeded_results(
        tmp_path / "better", dict(zip(seeds, (0.55, 0.57, 0.53), strict=True)), dict.fromkeys(seeds, 0.15)
    )
    write_comparison(
        comparison_table([load_result("Base", base, "test"), load_result("Better", better, "test")]),
        tmp_path / "test",
    )
    for table in (
        comparison_table([load_result("Base", base, "test"), load_result("Better", better, "test")]),
        read_comparison(tmp_path / "test")[1],  # through the CSV's 4 decimals
    ):
        changes = paired_changes(table, [("Better", "Base")], "test").set_index("column")
        assert changes.at["Total", "mean"] == pytest.approx(5) and changes.at["Total", "n"] == 3
        assert changes["p"].map(math.isnan).all() and changes["p_holm"].map(math.isnan).all()
        assert not changes["marked"].any()
    constant = paired_table([50, 52, 48], {"Total": [5.0, 5.0, 5.0]})
    changes = paired_changes(constant, [("Better", "Base")], "test")
    assert math.isnan(changes.at[0, "p"]) and not changes.at[0, "marked"]
    assert family_sizes(changes) == {"test": 0}


def test_holm_adjusts_step_down_and_leaves_nan_out_of_the_family():
    # Hand computation, m = 3: 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 1 x 0.04).
    assert holm(np.array([0.04, 0.01, 0.02])) == pytest.approx([0.04, 0.03, 0.04])
    # NaN stays NaN and does not count in m (still 3); monotone: 2 x 0.012 < 3 x 0.01 -> 0.03.
    adjusted = holm(np.array([0.01, np.nan, 0.012, 0.5]))
    assert math.isnan(adjusted[1])
    assert adjusted[[0, 2, 3]] == pytest.approx([0.03, 0.03, 0.5])
    assert holm(np.array([0.4, 0.6])) == pytest.approx([0.8, 0.8])
    assert holm(np.array([0.7, 0.6])) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm(np.array([])).shape == (0,) and math.isnan(holm(np.array([np.nan]))[0])


def test_changes_are_holm_corrected_over_every_cell_of_the_table():
    """Was marked at raw p < 0.05: four cells below it, only the large one survives Holm."""
    from scipy.stats import ttest_rel

    differences = {
        "a": [3.0, 4.0, 5.0],  # raw p about 0.020
        "b": [2.0, 3.0, 4.0],  # about 0.035
        "c": [2.0, 3.0, 4.5],  # about 0.049
        "big": [30.0, 31.0, 29.5],  # huge, consistent, with spread: about 0.0002
        "same": [5.0, 5.0, 5.0],  # no spread: NaN, outside the family
    }
    table = paired_table([50.0, 52.0, 48.0], differences)
    changes = paired_changes(table, [("Better", "Base")], "test").set_index("column")
    raw = {
        column: ttest_rel(np.array(d) + [50, 52, 48], np.array([50.0, 52.0, 48.0])).pvalue
        for column, d in differences.items()
        if column != "same"
    }
    assert changes["p"].drop("same").to_dict() == pytest.approx(raw)
    assert all(p < 0.05 for p in raw.values())  # every one of them was marked before Holm
    assert family_sizes(changes.reset_index()) == {"test": 4}
    # By hand, m = 4 (the NaN cell not counted), sorted big < a < b < c:
    expected = {"big": 4 * raw["big"], "a": 3 * raw["a"]}
    expected["b"] = max(expected["a"], 2 * raw["b"])
    expected["c"] = max(expected["b"], raw["c"])  # 0.049 stepped up to b's 0.070
    assert changes["p_holm"].drop("same").to_dict() == pytest.approx(expected)
    assert expected["c"] == pytest.approx(expected["b"]) and expected["c"] > 0.05
    assert changes["marked"].to_dict() == {"a": False, "b": False, "c": False, "big": True, "same": False}
    assert math.isnan(changes.at["same", "p_holm"])
    # One family per call: with a second change in the same call, m counts both changes' cells.
    table = paired_table([50.0, 52.0, 48.0], differences, rows=("Better", "Other"))
    both = paired_changes(table, [("Better", "Base"), ("Other", "Base")], "test")
    assert family_sizes(both) == {"test": 8}
    assert both.query("column == 'big'")["p_holm"].to_list() == pytest.approx([8 * raw["big"]] * 2)


def test_the_footnote_names_the_correction(three_rows, tmp_path):
    from fersynth.report import run_report
    from fersynth.settings import ReportSettings

    seeds = ["1", "2", "3"]
    text = spread_footnote(seeds, 9)
    assert "paired t-test over the seeds, two-sided, Holm-corrected over the 9 cells of this table" in text
    assert "adjusted p < 0.05" in text
    assert "Holm-corrected" in spread_footnote(seeds) and "Holm" not in spread_footnote(["1"])
    # The report's table holds two test sets' changes: each is its own family, and says so.
    table = comparison_table(three_rows)
    for name in ("raf", "fer"):
        write_comparison(table, tmp_path / "compare" / name)
    settings = ReportSettings(
        output=tmp_path / "report",
        comparisons=[tmp_path / "compare" / "raf", tmp_path / "compare" / "fer"],
        changes=[("Better", "Base")],
    )
    result = run_report(settings)
    page = (result.output / "report.md").read_text()
    assert "Holm-corrected within each test set over its cells with a p-value (9 on raf, 9 on fer)" in page
    records = json.loads((result.output / "report.json").read_text())["paired_changes"]
    fear = [r for r in records if r["column"] == "fear"]
    assert [r["test_set"] for r in fear] == ["raf", "fer"] and all(r["marked"] for r in fear)
    direct = paired_changes(table, [("Better", "Base")], "raf").set_index("column").at["fear", "p_holm"]
    assert direct == pytest.approx(0.0043, abs=1e-4)  # 9 x 0.00048: the family is all 9 cells
    assert [r["p_holm"] for r in fear] == pytest.approx([round(direct, 4)] * 2)


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
    # A voter trains with its own seed and the balanced sampler, once per fold (cross-fitting):
    # without the training images of that fold, so it never judges an image seeded from them.
    voter = stages.row_settings(settings, "voter_1")
    assert voter.train.balanced_sampler and voter.train.output == settings.layout.voter("voter_1")
    folds = stages.train(voter, "voter_1", progress=False)
    assert [result.output for result, _ in folds] == [
        settings.layout.voter("voter_1") / f"fold_{f}" for f in (0, 1)
    ]
    manifest = read_manifest(data).manifest
    train = manifest[manifest["split"] == "train"]
    fold = fold_of(train, 2)
    for f, (result, _) in enumerate(folds):
        summary = json.loads((result.output / "train_summary.json").read_text())
        kept = train[fold != f]["label"].value_counts()
        assert summary["train_counts"] == {name: int(kept.get(name, 0)) for name in CLASSES}
        assert json.loads((result.output / "settings.json").read_text())["train"]["fold"] == [f, 2]
    assert sum(
        sum(json.loads((r.output / "train_summary.json").read_text())["train_counts"].values())
        for r, _ in folds
    ) == len(train)
    evaluated = stages.evaluate_row(settings, "original_sl_balanced", progress=False)
    assert [seed for seed, _ in evaluated] == [5, 6]
    result = load_result("Original_SL_balanced", settings.layout.evaluation("original_sl_balanced"), "ds")
    assert sorted(result.by_seed) == ["5", "6"]
