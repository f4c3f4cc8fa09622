"""The origin check: synthetic training images must not be told apart by size or sharpness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fersynth.augment import run_augment
from fersynth.classes import CLASSES
from fersynth.dataset import load_image, read_manifest, write_manifest
from fersynth.demo import draw_face
from fersynth.generate import run_generate, run_merge
from fersynth.generate.backends import Generated, resize_seed
from fersynth.origin_check import SHARPNESS_FACTOR, origin_check
from fersynth.settings import AugmentSettings, GenerateSettings
from helpers import write_dataset

SEED_SIZE = 48  # FER2013's size
WORKING_SIZE = 512  # gif-sd's default working size


def real_faces(root: Path, per_class: int = 3) -> Path:
    """Demo faces at 48 px: train and test splits."""
    rng = np.random.default_rng(0)
    rows, images = [], []
    for split in ("train", "test"):
        for name in CLASSES:
            for i in range(per_class):
                rows.append({"id": f"{split}_{name}_{i}", "label": name, "split": split})
                images.append(draw_face(name, rng, SEED_SIZE))
    return write_dataset(root, rows, images)


class WorkingSizeCopies:
    """A stand-in backend: each output is its seed as the backend sees it (at the working
    size), so what is written shows only what the generation stage's writing path does."""

    def generate(self, batch):
        n = len(batch.seed_index)
        return Generated([batch.seeds[i] for i in batch.seed_index], [0.0] * n, [0.0] * n)


def test_synthetic_images_at_the_working_size_fail_the_check(tmp_path):
    data = real_faces(tmp_path / "real")
    manifest = read_manifest(data).manifest
    seeds = manifest[manifest["split"] == "train"]
    rows = [{k: str(v) for k, v in row.items()} for row in seeds.to_dict("records")]
    images = [load_image(data / path) for path in seeds["path"]]
    for row in seeds.head(7).itertuples():  # stored at 512 px, as before the fix
        rows.append(
            {
                "id": f"{row.id}_k0",
                "label": row.label,
                "split": "train",
                "origin": "synthetic",
                "seed_id": row.id,
            }
        )
        images.append(resize_seed(load_image(data / row.path), WORKING_SIZE))
    check = origin_check(write_dataset(tmp_path / "mixed", rows, images))
    assert not check.passed
    assert check.by_origin["real"].median_width == SEED_SIZE and check.by_origin["real"].images == 21
    assert check.by_origin["synthetic"].median_width == WORKING_SIZE
    assert check.synthetic_size_mismatch == 1.0 and check.synthetic_seed_unknown == 0
    assert check.sharpness_ratio < 0.01  # an upscaled face is nearly flat per pixel
    assert "100% of synthetic images differ in size from their seed (e.g. 512x512 vs seed 48x48)" in (
        check.warning()
    )
    assert "sharpness" in check.problems[1]
    table = check.table()
    assert table.loc["synthetic", "median size (px)"] == "512 x 512"


def test_generated_then_augmented_set_passes_the_check(tmp_path):
    data = real_faces(tmp_path / "real")
    generate = GenerateSettings(data=data, output=tmp_path / "gen", k=2, device="cpu")
    run_generate(generate, backend=(WorkingSizeCopies(), WORKING_SIZE), progress=False)
    merged = run_merge(generate, num_shards=1, progress=False)
    synthetic = read_manifest(merged.output).manifest
    assert set(synthetic["width"].astype(int)) == set(synthetic["height"].astype(int)) == {SEED_SIZE}
    write_manifest(merged.output, synthetic.assign(v_accepted="true", v_agree="3"))  # as if verified
    output = tmp_path / "augmented"
    run_augment(
        AugmentSettings(original=data, synthetic=merged.output, output=output, variant="expanded"),
        seed=0,
        progress=False,
    )
    report = json.loads((output / "augment_report.json").read_text())["origin_check"]
    assert report["passed"] and report["problems"] == []
    assert report["synthetic_size_mismatch"] == 0.0
    real, synth = report["by_origin"]["real"], report["by_origin"]["synthetic"]
    assert (synth["images"], synth["median_width"], real["median_width"]) == (42, SEED_SIZE, SEED_SIZE)
    # The round trip through 512 px (bicubic up, LANCZOS down) keeps most of the seed's detail.
    assert 1 / SHARPNESS_FACTOR < report["sharpness_ratio"] < 1.0
    page = (output / "augment_report.md").read_text()
    assert "## Origin check" in page and "| synthetic |" in page and "Warning" not in page


def test_a_set_without_synthetic_images_passes(tmp_path):
    check = origin_check(real_faces(tmp_path / "real", per_class=1))
    assert check.passed and check.synthetic_size_mismatch is None and check.sharpness_ratio is None
    assert list(check.by_origin) == ["real"] and check.warning() == ""


@pytest.mark.parametrize("size", [SEED_SIZE, 100])
def test_seed_sizes_come_from_the_seed_dataset_when_the_set_lacks_them(tmp_path, size):
    data = real_faces(tmp_path / "real", per_class=1)
    seed_row = read_manifest(data).manifest.iloc[0]
    row = {"id": "s_k0", "label": seed_row["label"], "split": "train", "origin": "synthetic"}
    face = draw_face(seed_row["label"], np.random.default_rng(1), size)
    only = write_dataset(tmp_path / "synthetic", [{**row, "seed_id": seed_row["id"]}], [face])
    check = origin_check(only, seeds=data)
    assert check.synthetic_size_mismatch == (0.0 if size == SEED_SIZE else 1.0)
    assert check.sharpness_ratio is None  # no real training images in this set
    assert check.passed == (size == SEED_SIZE)
