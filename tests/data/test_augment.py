"""Thesis Algorithm 4 on hand-computed cases, and the dataset variants it writes."""

from __future__ import annotations

import json
import math
import typing

import numpy as np
import pytest
from tests.helpers import colour_image, write_dataset

from fersynth.augment import (
    plan,
    plan_expanded_balanced,
    plan_variant,
    ranked_pool,
    ratio,
    run_augment,
    short_pools,
    wanted,
)
from fersynth.classes import CLASSES
from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.settings import AugmentSettings, AugmentVariant


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
    [
        ("original", 2, 4, 8),
        ("expanded", 6, 6, 8),
        ("balanced", 6, 6, 8),
        ("synthetic", 4, 2, 0),
        ("synthetic_matched", 2, 2, 0),  # min(original, pool): happy has no pool
        ("expanded_balanced", 6, 6, 8),  # fear +2 and sad +2 (own counts), then fear +2 more
    ],
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


def test_new_identities_are_their_own_variants_pool(tmp_path):
    rows, images = [], []
    for name, n in (("happy", 8), ("fear", 2)):
        for i in range(n):
            rows.append({"id": f"{name}{i}", "label": name, "split": "train"})
            images.append(colour_image(CLASSES.index(name), len(rows)))
    original = write_dataset(tmp_path / "original", rows, images)
    expansions = [{**row, "gen_kind": "expand"} for row in synthetic_rows("fear", [3, 3])]
    faces = [
        {**row, "id": f"face{i}", "seed_id": "", "gen_kind": "identity"}
        for i, row in enumerate(synthetic_rows("fear", [3, 3, 3, 3, 3, 3, 1]))
    ]
    syn = expansions + faces
    synthetic = write_dataset(
        tmp_path / "synthetic", syn, [colour_image(CLASSES.index("fear"), 300 + i) for i in range(len(syn))]
    )

    def added(variant: str) -> set[str]:
        settings = AugmentSettings(
            original=original, synthetic=synthetic, output=tmp_path / variant, variant=variant, rho=2.0
        )
        result = run_augment(settings, seed=1, progress=False)
        return set(result.manifest.loc[result.manifest["origin"] == "synthetic", "id"])

    # rho 2 on happy 8: fear needs 2 more. Identities (no seed image) are not dropped as seedless.
    chosen = added("identities")
    assert len(chosen) == 2 and chosen <= {f"face{i}" for i in range(6)}  # face6 was rejected
    assert added("rho") == {"fear_s0", "fear_s1"}  # the expansions' variants never take an identity
    assert added("expanded") == {"fear_s0", "fear_s1"}
    report = json.loads((tmp_path / "identities" / "augment_report.json").read_text())
    assert report["dropped_seeds"] == {} and report["rho"] == 2.0


def test_unverified_synthetic_data_is_refused(datasets, tmp_path):
    original, _ = datasets
    settings = AugmentSettings(original=original, synthetic=original, output=tmp_path / "x")
    with pytest.raises(FersynthError, match="run `fersynth verify`"):
        run_augment(settings, seed=1, progress=False)


def test_synthetic_matched_takes_the_original_counts_as_far_as_the_pools_allow():
    pool = counts(fear=5, happy=1000, disgust=20)
    added = plan_variant("synthetic_matched", ORIGINAL, pool)
    assert added == counts(fear=5, happy=400, disgust=20)  # happy: its 400, not its 1000
    shorts = short_pools(wanted("synthetic_matched", ORIGINAL, pool), pool)
    assert {"class": "fear", "wanted": 10, "available": 5} in shorts
    assert {s["class"] for s in shorts} == {"fear", "surprise", "sad", "angry", "neutral"}


def test_expanded_balanced_adds_to_every_class_then_balances_the_expanded_counts():
    pool = counts(happy=100, sad=300, fear=1000, disgust=30, angry=50, surprise=100)
    added = plan_expanded_balanced(ORIGINAL, pool)
    # Step 1, own counts as far as the pools allow: happy 100, sad 200, fear 10, disgust 20,
    # angry 50, surprise 100 -> happy 500 is the largest expanded count. Step 2 from what is
    # left: sad +100, fear +480, disgust +10 (its pool is used up).
    assert added == counts(happy=100, sad=300, fear=490, disgust=30, angry=50, surprise=100)
    after = {k: ORIGINAL[k] + added[k] for k in CLASSES}
    assert after == counts(happy=500, sad=500, fear=500, disgust=50, angry=100, neutral=300, surprise=200)
    assert added["happy"] > 0  # the largest class gets synthetic images too: no minor-class cue
    assert plan_variant("expanded_balanced", ORIGINAL, pool) == added
    shorts = {
        s["class"]: (s["wanted"], s["available"])
        for s in short_pools(wanted("expanded_balanced", ORIGINAL, pool), pool)
    }
    assert shorts == {
        "happy": (400, 100),
        "disgust": (480, 30),
        "angry": (450, 50),
        "neutral": (300, 0),
        "surprise": (400, 100),
    }
    # Unlimited pools: every class doubles, then all reach twice the largest.
    assert plan_expanded_balanced(ORIGINAL, counts(**{n: 10_000 for n in CLASSES})) == {
        k: 800 - ORIGINAL[k] for k in CLASSES
    }


@pytest.mark.parametrize("variant", typing.get_args(AugmentVariant))
def test_every_variant_adds_the_smaller_of_its_pool_and_what_it_wants(variant):
    rng = np.random.default_rng(3)
    for _ in range(200):
        original = dict(zip(CLASSES, rng.integers(0, 50, 7).tolist(), strict=True))
        pool = dict(zip(CLASSES, rng.integers(0, 80, 7).tolist(), strict=True))
        added = plan_variant(variant, original, pool, rho=2.0)
        want = wanted(variant, original, pool, rho=2.0)
        assert added == {k: min(pool[k], want[k]) for k in CLASSES}
        assert all(0 <= added[k] <= pool[k] for k in CLASSES)
    assert plan_variant("rho", ORIGINAL, counts(fear=500), 4.0) == plan(ORIGINAL, counts(fear=500), 4.0)
    assert plan_variant("balanced", ORIGINAL, counts(fear=500)) == plan(ORIGINAL, counts(fear=500), 1.0)


def test_short_pools_are_named_in_the_report(datasets, tmp_path):
    original, synthetic = datasets
    output = tmp_path / "matched"
    settings = AugmentSettings(
        original=original, synthetic=synthetic, output=output, variant="synthetic_matched"
    )
    result = run_augment(settings, seed=1, progress=False)
    assert result.added == counts(fear=2, sad=2)
    report = json.loads((output / "augment_report.json").read_text())
    assert report["short_pools"] == [
        {"class": "happy", "wanted": 8, "available": 0},
        {"class": "sad", "wanted": 4, "available": 2},
    ]
    page = (output / "augment_report.md").read_text()
    assert "- sad: 4 wanted, 2 available" in page and "- happy: 8 wanted, 0 available" in page
    frame = read_manifest(output).manifest
    assert set(frame[frame["split"] == "train"]["origin"]) == {"synthetic"}


@pytest.fixture
def leaky(tmp_path):
    """An original with train, val and test splits, and synthetic images seeded from each of
    them, from an image the guard removed, and from none; those not seeded from training images
    are accepted by every voter, so a variant that let them in would pick them first."""
    rows, images = [], []
    for split, per_class in (
        ("train", {"happy": 6, "fear": 2, "sad": 3}),
        ("val", {"happy": 1, "fear": 1, "sad": 1}),
    ):
        for name, n in per_class.items():
            for i in range(n):
                rows.append({"id": f"{split}_{name}{i}", "label": name, "split": split})
                images.append(colour_image(CLASSES.index(name), len(rows)))
    for i, name in enumerate(("fear", "happy")):
        rows.append({"id": f"test_{name}{i}", "label": name, "split": "test"})
        images.append(colour_image(CLASSES.index(name), 90 + i))
    original = write_dataset(tmp_path / "original", rows, images)

    def synthetic(sid, label, seed, agree, split="train"):
        return {
            "id": sid,
            "label": label,
            "split": split,
            "origin": "synthetic",
            "seed_id": seed,
            "v_agree": str(agree),
            "v_accepted": "true",
        }

    syn = []
    for name in ("happy", "fear", "sad"):
        syn += [synthetic(f"ok_{name}{i}", name, f"train_{name}0", 2) for i in range(3)]
        syn.append(synthetic(f"fromval_{name}", name, f"val_{name}0", 3))
    syn += [
        synthetic("fromtest_fear", "fear", "test_fear0", 3),
        synthetic("fromtest_happy", "happy", "test_happy1", 3),
        synthetic("fromgone_sad", "sad", "guarded_away7", 3),
        synthetic("noseed_fear", "fear", "", 3),
        synthetic("valsplit_sad", "sad", "train_sad1", 3, split="val"),  # the synthetic set's own val
    ]
    syn_images = [colour_image(CLASSES.index(r["label"]), 300 + i) for i, r in enumerate(syn)]
    return original, write_dataset(tmp_path / "synthetic", syn, syn_images)


@pytest.mark.parametrize("variant", typing.get_args(AugmentVariant))
def test_every_variant_keeps_val_and_test_and_no_image_seeded_outside_training(leaky, tmp_path, variant):
    original, synthetic = leaky
    output = tmp_path / "augmented" / variant
    settings = AugmentSettings(original=original, synthetic=synthetic, output=output, variant=variant)
    run_augment(settings, seed=1, progress=False)
    before = read_manifest(original).manifest
    after = read_manifest(output).manifest
    for split in ("val", "test"):  # the very rows and files of the original, nothing else
        kept = after[after["split"] == split].sort_values("id")
        real = before[before["split"] == split].sort_values("id")
        assert (
            kept[["id", "path", "label", "origin"]].values.tolist()
            == real[["id", "path", "label", "origin"]].values.tolist()
        )
        for path in real["path"]:
            assert (output / path).read_bytes() == (original / path).read_bytes()
    assert set(after[after["split"] == "val"]["origin"]) == {"real"}
    added = after[after["origin"] == "synthetic"]
    assert set(added["split"]) <= {"train"}
    train_ids = set(before[before["split"] == "train"]["id"])
    assert set(added["seed_id"]) <= train_ids
    assert not any(added["id"].str.startswith(("fromval", "fromtest", "fromgone", "noseed", "valsplit")))
    if variant not in ("original", "identities"):  # this set has no new identities
        assert len(added) > 0
    report = json.loads((output / "augment_report.json").read_text())
    assert report["dropped_seeds"] == {
        "no_seed": 1,
        "seed_in_test": 2,
        "seed_in_val": 3,
        "seed_not_in_original": 1,
    }
    assert (
        "no_seed 1, seed_in_test 2, seed_in_val 3, seed_not_in_original 1."
        in (output / "augment_report.md").read_text()
    )


def test_a_copy_twins_set_takes_the_same_count_per_class_preferring_the_copies_of_the_rows_images(
    datasets, tmp_path
):
    original, _ = datasets  # happy 8, fear 2, sad 4
    generated = [{**row, "gen_kind": "expand"} for row in synthetic_rows("fear", [3, 2, 2, 2, 1])]
    # Copy twins: fear_s0's copy was rejected by the vote, so a twin of another image fills in.
    copies = [
        {**row, "id": f"{row['id']}_copy", "gen_kind": "copy", "v_accepted": accepted}
        for row, accepted in zip(generated, ["false", "true", "true", "true", "true"], strict=True)
    ]
    syn = generated + copies
    synthetic = write_dataset(
        tmp_path / "synthetic", syn, [colour_image(CLASSES.index("fear"), 300 + i) for i in range(len(syn))]
    )

    def run(pool: str):
        settings = AugmentSettings(
            original=original, synthetic=synthetic, output=tmp_path / pool, variant="rho", rho=2.0, pool=pool
        )
        result = run_augment(settings, seed=1, progress=False)
        return result, set(result.manifest.loc[result.manifest["origin"] == "synthetic", "id"])

    real, real_ids = run("generated")
    twin, twin_ids = run("copies")
    assert real.added["fear"] == 2 and twin.added == real.added  # rho 2 on happy 8: fear +2
    assert all(not i.endswith("_copy") for i in real_ids)  # the generated pool never takes a copy
    assert all(i.endswith("_copy") for i in twin_ids)
    # Its row took fear_s0 (agree 3) and one of fear_s1..s3; fear_s0's twin was rejected.
    taken_copies = {f"{i}_copy" for i in real_ids} - {"fear_s0_copy"}
    assert taken_copies <= twin_ids and "fear_s0_copy" not in twin_ids
    report = json.loads((tmp_path / "copies" / "augment_report.json").read_text())
    assert report["pool"] == "copies" and report["per_class"]["fear"]["added"] == 2
    with pytest.raises(FersynthError, match="no copy twins"):
        run_augment(
            AugmentSettings(
                original=original,
                synthetic=synthetic,
                output=tmp_path / "x",
                variant="identities",
                pool="copies",
            ),
            seed=1,
            progress=False,
        )
