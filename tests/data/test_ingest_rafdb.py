from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pandas as pd
import pytest

from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.ingest import run_ingest
from fersynth.settings import IngestSettings
from helpers import face_like, markdown_rows, write_cmyk_jpeg, write_empty, write_jpeg, write_truncated_jpeg


def make_rafdb(root: Path) -> Path:
    """RAF-DB basic layout with one of every kind of bad input."""
    aligned = root / "Image" / "aligned"
    lines = []
    for i, label in enumerate([1, 2, 3, 4, 5, 6], start=1):  # surprise..angry
        write_jpeg(aligned / f"train_{i:05d}_aligned.jpg", face_like(i, 100))
        lines.append(f"train_{i:05d}.jpg {label}")
    for i, label in enumerate([7, 4, 2], start=1):
        write_jpeg(aligned / f"test_{i:05d}_aligned.jpg", face_like(100 + i, 100))
        lines.append(f"test_{i:05d}.jpg {label}")
    write_jpeg(aligned / "train_00007_aligned.jpg", face_like(7, 100))
    lines.append("train_00007.jpg 9")  # unknown label
    lines.append("train_00008.jpg")  # malformed: no label
    write_truncated_jpeg(aligned / "train_00009_aligned.jpg")
    lines.append("train_00009.jpg 1")
    write_empty(aligned / "train_00010_aligned.jpg")
    lines.append("train_00010.jpg 1")
    lines.append("train_00011.jpg 1")  # file missing
    shutil.copy(aligned / "test_00001_aligned.jpg", aligned / "train_00012_aligned.jpg")
    lines.append("train_00012.jpg 7")  # copy of a test image
    lines.append("../../etc/passwd 1")  # path escaping the folder
    lines.append("val_00001.jpg 1")  # neither train_ nor test_
    write_cmyk_jpeg(aligned / "train_00013_aligned.jpg", seed=13)
    lines.append("train_00013.jpg 2")
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n\n")
    return root


@pytest.fixture
def rafdb(tmp_path) -> Path:
    return make_rafdb(tmp_path / "RAF-DB")


def test_rafdb_every_input_is_written_or_reported(rafdb, tmp_path):
    out = tmp_path / "dataset"
    report = run_ingest(IngestSettings(source="rafdb", input=rafdb, output=out, workers=2), progress=False)
    assert report.inputs == 18 and report.accounted
    assert report.written == 10 and report.rejected == 7 and report.removed_test_duplicates == 1

    rejected = pd.read_csv(out / "ingest_rejected.csv", keep_default_na=False)
    reasons = dict(zip(rejected["source_id"], rejected["reason"], strict=True))
    assert "unknown label '9'" in reasons["EmoLabel/list_patition_label.txt line 10 (train_00007.jpg)"]
    assert "expected 'NAME LABEL'" in reasons["EmoLabel/list_patition_label.txt line 11 (train_00008.jpg)"]
    assert "truncated" in reasons["Image/aligned/train_00009_aligned.jpg"]
    assert "empty file" in reasons["Image/aligned/train_00010_aligned.jpg"]
    assert reasons["Image/aligned/train_00011_aligned.jpg"] == "file not found"
    assert "is a path" in reasons["EmoLabel/list_patition_label.txt line 16 (../../etc/passwd)"]
    assert "neither train_ nor test_" in reasons["EmoLabel/list_patition_label.txt line 17 (val_00001.jpg)"]
    kinds = dict(zip(rejected["source_id"], rejected["kind"], strict=True))
    assert kinds["EmoLabel/list_patition_label.txt line 10 (train_00007.jpg)"] == "unknown_label"
    assert kinds["EmoLabel/list_patition_label.txt line 11 (train_00008.jpg)"] == "malformed_row"
    assert kinds["Image/aligned/train_00011_aligned.jpg"] == "missing_file"
    assert kinds["EmoLabel/list_patition_label.txt line 17 (val_00001.jpg)"] == "unknown_split"


def test_rafdb_manifest_labels_splits_and_files(rafdb, tmp_path):
    out = tmp_path / "dataset"
    run_ingest(IngestSettings(source="rafdb", input=rafdb, output=out, workers=1), progress=False)
    dataset = read_manifest(out)
    rows = dataset.manifest.set_index("id")
    assert rows.loc["train_00001", "label"] == "surprise"
    assert rows.loc["train_00006", "label"] == "angry"
    assert rows.loc["test_00001", "label"] == "neutral"
    assert rows.loc["train_00013", "label"] == "fear"
    assert "train_00012" not in rows.index  # the copy of test_00001 was removed
    assert set(rows["origin"]) == {"real"} and set(rows["seed_id"]) == {""}
    assert dataset.class_counts("test") == {
        "surprise": 0,
        "fear": 1,
        "disgust": 0,
        "happy": 1,
        "sad": 0,
        "angry": 0,
        "neutral": 1,
    }
    # Clean JPEGs are kept byte for byte; the CMYK one is converted to an RGB PNG.
    source = rafdb / "Image/aligned/train_00001_aligned.jpg"
    assert (out / rows.loc["train_00001", "path"]).read_bytes() == source.read_bytes()
    assert rows.loc["train_00013", "path"].endswith(".png")
    assert rows.loc["train_00013", "channels"] == 3
    for relative in rows["path"]:
        assert (out / relative).is_file()
    assert len(list((out / "images").rglob("*.*"))) == len(rows)  # removed copy deleted

    duplicates = pd.read_csv(out / "ingest_duplicates.csv", keep_default_na=False)
    across = duplicates[duplicates["kind"] == "train_test"]
    assert across["id"].tolist() == ["train_00012"] and across["test_ids"].tolist() == ["test_00001"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["ingest"]["source"] == "rafdb" and settings["seed"] == 2048


def test_rafdb_keep_test_duplicates_flag(rafdb, tmp_path):
    out = tmp_path / "dataset"
    report = run_ingest(
        IngestSettings(source="rafdb", input=rafdb, output=out, workers=1, drop_train_test_duplicates=False),
        progress=False,
    )
    assert report.removed_test_duplicates == 0 and report.written == 11
    assert report.duplicates["train_test_distinct_images"] == 1
    assert "train_00012" in set(read_manifest(out).manifest["id"])


def test_rafdb_missing_label_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FersynthError, match="list_patition_label.txt: RAF-DB label file not found"):
        run_ingest(
            IngestSettings(source="rafdb", input=tmp_path / "empty", output=tmp_path / "out"),
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_rafdb_report_has_markdown_and_pictures(rafdb, tmp_path):
    out = tmp_path / "dataset"
    settings = IngestSettings(source="rafdb", input=rafdb, output=out, workers=1, val_fraction=0.0)
    run_ingest(settings, progress=False)
    text = (out / "ingest_report.md").read_text()
    rows = markdown_rows(text)
    assert ["train", "1", "2", "1", "1", "1", "1", "0", "7"] in rows
    assert "every input accounted for: yes" in text
    assert ["missing_file", "1", "file not found"] in rows  # rejections by kind, with an example
    chart = cv2.imread(str(out / "ingest_classes.png"))
    sheet = cv2.imread(str(out / "ingest_samples.png"))
    assert chart.shape[0] > 200 and chart.shape[1] > 500
    assert sheet.shape == (7 * (18 + 64), 8 * 64, 3)  # one captioned row per class
