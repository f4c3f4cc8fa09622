"""fersynth report: the per-class changes, and a page that names every section."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tests.helpers import markdown_rows

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.report import REPORT_MD, class_changes, run_report
from fersynth.settings import ReportSettings


def _comparison(folder, rows: dict[str, dict[str, float]]):
    folder.mkdir(parents=True)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    table.to_csv(folder / "comparison.csv")
    return folder


def _row(value: float, fear: float) -> dict[str, float]:
    row = dict.fromkeys(CLASSES, value)
    row["fear"] = fear
    row["Total"], row["Mean"] = value, (value * 6 + fear) / 7
    return row


def test_changes_subtract_each_synthetic_row_from_its_original_row():
    table = pd.DataFrame.from_dict(
        {"Original_SL": _row(50, 10), "Expanded_SL": _row(52, 25), "Original_MEK": _row(40, 30)},
        orient="index",
    )
    changes = class_changes(table, [("Expanded_SL", "Original_SL"), ("Expanded_MEK", "Original_MEK")], "raf")
    assert list(changes.index) == ["Expanded_SL - Original_SL (raf)"]  # Expanded_MEK is not in the grid
    row = changes.loc["Expanded_SL - Original_SL (raf)"]
    assert row["fear"] == pytest.approx(15) and row["happy"] == pytest.approx(2)
    assert row["Mean"] == pytest.approx((52 * 6 + 25 - 50 * 6 - 10) / 7)


def test_report_page_has_every_section_and_logs_the_changes(tmp_path):
    rows = {"Original_SL": _row(50, 10), "Expanded_SL": _row(52, 25)}
    in_domain = _comparison(tmp_path / "compare" / "raf", rows)
    cross = _comparison(
        tmp_path / "compare" / "fer", {"Original_SL": _row(30, 5), "Expanded_SL": _row(29, 9)}
    )
    verify = tmp_path / "verified"
    verify.mkdir()
    (verify / "verify_report.json").write_text(
        json.dumps(
            {
                "verified": 10,
                "voters": ["a", "b", "c"],
                "min_votes": 2,
                "min_probability": 0.5,
                "accepted": 4,
                "leaks": {"removed": 1},
                "rejection_reasons": {"too few agree": 5},
                "per_class": {
                    "fear": {
                        "generated": 10,
                        "accepted": 4,
                        "acceptance_rate": 0.4,
                        "frechet_distance": 12.5,
                        "diversity_real": 3.0,
                        "diversity_synthetic": 2.5,
                        "seed_distance": 1.25,
                    }
                },
            }
        )
    )
    settings = ReportSettings(
        output=tmp_path / "report",
        comparisons=[in_domain, cross],
        evaluations=tmp_path / "eval",
        quality=tmp_path / "missing_quality",
        verify=verify,
        augment=tmp_path / "missing_augment",
        generated=tmp_path / "missing_generated",
        changes=[("Expanded_SL", "Original_SL")],
    )
    result = run_report(settings)
    page = (result.output / REPORT_MD).read_text()
    headings = ["## Comparison", "## What the synthetic data changed", "## Confusion matrices"]
    headings += ["## Quality", "## Verification", "## Rebalancing", "## Generated samples"]
    for heading in headings:
        assert heading in page
    assert "| Expanded_SL - Original_SL (raf) |" in page and "+15.00" in page
    assert "| Expanded_SL - Original_SL (fer) |" in page and "+4.00" in page
    assert ["fear", "10", "4", "40.0", "12.50", "3.00", "2.50", "1.25"] in markdown_rows(page)
    assert "Quality stage output not found" in page  # an absent stage is said, not skipped silently
    assert (result.output / "changes.png").stat().st_size > 1000
    summary = json.loads((result.output / "report.json").read_text())
    assert summary["changes"]["Expanded_SL - Original_SL (fer)"]["fear"] == pytest.approx(4)
    with pytest.raises(FersynthError, match="already exists"):
        run_report(settings)


def test_report_without_a_comparison_is_a_clear_error(tmp_path):
    settings = ReportSettings(output=tmp_path / "r", comparisons=[tmp_path / "nothing"])
    with pytest.raises(FersynthError, match="no comparison.csv"):
        run_report(settings)
