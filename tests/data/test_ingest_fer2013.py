from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fersynth.dataset import decode_image, read_manifest
from fersynth.ingest import run_ingest
from fersynth.settings import IngestSettings
from helpers import face_like


def pixels_text(seed: int) -> str:
    return " ".join(str(v) for v in face_like(seed, 48, color=False).ravel())


def make_fer2013(path: Path) -> Path:
    rows = [
        ("0", pixels_text(1), "Training"),  # angry
        ("1", pixels_text(2), "Training"),  # disgust
        ("3", pixels_text(3), "Training"),  # happy
        ("3", pixels_text(3), "Training"),  # exact duplicate within Training
        ("6", pixels_text(4), "PublicTest"),  # neutral
        ("2", pixels_text(5), "PrivateTest"),  # fear
        ("5", pixels_text(4), "Training"),  # copy of the PublicTest image
        ("9", pixels_text(6), "Training"),  # unknown emotion
        ("4", "1 2 3", "Training"),  # malformed: too few pixels
        ("4", pixels_text(7).replace("1", "x", 1), "Training"),  # malformed: not numbers
        ("4", pixels_text(8), "Holdout"),  # unknown Usage
    ]
    frame = pd.DataFrame(rows, columns=["emotion", "pixels", "Usage"])
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, index=False)
    return path


def test_fer2013_rows_become_grey_pngs_with_exact_pixels(tmp_path):
    csv = make_fer2013(tmp_path / "fer2013.csv.gz")
    out = tmp_path / "dataset"
    report = run_ingest(IngestSettings(source="fer2013", input=csv, output=out), progress=False)
    assert report.inputs == 11 and report.accounted
    assert report.written == 6 and report.rejected == 4 and report.removed_test_duplicates == 1

    rows = read_manifest(out).manifest.set_index("id")
    assert rows.loc["fer2013_00000", "label"] == "angry"
    assert rows.loc["fer2013_00004", "split"] == "test"
    assert rows.loc["fer2013_00005", "split"] == "private_test"
    assert rows.loc["fer2013_00005", "label"] == "fear"
    assert "fer2013_00006" not in rows.index  # copy of a test image, removed
    decoded = decode_image((out / rows.loc["fer2013_00002", "path"]).read_bytes())
    assert np.array_equal(decoded, face_like(3, 48, color=False))
    assert rows.loc["fer2013_00002", "channels"] == 1
    assert report.duplicates["within_split_groups"] == 1

    rejected = pd.read_csv(out / "ingest_rejected.csv", keep_default_na=False)
    reasons = dict(zip(rejected["source_id"], rejected["reason"], strict=True))
    assert "unknown emotion '9'" in reasons["fer2013.csv.gz row 9"]
    assert reasons["fer2013.csv.gz row 10"] == "expected 2304 pixel values, got 3"
    assert reasons["fer2013.csv.gz row 11"] == "pixels are not all integers in 0..255"
    assert "unknown Usage 'Holdout'" in reasons["fer2013.csv.gz row 12"]
    kinds = dict(zip(rejected["source_id"], rejected["kind"], strict=True))
    assert [kinds[f"fer2013.csv.gz row {n}"] for n in (9, 10, 11, 12)] == [
        "unknown_label",
        "bad_pixels",
        "bad_pixels",
        "unknown_split",
    ]


EXPECTED_TRAINING = {
    "angry": 3995,
    "disgust": 436,
    "fear": 4097,
    "happy": 7215,
    "sad": 4830,
    "surprise": 3171,
    "neutral": 4965,
}


@pytest.mark.slow
def test_shared_fer2013_counts_and_train_test_duplicates(fer2013_csv, tmp_path):
    out = tmp_path / "fer2013"
    report = run_ingest(IngestSettings(source="fer2013", input=fer2013_csv, output=out), progress=False)
    assert report.read_counts["train"] == EXPECTED_TRAINING
    assert sum(report.read_counts["test"].values()) == 3589
    assert report.read_counts["test"]["disgust"] == 56
    assert report.rejected == 0 and report.accounted
    dup = report.duplicates
    assert dup["train_test_distinct_images"] == 270
    assert dup["train_test_learning_rows"] == 351 and dup["train_test_test_rows"] == 280
    assert report.written_counts["train"]["happy"] + report.removed_test_duplicates > 0
    written = report.written_counts
    assert sum(written["train"].values()) + sum(written["val"].values()) == 28709 - 351
    # The validation split: 10% of every class of Training, drawn once, real images only.
    assert report.val_drawn == sum(written["val"].values())
    for name, count in EXPECTED_TRAINING.items():
        assert abs(written["val"][name] - 0.1 * count) <= 0.1 * count * 0.1 + 2
    duplicates = pd.read_csv(out / "ingest_duplicates.csv", keep_default_na=False)
    across = duplicates[duplicates["kind"] == "train_test"]
    assert across["pixel_hash"].nunique() == 270 and across["test_ids"].str.len().min() > 0
