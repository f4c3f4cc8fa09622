from __future__ import annotations

import os

import numpy as np
import pandas as pd

from fersynth.dataset import decode_image, read_manifest
from fersynth.ingest import run_ingest
from fersynth.settings import IngestSettings
from helpers import (
    face_like,
    write_cmyk_jpeg,
    write_empty,
    write_jpeg,
    write_png16,
    write_rgba_png,
    write_truncated_jpeg,
)


def test_folder_layout_with_every_awkward_file(tmp_path):
    root = tmp_path / "faces"
    write_jpeg(root / "train/Happy/a.jpg", face_like(1, 64))
    write_jpeg(root / "train/sadness/b.jpg", face_like(2, 64))
    write_rgba_png(root / "train/anger/rgba.png", seed=3)
    _, grey8 = write_png16(root / "train/neutral/deep.png", seed=4)
    write_cmyk_jpeg(root / "Testing/fear/cmyk.jpg", seed=5)
    write_jpeg(root / "test/surprise/c.jpg", face_like(6, 64))
    write_truncated_jpeg(root / "train/happy/truncated.jpg")
    write_empty(root / "train/happy/empty.jpg")
    write_jpeg(root / "train/contempt/x.jpg", face_like(7, 64))  # unknown class folder
    (root / "train/happy/notes.txt").write_text("not an image")
    write_jpeg(root / "train/loose.jpg", face_like(8, 64))  # no class folder
    outside = write_jpeg(tmp_path / "elsewhere.jpg", face_like(9, 64))
    os.symlink(outside, root / "train/happy/link.jpg")  # leads outside the input folder

    out = tmp_path / "dataset"
    report = run_ingest(IngestSettings(source="folder", input=root, output=out), progress=False)
    assert report.inputs == 12 and report.accounted and report.written == 6
    rows = read_manifest(out).manifest.set_index("source_id")
    assert rows.loc["train/Happy/a.jpg", "label"] == "happy"
    assert rows.loc["train/anger/rgba.png", "label"] == "angry"
    assert rows.loc["Testing/fear/cmyk.jpg", "split"] == "test"
    deep = decode_image((out / rows.loc["train/neutral/deep.png", "path"]).read_bytes())
    assert np.abs(deep.astype(int) - grey8.astype(int)).max() <= 1

    rejected = pd.read_csv(out / "ingest_rejected.csv", keep_default_na=False)
    reasons = dict(zip(rejected["source_id"], rejected["reason"], strict=True))
    assert "truncated" in reasons["train/happy/truncated.jpg"]
    assert "empty file" in reasons["train/happy/empty.jpg"]
    assert reasons["train/contempt/x.jpg"] == "unknown class folder 'contempt'"
    assert reasons["train/happy/notes.txt"] == "not a readable image format"
    assert reasons["train/loose.jpg"] == "not inside a split/class/ folder"
    assert "outside the input folder" in reasons["train/happy/link.jpg"]
    kinds = dict(zip(rejected["source_id"], rejected["kind"], strict=True))
    assert (
        kinds["train/happy/truncated.jpg"] == "corrupt_image"
        and kinds["train/happy/empty.jpg"] == "empty_file"
    )
    assert (
        kinds["train/contempt/x.jpg"] == "unknown_label" and kinds["train/happy/notes.txt"] == "not_an_image"
    )
    assert kinds["train/loose.jpg"] == "misplaced_file" and kinds["train/happy/link.jpg"] == "unsafe_path"


def test_ingest_draws_one_validation_split_from_training(tmp_path):
    """Sources without a val split (RAF-DB here) get one: stratified, seeded, its files under
    images/val/, counted in the report; a second ingest with the same seed draws the same."""
    from helpers import make_demo_dataset

    first = read_manifest(make_demo_dataset(tmp_path / "a", train_size=140, test_size=21)).manifest
    again = read_manifest(make_demo_dataset(tmp_path / "b", train_size=140, test_size=21)).manifest
    val = first[first["split"] == "val"]
    assert 10 <= len(val) <= 18 and set(val["origin"]) == {"real"}
    assert val["path"].str.startswith("images/val/").all()
    assert all((tmp_path / "a" / "ds" / p).is_file() for p in val["path"])
    assert list(val["id"]) == list(again[again["split"] == "val"]["id"])
    assert set(val["label"]) == set(first[first["split"] == "train"]["label"])  # every class
    text = (tmp_path / "a" / "ds" / "ingest_report.md").read_text()
    assert f"validation split: {len(val)} training images drawn" in text
