from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fersynth.dataset import decode_image, read_manifest
from fersynth.ingest import run_ingest
from fersynth.settings import AffectNetSettings, IngestSettings
from helpers import face_like, write_jpeg, write_png, write_rgba_png

HEADER = [
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
]


def row(path: str, box: tuple, expression) -> list:
    return [path, *box, "1;2;3", expression, 0.1, 0.2]


def make_affectnet(root: Path) -> Path:
    images = root / "Manually_Annotated_Images"
    for i, name in enumerate(["1/a.jpg", "1/b.jpg", "1/c.jpg", "2/d.jpg", "2/e.jpg", "2/f.jpg"]):
        write_jpeg(images / name, face_like(i, 120))
    write_png(images / "3/h.png", face_like(50, 120))
    write_rgba_png(images / "3/rgba.png", seed=51)
    training = [
        row("1/a.jpg", (10, 10, 80, 80), 1),  # happy
        row("1/b.jpg", (10, 10, 80, 80), 7),  # contempt: excluded
        row("1/c.jpg", (10, 10, 80, 80), 8),  # none: excluded
        row("2/d.jpg", (60, 60, 100, 100), 4),  # fear, box runs off the image: clamped
        row("2/e.jpg", (500, 500, 50, 50), 2),  # box outside the image
        row("2/missing.jpg", (0, 0, 50, 50), 3),  # file missing
        row("../escape.jpg", (0, 0, 50, 50), 3),  # path leaving the folder
        row("2/f.jpg", (0, 0, 50, 50), "x"),  # expression not a number
        row("3/h.png", (20, 30, 40, 50), 0),  # neutral, lossless: crop checked exactly
        row("3/rgba.png", (0, 0, 40, 40), 6),  # angry, RGBA
    ]
    validation = []
    for k in range(3):
        for expression, folder in ((1, "v1"), (2, "v2")):
            name = f"{folder}/{k}.jpg"
            write_jpeg(images / name, face_like(100 + 10 * expression + k, 64))
            validation.append(row(name, (0, 0, 64, 64), expression))
    write_jpeg(images / "v4/0.jpg", face_like(200, 64))
    validation.append(row("v4/0.jpg", (0, 0, 64, 64), 4))
    validation.append(row("v4/0.jpg", (0, 0, 64, 64), 10))  # non-face: excluded
    pd.DataFrame(training, columns=HEADER).to_csv(root / "training.csv", index=False)
    pd.DataFrame(validation, columns=HEADER).to_csv(root / "validation.csv", index=False)
    return root


def ingest(root: Path, out: Path, seed: int = 2048):
    settings = IngestSettings(
        source="affectnet", input=root, output=out, affectnet=AffectNetSettings(test_per_class=2)
    )
    return run_ingest(settings, seed=seed, progress=False)


def test_affectnet_crops_maps_excludes_and_balances(tmp_path):
    root = make_affectnet(tmp_path / "AffectNet")
    report = ingest(root, tmp_path / "out")
    assert report.inputs == 18 and report.accounted
    rows = read_manifest(tmp_path / "out").manifest.set_index("id")
    train = rows[rows["split"] == "train"]
    assert train["label"].to_dict() == {
        "1_a": "happy",
        "2_d": "fear",
        "3_h": "neutral",
        "3_rgba": "angry",
    }
    assert (train.loc["1_a", "width"], train.loc["1_a", "height"]) == (80, 80)
    assert (train.loc["2_d", "width"], train.loc["2_d", "height"]) == (60, 60)  # clamped
    crop = decode_image((tmp_path / "out" / train.loc["3_h", "path"]).read_bytes())
    assert np.array_equal(crop, face_like(50, 120)[30:80, 20:60])
    assert train.loc["3_rgba", "channels"] == 3

    test = rows[rows["split"] == "test"]
    assert test["label"].value_counts().to_dict() == {"happy": 2, "sad": 2, "fear": 1}

    rejected = pd.read_csv(tmp_path / "out" / "ingest_rejected.csv", keep_default_na=False)
    reasons = dict(zip(rejected["source_id"], rejected["reason"], strict=True))
    assert reasons["training.csv row 3 (1/b.jpg)"] == "excluded class contempt (expression 7)"
    assert reasons["training.csv row 4 (1/c.jpg)"] == "excluded class none (expression 8)"
    assert "outside the 120x120 image" in reasons["Manually_Annotated_Images/2/e.jpg"]
    assert reasons["Manually_Annotated_Images/2/missing.jpg"] == "file not found"
    assert "leaves the image folder" in reasons["training.csv row 8 (../escape.jpg)"]
    assert "not a whole number" in reasons["training.csv row 9 (2/f.jpg)"]
    assert reasons["validation.csv row 9 (v4/0.jpg)"] == "excluded class non-face (expression 10)"
    assert sum("balanced test subset" in r for r in reasons.values()) == 2
    kinds = dict(zip(rejected["source_id"], rejected["kind"], strict=True))
    assert (
        kinds["training.csv row 3 (1/b.jpg)"] == kinds["validation.csv row 9 (v4/0.jpg)"] == "excluded_class"
    )
    assert kinds["Manually_Annotated_Images/2/e.jpg"] == "bad_face_box"
    assert kinds["Manually_Annotated_Images/2/missing.jpg"] == "missing_file"
    assert (
        kinds["training.csv row 8 (../escape.jpg)"] == "unsafe_path"
        and kinds["training.csv row 9 (2/f.jpg)"] == "malformed_row"
    )
    assert report.rejected_by_kind["excluded_class"] == 3  # contempt, none, non-face
    assert report.rejected_by_kind["not_sampled"] == 2
    assert sum(report.rejected_by_kind.values()) == report.rejected == len(rejected)


def test_affectnet_test_subset_is_deterministic_by_seed(tmp_path):
    root = make_affectnet(tmp_path / "AffectNet")
    chosen = []
    for run, seed in enumerate([7, 7, 8, 9, 10]):
        ingest(root, tmp_path / f"out{run}", seed=seed)
        manifest = read_manifest(tmp_path / f"out{run}").manifest
        chosen.append(tuple(sorted(manifest[manifest["split"] == "test"]["id"])))
    assert chosen[0] == chosen[1]
    assert len(set(chosen)) > 1  # other seeds draw other subsets
