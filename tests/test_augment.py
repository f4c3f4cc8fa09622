"""Thesis Algorithm 4 on hand-computed cases, and the dataset variants it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tests.helpers import colour_image, write_dataset

from fersynth.augment import plan, ranked_pool, ratio, run_augment
from fersynth.classes import CLASSES
from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.settings import AugmentSettings


def counts(**values: int) -> dict[str, int]:
    return {name: values.get(name, 0) for name in CLASSES}


ORIGINAL = counts(surprise=100, fear=10, disgust=20, happy=400, sad=200, angry=50, neutral=300)


def test_rho_already_met_adds_nothing():
    balanced = counts(**{name: 100 for name in CLASSES})
    assert plan(balanced, counts(fear=50), rho=1.0) == counts()
    assert plan(ORIGINAL, counts(fear=500), rho=40.0) == counts()  # 400 / 10 = 40 already


def test_several_minor_classes_are_raised_to_largest_over_rho():
    # largest 400, rho 4 -> every class needs at least 100
    added = plan(ORIGINAL, counts(fear=500, disgust=500, angry=500, surprise=500), rho=4.0)
    assert added == counts(fear=90, disgust=80, angry=50)
    after = {k: ORIGINAL[k] + added[k] for k in CLASSES}
    assert ratio(after) == pytest.approx(4.0)


def test_an_exhausted_pool_stops_that_class_only():
    added = plan(ORIGINAL, counts(fear=30, disgust=500, angry=500), rho=4.0)
    assert added == counts(fear=30, disgust=80, angry=50)
    after = {k: ORIGINAL[k] + added[k] for k in CLASSES}
    assert ratio(after) == pytest.approx(400 / 40)  # fear stays the smallest: 10 + 30


def test_rho_rounds_the_target_up_and_never_grows_the_largest_class():
    added = plan(
        counts(happy=7, fear=1, **{n: 7 for n in CLASSES if n not in ("happy", "fear")}),
        counts(fear=9, happy=9),
        rho=3.0,
    )
    assert added["fear"] == 2 and added["happy"] == 0  # ceil(7 / 3) = 3 fear images
    assert plan(ORIGINAL, counts(fear=1000), rho=None)["fear"] == 1000  # expanded: all
    assert plan(ORIGINAL, counts(fear=1000), rho=1.0)["fear"] == 390  # balanced
    assert ratio(counts(happy=3, fear=1)) == 3 and math.isinf(ratio(counts()))
    with pytest.raises(FersynthError, match="at least 1"):
        plan(ORIGINAL, counts(), rho=0.5)


def synthetic_rows(label: str, agreements: list[int]) -> list[dict]:
    return [
        {
            "id": f"{label}_s{i}",
            "label": label,
            "split": "train",
            "origin": "synthetic",
            "seed_id": f"{label}0",
            "v_agree": str(a),
            "v_accepted": "true" if a >= 2 else "false",
        }
        for i, a in enumerate(agreements)
    ]


def test_pool_order_is_agreement_first_and_seeded_among_ties(tmp_path):
    rows = synthetic_rows("fear", [2, 3, 2, 3, 2, 1, 3, 2])
    import pandas as pd

    frame = pd.DataFrame(rows)
    ordered = ranked_pool(frame, seed=7)
    assert ordered["v_agree"].tolist() == ["3", "3", "3", "2", "2", "2", "2"]  # agree 1 was rejected
    again = ranked_pool(frame, seed=7)
    assert ordered["id"].tolist() == again["id"].tolist()
    orders = {tuple(ranked_pool(frame, seed=s)["id"]) for s in range(10)}
    assert len(orders) > 1  # ties really are shuffled by the seed


@pytest.fixture
def datasets(tmp_path):
    rows, images = [], []
    for name, n in (("happy", 8), ("fear", 2), ("sad", 4)):
        for i in range(n):
            rows.append({"id": f"{name}{i}", "label": name, "split": "train"})
            images.append(colour_image(CLASSES.index(name), len(rows)))
    rows.append({"id": "test0", "label": "fear", "split": "test"})
    images.append(colour_image(CLASSES.index("fear"), 99))
    original = write_dataset(tmp_path / "original", rows, images)
    syn = synthetic_rows("fear", [3, 2, 2, 2, 1]) + synthetic_rows("sad", [3, 3])
    syn_images = [colour_image(CLASSES.index(r["label"]), 200 + i) for i, r in enumerate(syn)]
    synthetic = write_dataset(tmp_path / "synthetic", syn, syn_images)
    return original, synthetic


def test_run_augment_writes_the_rebalanced_dataset(datasets, tmp_path):
    original, synthetic = datasets
    settings = AugmentSettings(original=original, synthetic=synthetic, output=tmp_path / "rho2", rho=2.0)
    result = run_augment(settings, seed=1, progress=False)
    # largest 8, rho 2 -> 4 each: fear +2 of its 4 accepted (agree 3 first), sad needs none
    assert result.added["fear"] == 2 and result.added["sad"] == 0
    assert result.after["fear"] == 4 and result.ratio_after == pytest.approx(2.0)
    frame = read_manifest(tmp_path / "rho2").manifest
    added = frame[frame["origin"] == "synthetic"]
    assert "fear_s0" in set(added["id"])  # the only image all three voters agreed on
    assert all(path.startswith("synthetic/") for path in added["path"])
    assert all((tmp_path / "rho2" / p).is_file() for p in frame["path"])
    assert (frame["split"] == "test").sum() == 1
    report = json.loads((tmp_path / "rho2" / "augment_report.json").read_text())
    assert report["per_class"]["fear"] == {"original": 2, "accepted pool": 4, "added": 2, "training set": 4}
    # The same seed picks the same images.
    again = run_augment(settings.model_copy(update={"output": tmp_path / "again"}), seed=1, progress=False)
    assert sorted(again.manifest["id"]) == sorted(frame["id"])


@pytest.mark.parametrize(
    ("variant", "fear", "sad", "happy"),
    [("original", 2, 4, 8), ("expanded", 6, 6, 8), ("balanced", 6, 6, 8), ("synthetic", 4, 2, 0)],
)
def test_variants(datasets, tmp_path, variant, fear, sad, happy):
    original, synthetic = datasets
    settings = AugmentSettings(
        original=original, synthetic=synthetic, output=tmp_path / f"out_{variant}", variant=variant
    )
    result = run_augment(settings, seed=1, progress=False)
    assert (result.after["fear"], result.after["sad"], result.after["happy"]) == (fear, sad, happy)
    frame = read_manifest(settings.output).manifest
    assert (frame["split"] == "test").sum() == 1  # evaluation data is never touched
    assert np.all(frame[frame["origin"] == "synthetic"]["v_accepted"] == "true")


def test_unverified_synthetic_data_is_refused(datasets, tmp_path):
    original, _ = datasets
    settings = AugmentSettings(original=original, synthetic=original, output=tmp_path / "x")
    with pytest.raises(FersynthError, match="run `fersynth verify`"):
        run_augment(settings, seed=1, progress=False)
