from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from skimage.feature import hog

from fersynth.classes import CLASSES
from fersynth.dataset import read_manifest
from fersynth.demo import RAFDB_TRAIN_COUNTS, TRUTH_FILE, allocate, write_demo_data
from fersynth.ingest import run_ingest
from fersynth.settings import DemoSettings, IngestSettings


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "raw"
    write_demo_data(DemoSettings(output=folder), progress=False)
    return folder


def test_allocate_keeps_total_and_proportions():
    counts = allocate(900, RAFDB_TRAIN_COUNTS)
    assert sum(counts.values()) == 900
    assert 15 < counts["happy"] / counts["fear"] < 19  # RAF-DB's 17
    assert min(allocate(7, {c: 1 if c != "happy" else 1000 for c in CLASSES}).values()) == 1


def test_demo_is_deterministic_by_seed(tmp_path, demo):
    again = tmp_path / "again"
    write_demo_data(DemoSettings(output=again), progress=False)
    labels = "EmoLabel/list_patition_label.txt"
    assert (again / labels).read_text() == (demo / labels).read_text()
    for name in ("train_00001", "train_00450", "test_00007"):
        image = f"Image/aligned/{name}_aligned.jpg"
        assert (again / image).read_bytes() == (demo / image).read_bytes()
    other = tmp_path / "other"
    write_demo_data(DemoSettings(output=other, seed=1, train_size=20, test_size=7), progress=False)
    first = "Image/aligned/train_00001_aligned.jpg"
    assert (other / first).read_bytes() != (demo / first).read_bytes()


def test_demo_long_tail_noise_and_degradations(demo):
    truth = pd.read_csv(demo / TRUTH_FILE, keep_default_na=False)
    assert len(truth) == 1200
    train = truth[truth["split"] == "train"]
    drawn = train["drawn"].value_counts()
    assert 15 < drawn["happy"] / drawn["fear"] < 19
    noise = (truth["label"] != truth["drawn"]).mean()
    assert 0.01 < noise < 0.06
    tiny = truth[truth["degradation"] == "tiny"]
    blurred = truth[truth["degradation"] == "blurred"]
    assert 0.02 < len(tiny) / len(truth) < 0.09 and 0.02 < len(blurred) / len(truth) < 0.09
    image = cv2.imread(str(demo / f"Image/aligned/{tiny['name'].iloc[0]}_aligned.jpg"))
    assert image.shape == (28, 28, 3)

    def sharpness(name: str) -> float:
        grey = cv2.imread(str(demo / f"Image/aligned/{name}_aligned.jpg"), cv2.IMREAD_GRAYSCALE)
        return cv2.Laplacian(grey, cv2.CV_64F).var()

    clean = truth[truth["degradation"] == ""]["name"].iloc[:30]
    assert np.median([sharpness(n) for n in blurred["name"].iloc[:30]]) < 0.5 * np.median(
        [sharpness(n) for n in clean]
    )


def test_demo_expressions_are_learnable(demo):
    """Nearest class centroid on HOG features: well above the 1/7 chance level."""
    truth = pd.read_csv(demo / TRUTH_FILE, keep_default_na=False)
    truth = truth[truth["degradation"] == ""]
    features = []
    for name in truth["name"]:
        grey = cv2.imread(str(demo / f"Image/aligned/{name}_aligned.jpg"), cv2.IMREAD_GRAYSCALE)
        small = cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA)
        features.append(hog(small, orientations=8, pixels_per_cell=(8, 8), cells_per_block=(1, 1)))
    x, y = np.array(features), truth["drawn"].to_numpy()
    train = (truth["split"] == "train").to_numpy()
    centroids = np.stack([x[train & (y == c)].mean(axis=0) for c in CLASSES])
    distances = ((x[~train][:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    predicted = np.array(CLASSES)[distances.argmin(axis=1)]
    assert (predicted == y[~train]).mean() > 0.45


def test_demo_goes_through_the_rafdb_reader(demo, tmp_path):
    report = run_ingest(IngestSettings(source="rafdb", input=demo, output=tmp_path / "ds"), progress=False)
    assert report.written == 1200 and report.rejected == 0
    dataset = read_manifest(tmp_path / "ds")
    truth = pd.read_csv(demo / TRUTH_FILE, keep_default_na=False).set_index("name")
    rows = dataset.manifest.set_index("id")
    assert (rows["label"] == truth.loc[rows.index, "label"]).all()
    assert set(rows["width"]) == {100, 28}
