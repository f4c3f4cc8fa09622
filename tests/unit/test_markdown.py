"""Report pages from templates: each table builder on a hand-made input, each page with every
section, and rejection counts taken from structured fields."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import pytest
from tests.helpers import markdown_rows

from fersynth import markdown
from fersynth.augment import AugmentResult, class_table
from fersynth.augment import _write_report as write_augment_report
from fersynth.classes import CLASSES
from fersynth.ingest.items import REJECTION_KINDS, Rejection
from fersynth.ingest.report import IngestReport, counts_table, rejections_table
from fersynth.ingest.report import markdown as ingest_markdown
from fersynth.quality.report import QualityResult, flagged_per_class
from fersynth.quality.report import write_report as write_quality_report
from fersynth.quality_scores import SCORE_NAMES
from fersynth.report import (
    acceptance_table,
    augment_class_table,
    changes_markdown,
    quality_class_table,
    verify_class_table,
)
from fersynth.settings import AugmentSettings, GuardSettings, QualitySettings, VerifySettings
from fersynth.verify import GuardResult, VerifyResult
from fersynth.verify.leakage import LEAK_COLUMNS
from fersynth.verify.report import leak_table, rejection_counts, write_guard_report, write_verify_report
from fersynth.verify.report import verify_class_table as fidelity_class_table

# --- the table helper -------------------------------------------------------------------


def test_table_formats_columns_writes_empty_cells_and_escapes_pipes():
    frame = pd.DataFrame(
        {"n": [3, 4], "rate": [12.345, np.nan], "note": ["a|b", None]},
        index=pd.Index(["x", "y"], name="row"),
    )
    text = markdown.table(frame, {"rate": ".1f"})
    rows = markdown_rows(text)
    assert rows[0] == ["row", "n", "rate", "note"]
    assert rows[1] == ["x", "3", "12.3", "a\\|b"]  # an escaped pipe stays inside its cell
    assert rows[2] == ["y", "4", "-", "-"]
    with pytest.raises(KeyError, match="absent"):
        markdown.table(frame, {"absent": ".1f"})


def test_every_template_loads_and_a_missing_value_is_an_error():
    names = markdown.environment().list_templates()
    assert {"report.md.j2", "results.md.j2", "quality_report.md.j2", "guard_report.md.j2"} <= set(names)
    assert {"verify_report.md.j2", "ingest_report.md.j2", "augment_report.md.j2"} <= set(names)
    for name in names:
        markdown.template(name)  # parses
    with pytest.raises(jinja2.UndefinedError):
        markdown.render("augment_report.md.j2", settings=AugmentSettings())


# --- builders of the run report (from the stages' JSON) ---------------------------------


def test_run_report_builders_read_the_stage_json():
    quality = {
        "per_class": [
            {"class": "fear", "train images": 10, "flagged": 2, "enhanced": 1, "flagged %": 20.0},
            {"class": "happy", "train images": 30, "flagged": 0, "enhanced": 0, "flagged %": 0.0},
        ]
    }
    table = quality_class_table(quality)
    assert list(table.columns) == ["train images", "flagged", "flagged %"]
    assert table.loc["fear"].tolist() == [10, 2, 20.0] and table.index.name == "class"

    row = {"generated": 10, "accepted": 4, "acceptance_rate": 0.4, "frechet_distance": 12.5}
    verify = {
        "per_class": {
            "happy": {**row, "diversity_real": 3.0, "diversity_synthetic": 2.5, "seed_distance": 1.25},
            "fear": {
                "generated": 0,
                "accepted": 0,
                "acceptance_rate": None,
                "frechet_distance": None,
                "diversity_real": 1.5,
                "diversity_synthetic": None,
            },  # fmt: skip
            "sad": {},  # no row: left out
        }
    }
    table = verify_class_table(verify)
    assert list(table.index) == ["fear", "happy"]  # canonical class order
    assert table.loc["happy", "acceptance %"] == pytest.approx(40.0)
    assert table.loc["happy", "diversity synthetic"] == pytest.approx(2.5)
    assert np.isnan(table.loc["fear", "acceptance %"]) and np.isnan(table.loc["fear", "Frechet distance"])
    assert table.loc["happy", "distance to seed"] == pytest.approx(1.25)
    assert ["fear", "0", "0", "-", "-", "1.50", "-", "-"] in markdown_rows(
        markdown.table(table, {"diversity real": ".2f"})
    )

    augment = {
        "per_class": {
            name: {"original": i, "accepted pool": 2 * i, "added": 1, "training set": i + 1}
            for i, name in enumerate(CLASSES)
        }
    }
    table = augment_class_table(augment)
    assert list(table.index) == list(CLASSES)
    assert table.loc[CLASSES[3]].tolist() == [3, 6, 1, 4]


def test_changes_are_signed_with_two_decimals_their_spread_and_marks():
    paired = pd.DataFrame(
        [
            ("a - b (raf)", "fear", 15.0, 1.5, 3, 0.01, True),
            ("a - b (raf)", "Mean", 3.856, 4.0, 3, 0.3, False),
            ("c - d (raf)", "fear", -1.0, float("nan"), 1, float("nan"), False),
        ],
        columns=["change", "column", "mean", "std", "n", "p", "marked"],
    )
    rows = markdown_rows(changes_markdown(paired, ["fear", "Mean"]))
    assert rows == [
        ["change", "fear", "Mean"],
        ["a - b (raf)", "+15.00 ± 1.50 *", "+3.86 ± 4.00"],
        ["c - d (raf)", "-1.00 (n=1)", "-"],  # fewer seeds in common than the other change
    ]


# --- the stages' own builders -------------------------------------------------------------


def test_flagged_per_class_counts_training_rows_only():
    frame = pd.DataFrame(
        {
            "split": ["train", "train", "train", "train", "test"],
            "label": ["fear", "fear", "fear", "happy", "fear"],
            "q_flag": ["blur", "", "small", "", "blur"],
            "q_action": ["enhanced", "kept", "flagged", "kept", "kept"],
        }
    )
    table = flagged_per_class(frame)
    assert table.loc["fear"].tolist() == [3, 2, 1, pytest.approx(66.7)]
    assert table.loc["happy"].tolist() == [1, 0, 0, 0.0]
    assert table.loc["sad"].tolist() == [0, 0, 0, 0.0] and table.index.name == "class"


def test_leak_table_and_fidelity_table():
    first = ("a", "images/a.png", "train", "real", "fear", "exact", 0, 1.0)
    second = ("b", "images/b.png", "val", "real", "sad", "perceptual", 4, 0.97)
    tests = [("raf/test", "t1", "/t1.png", "fear"), ("fer/test", "t9", "/t9.png", "sad")]
    leaks = pd.DataFrame(
        [
            dict(zip(LEAK_COLUMNS, (*row, *test), strict=True))
            for row, test in zip((first, second), tests, strict=True)
        ]
    )
    table = leak_table(leaks, rows=1)
    assert list(table.index) == ["images/a.png"]
    assert table.loc["images/a.png"].tolist() == ["train", "raf/test: t1", "exact", 0, 1.0]

    fidelity = pd.DataFrame(
        {
            "generated": [10, 0],
            "accepted": [4, 0],
            "acceptance_rate": [0.4, np.nan],
            "frechet_distance": [1.25, np.nan],
            "kid_mean": [0.0123, np.nan],
            "diversity_real": [0.8, 0.9],
            "diversity_synthetic": [0.7, np.nan],
        },
        index=pd.Index(["fear", "sad"], name="class"),
    )
    table = fidelity_class_table(fidelity)
    assert table.loc["fear", "accepted %"] == pytest.approx(40.0)
    assert table.loc["fear", "KID x1000"] == pytest.approx(12.3)
    assert table.loc["sad", "generated"] == 0 and np.isnan(table.loc["sad", "accepted %"])


def test_rejections_are_counted_from_the_codes_not_the_sentence():
    frame = pd.DataFrame(
        {
            "v_accepted": ["false", "false", "true", "false"],
            "v_rejected_by": ["votes", "votes|probability", "", "probability"],
            # The sentence for people says something else entirely: counts must not read it.
            "v_reason": ["whatever", "2 of 3 voters agree (need 2)", "", ""],
        }
    )
    assert rejection_counts(frame) == {"votes": 2, "probability": 2, "unrecognised": 0}
    assert rejection_counts(frame.iloc[2:3]) == {"votes": 0, "probability": 0, "unrecognised": 0}


def test_ingest_tables_and_rejection_kinds():
    counts = {"train": {name: i for i, name in enumerate(CLASSES)}, "test": dict.fromkeys(CLASSES, 2)}
    table = counts_table(counts)
    assert list(table.columns) == [*CLASSES, "total"] and list(table.index) == ["train", "test"]
    assert table.loc["train", "total"] == sum(range(len(CLASSES))) and table.loc["test", "total"] == 14

    report = _ingest_report()
    table = rejections_table(report)
    assert list(table.index) == ["missing_file", "unknown_label"]
    assert table.loc["missing_file"].tolist() == [3, "file not found"]
    with pytest.raises(ValueError, match="rejection kind"):
        Rejection("x.jpg", "broken somehow", "corrupt image")
    assert Rejection("x.jpg", "corrupt_image", "corrupt or truncated image").kind in REJECTION_KINDS


def test_augment_class_table():
    before = {name: 10 for name in CLASSES}
    added = {name: i for i, name in enumerate(CLASSES)}
    after = {name: 10 + added[name] for name in CLASSES}
    result = AugmentResult(Path("o"), pd.DataFrame(), before, dict.fromkeys(CLASSES, 9), added, after)
    table = class_table(result)
    assert list(table.columns) == ["original", "accepted pool", "added", "training set"]
    assert table.loc[CLASSES[2]].tolist() == [10, 9, 2, 12]


# --- pages: every section ----------------------------------------------------------------


def _ingest_report(**changes) -> IngestReport:
    counts = {"train": dict.fromkeys(CLASSES, 1)}
    values = dict(
        source="rafdb",
        input="in",
        output="out",
        inputs=11,
        written=7,
        rejected=4,
        removed_test_duplicates=0,
        read_counts=counts,
        written_counts=counts,
        rejected_by_kind={"missing_file": 3, "unknown_label": 1},
        rejection_examples={"missing_file": "file not found", "unknown_label": "unknown label '9'"},
        duplicates={
            "within_split_groups": 1,
            "within_split_rows": 2,
            "within_split_groups_with_conflicting_labels": 0,
            "train_test_distinct_images": 0,
            "train_test_learning_rows": 0,
            "train_test_test_rows": 0,
            "learning_rows_removed": 0,
            "policy": "kept (flag)",
        },
    )
    return IngestReport(**{**values, **changes})


def test_ingest_page_has_every_section():
    text = ingest_markdown(_ingest_report())
    for heading in [
        "# Ingest report: rafdb",
        "## Images written per split and class",
        "## Labelled inputs read",
    ]:
        assert heading in text
    assert "## Exact duplicates" in text and "## Rejected inputs by reason" in text
    assert "every input accounted for: yes" in text and "![samples](ingest_samples.png)" in text
    assert ["unknown_label", "1", "unknown label '9'"] in markdown_rows(text)
    terminal = ingest_markdown(_ingest_report(rejected_by_kind={}, rejected=0, inputs=7), figures=False)
    assert "![" not in terminal and "## Rejected inputs" not in terminal


def test_quality_guard_verify_and_augment_pages_have_every_section(tmp_path):
    n = 14
    frame = pd.DataFrame(
        {
            "id": [f"i{i}" for i in range(n)],
            "path": [f"images/{i}.png" for i in range(n)],
            "label": [CLASSES[i % 7] for i in range(n)],
            "split": ["train"] * 10 + ["test"] * 4,
            "original_path": [""] * n,
        }
    )
    for name in [*SCORE_NAMES, "score"]:
        frame[f"q_{name}"] = np.linspace(0, 1, n)
    frame["q_flag"] = np.where(frame["q_score"] < 0.2, "low score", "")
    frame["q_action"] = np.where(frame["q_flag"] != "", "enhanced", "kept")
    frame.loc[frame["q_action"] == "enhanced", "original_path"] = frame["path"]
    quality = QualityResult(tmp_path, frame, 0.2, (64, 64), [], [("images/x.png", "corrupt")])
    write_quality_report(tmp_path, quality, QualitySettings(data=Path("d"), output=Path("o")))
    page = (tmp_path / "quality_report.md").read_text()
    for heading in [
        "# Quality report",
        "## Flagged per class",
        "## Scores",
        "## Lowest-scoring",
        "## Before and",
    ]:
        assert heading in page
    assert "super-resolution skipped" in page and "  - `images/x.png`: corrupt" in page
    assert ["fear", "2", "1", "1", "50.0"] in markdown_rows(page)

    leaks = pd.DataFrame(
        [
            {**dict.fromkeys(LEAK_COLUMNS, "x"), "path": f"images/l{i}.png", "kind": "exact", "distance": 0}
            for i in range(22)
        ]
    )
    guard = GuardResult(tmp_path, frame, leaks, ["raf/test (4 images)"], [("images/bad.png", "truncated")])
    write_guard_report(tmp_path, guard, GuardSettings(data=Path("d")))
    page = (tmp_path / "guard_report.md").read_text()
    assert "# Test-leakage guard: d" in page and "Removed **22** images: 22 exact copies" in page
    assert "2 more in `leakage.csv`." in page and "![pairs](leakage_pairs.png)" in page
    assert "Kept 14 rows." in page and "- images/bad.png: truncated" in page
    assert sum(row[0].startswith("images/l") for row in markdown_rows(page)) == 20

    synthetic = frame.assign(
        v_accepted=["true", "false"] * 7, v_rejected_by=["", "votes|probability"] * 7, v_reason="ignored"
    )
    fidelity = pd.DataFrame(
        {
            "generated": [2] * 7,
            "accepted": [1] * 7,
            "acceptance_rate": [0.5] * 7,
            "frechet_distance": [1.0] * 7,
            "kid_mean": [0.002] * 7,
            "diversity_real": [0.5] * 7,
            "diversity_synthetic": [0.4] * 7,
            "seed_distance": [0.3] * 7,
        },
        index=pd.Index(list(CLASSES), name="class"),
    )
    settings = VerifySettings(data=Path("s"), voters=["a", "b", "c"], min_votes=2)
    verify = VerifyResult(tmp_path, synthetic, leaks.head(0), fidelity, ["a", "b", "c"], [])
    write_verify_report(tmp_path, verify, settings, 6)
    page = (tmp_path / "verify_report.md").read_text()
    assert "# Synthetic expression check: s" in page and "**7 of 14** synthetic images accepted" in page
    assert "Voters (3, flip TTA on): `a`, `b`, `c`." in page and "## Test leakage" in page
    assert (
        "too few of 3 voters agree (need 2) (7), "
        "mean probability below its class' threshold (at most 0.50) (7)." in page
    )
    assert ["fear", "2", "1", "50.0", "1.00", "2.00", "0.50", "0.40", "0.30"] in markdown_rows(page)
    summary = json.loads((tmp_path / "verify_report.json").read_text())
    assert summary["rejected_by"] == {"votes": 7, "probability": 7, "unrecognised": 0}
    assert summary["rejected"] == 7

    before = dict.fromkeys(CLASSES, 10)
    result = AugmentResult(
        tmp_path, frame, before, dict.fromkeys(CLASSES, 3), dict.fromkeys(CLASSES, 0), before
    )
    write_augment_report(
        tmp_path, result, AugmentSettings(original=Path("o"), synthetic=Path("s"), variant="rho")
    )
    page = (tmp_path / "augment_report.md").read_text()
    assert "# Augmented training set: rho" in page and "1.00 before, 1.00 after (target rho 2.0)." in page
    assert ["happy", "10", "3", "0", "10"] in markdown_rows(page) and "![counts](augment_counts.png)" in page


def test_results_page_acceptance_shows_diversity_and_distance_to_seed_as_shares_of_real(tmp_path):
    common = {"generated": 10, "diversity_real": 4.0}
    per_class = {
        "fear": {**common, "accepted": 5, "diversity_synthetic": 3.0, "seed_distance": 1.0},
        "sad": {**common, "accepted": 0, "diversity_synthetic": None, "seed_distance": None},
    }
    (tmp_path / "verify_report.json").write_text(json.dumps({"per_class": per_class}))
    table = acceptance_table(tmp_path)
    assert table.loc["fear"].tolist() == [10, 5, 50.0, 75.0, 25.0]
    assert table.loc["sad", "acceptance %"] == 0.0 and np.isnan(table.loc["sad", "diversity % of real"])
    old = {name: {k: v for k, v in row.items() if k != "seed_distance"} for name, row in per_class.items()}
    (tmp_path / "verify_report.json").write_text(json.dumps({"per_class": old}))  # an older run's
    assert list(acceptance_table(tmp_path).columns) == [
        "generated",
        "accepted",
        "acceptance %",
        "diversity % of real",
    ]
