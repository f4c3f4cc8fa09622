"""Voting, the test-leakage guard, fidelity, on voters with known behaviour."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tests.helpers import colour_dataset, colour_image, tiny_train_settings, write_dataset

from fersynth.classes import CLASSES
from fersynth.dataset import read_manifest
from fersynth.demo import draw_face
from fersynth.errors import FersynthError
from fersynth.settings import GuardSettings, VerifySettings
from fersynth.train.loop import run_train
from fersynth.verify import run_guard, run_verify
from fersynth.verify.leakage import nearest, perceptual_hash
from fersynth.verify.voting import (
    calibrated_thresholds,
    decide,
    majority,
    recognised_classes,
    voter_recall,
)

FEAR, HAPPY, SAD = CLASSES.index("fear"), CLASSES.index("happy"), CLASSES.index("sad")


def one_hot(labels, strength=0.9):
    p = np.full((len(labels), len(CLASSES)), (1 - strength) / (len(CLASSES) - 1))
    p[np.arange(len(labels)), labels] = strength
    return p


# --- voting rule -------------------------------------------------------------------------


def test_decide_counts_agreeing_voters_and_mean_probability():
    # three images, three voters; intended label fear for all
    probabilities = np.stack(
        [
            one_hot([FEAR, FEAR, HAPPY]),
            one_hot([FEAR, HAPPY, HAPPY]),
            one_hot([FEAR, FEAR, HAPPY], strength=0.6),
        ]
    )
    labels = np.array([FEAR, FEAR, FEAR])
    table = decide(probabilities, labels, min_votes=2, min_probability=0.5)
    assert table["v_agree"].tolist() == [3, 2, 0]
    assert table["v_votes"][1] == "fear,happy,fear"
    np.testing.assert_allclose(table["v_mean_prob"][0], (0.9 + 0.9 + 0.6) / 3, atol=1e-4)
    assert table["v_accepted"].tolist() == [True, True, False]
    assert table["v_reason"][2].startswith("0 of 3 voters agree (need 2)")
    assert table["v_rejected_by"].tolist() == ["", "", "votes|probability"]  # the reasons as codes
    # image 1: two of three agree, but their mean probability (0.9 + 0.0167 + 0.6)/3 = 0.505
    strict = decide(probabilities, labels, min_votes=2, min_probability=0.6)
    assert strict["v_accepted"].tolist() == [True, False, False]
    assert "mean probability 0.51 < 0.60" in strict["v_reason"][1]
    assert strict["v_rejected_by"].tolist() == ["", "probability", "votes|probability"]
    assert decide(probabilities, labels, min_votes=3, min_probability=0.0)["v_accepted"].tolist() == [
        True,
        False,
        False,
    ]


def test_a_class_too_few_voters_recall_on_validation_is_not_verified():
    # 3 voters, 2 classes present on validation: surprise (index 0) and fear (index 1).
    labels = np.array([0, 0, 1, 1])
    probabilities = np.zeros((3, 4, 7))
    probabilities[0, :, 0] = 1  # voter 0 says surprise to everything
    probabilities[1, [0, 1], 0], probabilities[1, [2, 3], 1] = 1, 1  # voter 1 is right
    probabilities[2, [0, 1], 0], probabilities[2, [2], 1], probabilities[2, [3], 0] = 1, 1, 1
    recall = voter_recall(probabilities, labels)
    assert recall[:, 0].tolist() == [1.0, 1.0, 1.0] and recall[:, 1].tolist() == [0.0, 1.0, 0.5]
    assert np.isnan(recall[:, 2]).all()  # disgust: no validation image
    recognised = recognised_classes(recall, min_votes=2, min_recall=0.6)
    assert recognised[:3].tolist() == [True, False, True]
    votes = decide(
        probabilities, np.array([0, 1, 1, 1]), min_votes=1, min_probability=0.0, recognised=recognised
    )
    assert votes["v_accepted"].tolist() == [True, False, False, False]
    assert votes["v_rejected_by"].tolist() == ["", "votes|unrecognised", "unrecognised", "unrecognised"]
    assert "do not recognise fear on validation" in votes["v_reason"].iloc[1]


def test_probability_thresholds_are_calibrated_per_class_on_validation():
    # 2 voters, 4 validation images of fear (index 1) voted right at 0.3-0.6, one of surprise.
    labels = np.array([1, 1, 1, 1, 0])
    probabilities = np.full((2, 5, 7), 0.05)
    for i, p in enumerate((0.3, 0.4, 0.5, 0.6)):
        probabilities[:, i, 1] = p
    probabilities[:, 4, 0] = 0.9
    tau = calibrated_thresholds(probabilities, labels, min_votes=2, min_probability=0.5, quantile=0.0)
    assert tau[1] == pytest.approx(0.3)  # as unsure as the voters are on real fear images
    assert tau[0] == 0.5 and tau[2] == 0.5  # too few images: the setting stands
    loose = calibrated_thresholds(probabilities, labels, min_votes=2, min_probability=0.2, quantile=0.0)
    assert loose[1] == pytest.approx(0.2)  # never raised above min_probability
    fixed = calibrated_thresholds(probabilities, labels, min_votes=2, min_probability=0.5, quantile=None)
    assert (fixed == 0.5).all()
    # decide() reads each image's threshold at its label.
    votes = decide(
        probabilities[:, :4],
        np.array([1, 1, 1, 1]),
        min_votes=2,
        min_probability=np.where(tau > 0.35, 0.45, tau),
    )
    assert votes["v_accepted"].tolist() == [True, True, True, True]


def test_majority_breaks_ties_by_mean_probability():
    probabilities = np.stack(
        [one_hot([FEAR, SAD], 0.9), one_hot([FEAR, HAPPY], 0.6), one_hot([HAPPY, HAPPY], 0.99)]
    )
    # image 0: fear 2 votes beats happy 1 despite happy's 0.99; image 1: sad 1 vs happy 2 -> happy
    assert majority(probabilities).tolist() == [FEAR, HAPPY]
    tie = np.stack([one_hot([FEAR], 0.9), one_hot([SAD], 0.7)])
    assert majority(tie).tolist() == [FEAR]


# --- perceptual hash and matching --------------------------------------------------------


def jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def resized(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))


def demo_faces(count: int, size: int = 100) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [draw_face(CLASSES[i % 7], rng, size) for i in range(count)]


def test_perceptual_hash_survives_resizing_and_recompression_but_separates_faces():
    faces = demo_faces(24)
    hashes = np.array([perceptual_hash(f) for f in faces], dtype=np.uint64)
    copy = jpeg_roundtrip(resized(faces[5], 72), quality=60)
    _, distance = nearest(np.array([perceptual_hash(copy)], dtype=np.uint64), hashes[5:6])
    assert distance[0] <= 6
    pairwise = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    off_diagonal = pairwise[~np.eye(len(faces), dtype=bool)]
    assert off_diagonal.min() > 6, "distinct demo faces must not look like copies"


def test_nearest_matches_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    candidates = rng.integers(0, 2**63, size=37, dtype=np.uint64)
    tests = rng.integers(0, 2**63, size=11, dtype=np.uint64)
    index, distance = nearest(candidates, tests, block=5)
    for i, c in enumerate(candidates):
        brute = [bin(int(c) ^ int(t)).count("1") for t in tests]
        assert distance[i] == min(brute)
        assert index[i] == int(np.argmin(brute))


# --- the guard ---------------------------------------------------------------------------


@pytest.fixture
def leaky_dataset(tmp_path):
    """Test faces, distinct training faces, and three copies of test faces in train/val."""
    faces = demo_faces(12)
    rows, images = [], []
    for i in range(4):
        rows.append({"id": f"test{i}", "label": CLASSES[i], "split": "test"})
        images.append(faces[i])
    for i in range(4, 12):
        rows.append({"id": f"train{i}", "label": CLASSES[i % 7], "split": "train"})
        images.append(faces[i])
    rows.append({"id": "exact_copy", "label": CLASSES[0], "split": "train"})
    images.append(faces[0].copy())
    rows.append({"id": "resized_copy", "label": CLASSES[1], "split": "train"})
    images.append(jpeg_roundtrip(resized(faces[1], 80), quality=40))  # 4 bits away
    rows.append({"id": "val_copy", "label": CLASSES[2], "split": "val"})
    images.append(jpeg_roundtrip(faces[2], quality=50))
    return write_dataset(tmp_path / "leaky", rows, images)


def test_guard_removes_exact_and_near_copies_of_test_images(leaky_dataset, tmp_path):
    settings = GuardSettings(data=leaky_dataset, output=tmp_path / "guarded", test_sets=[], workers=1)
    result = run_guard(settings, progress=False)
    leaks = result.leaks.set_index("id")
    assert sorted(leaks.index) == ["exact_copy", "resized_copy", "val_copy"]
    assert leaks.at["exact_copy", "kind"] == "exact" and leaks.at["exact_copy", "distance"] == 0
    assert leaks.at["resized_copy", "kind"] == "perceptual"
    assert leaks.at["resized_copy", "test_id"] == "test1"
    assert leaks.at["val_copy", "test_id"] == "test2"
    assert leaks.at["resized_copy", "test_path"].endswith("images/test/test1.png")
    kept = read_manifest(tmp_path / "guarded").manifest
    assert len(kept) == 15 - 3 and not kept["id"].isin(leaks.index).any()
    assert (kept["split"] == "test").sum() == 4  # test images are never removed
    report = json.loads((tmp_path / "guarded" / "guard_report.json").read_text())
    assert report["removed"] == 3 and report["exact"] == 1 and report["distinct_test_images"] == 3
    assert (tmp_path / "guarded" / "leakage_pairs.png").is_file()
    listed = pd.read_csv(tmp_path / "guarded" / "leakage.csv")
    assert set(listed["id"]) == {"exact_copy", "resized_copy", "val_copy"}
    # A threshold below the resized copy's distance lets it through; exact copies never pass.
    distance = int(leaks.at["resized_copy", "distance"])
    assert 0 < distance <= settings.max_distance
    strict = settings.model_copy(update={"max_distance": distance - 1, "output": tmp_path / "strict"})
    strict_leaks = run_guard(strict, progress=False).leaks
    assert "resized_copy" not in set(strict_leaks["id"]) and "exact_copy" in set(strict_leaks["id"])


def test_guard_passes_distinct_images_and_checks_other_test_sets(leaky_dataset, tmp_path):
    faces = demo_faces(12)
    rows = [{"id": f"t{i}", "label": CLASSES[i % 7], "split": "train"} for i in range(4, 8)]
    clean = write_dataset(tmp_path / "clean", rows, faces[4:8])
    with pytest.raises(FersynthError, match="no test split"):
        run_guard(GuardSettings(data=clean, output=tmp_path / "out", test_sets=[]), progress=False)
    # The leaky dataset's test split, used as a cross-dataset test set, leaks into nothing here.
    settings = GuardSettings(data=clean, output=tmp_path / "out", test_sets=[leaky_dataset], workers=1)
    assert run_guard(settings, progress=False).leaks.empty


# --- verify with voters of known behaviour -------------------------------------------------


@pytest.fixture(scope="module")
def voters(tmp_path_factory):
    """Two voters that learnt colour -> class, and one that learnt every class shifted by one."""
    root = tmp_path_factory.mktemp("voters")
    data = colour_dataset(root / "colours", per_class=12, test_per_class=3, val_per_class=3)
    frame = read_manifest(data).manifest
    shifted = frame.assign(label=[CLASSES[(CLASSES.index(x) + 1) % 7] for x in frame["label"]])
    shifted_root = root / "shifted"
    shifted_root.mkdir()
    for relative in frame["path"]:
        (shifted_root / relative).parent.mkdir(parents=True, exist_ok=True)
        (shifted_root / relative).write_bytes((data / relative).read_bytes())
    from fersynth.dataset import write_manifest

    write_manifest(shifted_root, shifted)
    paths = []
    for name, source, seed in (("a", data, 1), ("b", data, 2), ("shifted", shifted_root, 3)):
        settings = tiny_train_settings(
            source, root / f"voter_{name}", steps=60, batch_size=16, lr=3e-3, rotation=0.0, eval_every=60
        )  # selected at the last step: a confident voter (the first perfect one is not yet)
        run_train(settings, seed=seed, progress=False)
        paths.append(str(root / f"voter_{name}"))
    return data, paths


@pytest.fixture
def synthetic(tmp_path):
    """Synthetic images: fear-coloured images meant as fear (good), happy-coloured images meant as
    fear (lost expression), and one copy of a reference test image."""
    rows, images = [], []
    for i in range(6):
        rows.append({"id": f"good{i}", "label": "fear", "split": "train", "origin": "synthetic"})
        images.append(colour_image(FEAR, 500 + i))
    for i in range(4):
        rows.append({"id": f"lost{i}", "label": "fear", "split": "train", "origin": "synthetic"})
        images.append(colour_image(HAPPY, 600 + i))
    return rows, images


def test_verify_accepts_what_the_voters_agree_on(voters, synthetic, tmp_path):
    reference, paths = voters
    rows, images = synthetic
    test_image = read_manifest(reference).split("test").iloc[0]
    rows.append({"id": "leak", "label": test_image["label"], "split": "train", "origin": "synthetic"})
    images.append(np.asarray(Image.open(reference / test_image["path"]).convert("RGB")))
    seeds = read_manifest(reference).split("train").query("label == 'fear'").head(3)
    for i, seed_row in enumerate(seeds.itertuples()):
        rows[i]["seed_id"] = seed_row.id
        images[i] = np.asarray(Image.open(reference / seed_row.path).convert("RGB"))
    data = write_dataset(tmp_path / "synthetic", rows, images)
    settings = VerifySettings(
        data=data,
        reference=reference,
        output=tmp_path / "verified",
        voters=paths,
        min_votes=2,
        min_probability=0.3,
        batch_size=16,
        workers=0,
        kid_subset_size=4,
    )
    result = run_verify(settings, GuardSettings(test_sets=[], workers=1), seed=0, progress=False)
    frame = result.manifest.set_index("id")
    assert "leak" not in frame.index and result.leaks["id"].tolist() == ["leak"]
    good = frame.loc[[f"good{i}" for i in range(6)]]
    lost = frame.loc[[f"lost{i}" for i in range(4)]]
    assert (good["v_accepted"] == "true").all() and (good["v_agree"] == 2).all()
    assert (good["v_votes"] == "fear,fear,disgust").all()  # the shifted voter says the next class
    assert (lost["v_accepted"] == "false").all() and (lost["v_agree"] == 0).all()
    assert lost["v_reason"].str.contains("0 of 3 voters agree").all()
    assert lost["v_rejected_by"].str.split("|").map(lambda codes: "votes" in codes).all()
    assert (good["v_rejected_by"] == "").all()
    # The written dataset keeps every verified row with its votes, images linked.
    written = read_manifest(tmp_path / "verified").manifest
    assert len(written) == 10 and (written["v_accepted"] == "true").sum() == 6
    assert all((tmp_path / "verified" / p).is_file() for p in written["path"])
    fear = result.fidelity.loc["fear"]
    assert fear["generated"] == 10 and fear["accepted"] == 6
    assert fear["acceptance_rate"] == pytest.approx(0.6)
    assert np.isfinite(fear["frechet_distance"]) and fear["frechet_distance"] >= 0
    assert np.isfinite(fear["diversity_synthetic"]) and fear["diversity_synthetic"] > 0
    # good0-2 copy their seed image (a real training image); the others have no seed.
    assert fear["seed_distance"] == pytest.approx(0.0, abs=1e-4)
    report = json.loads((tmp_path / "verified" / "verify_report.json").read_text())
    assert report["accepted"] == 6 and report["leaks"]["removed"] == 1
    assert report["rejected"] == 4 and report["rejected_by"]["votes"] == 4
    assert report["rejection_reasons"]["too few of 3 voters agree (need 2)"] == 4
    assert "v_rejected_by" in written.columns
    assert (tmp_path / "verified" / "verify_classes.png").is_file()
    page = (tmp_path / "verified" / "verify_report.md").read_text()
    assert "6 of 10" in page and "## What the voters recognise" in page
    # Each voter's recall on the real validation split: the shifted voter recalls nothing.
    assert report["voter_recall"]["voter_a"]["fear"] == 100.0
    assert report["voter_recall"]["voter_shifted"]["fear"] == 0.0
    assert all(report["recognised"].values())  # two voters recall every class
    assert report["rejected_by_class"]["fear"]["accepted"] == 6

    # All three voters required: the shifted one never agrees, and recalls no class on
    # validation, so the report blames the voters, not the images.
    unanimous = settings.model_copy(update={"min_votes": 3, "output": tmp_path / "unanimous"})
    result = run_verify(unanimous, GuardSettings(test_sets=[], workers=1), seed=0, progress=False)
    assert (result.manifest["v_accepted"] == "false").all()
    assert result.manifest["v_rejected_by"].str.contains("unrecognised").all()
    assert not any(result.recognised.values())
    report = json.loads((tmp_path / "unanimous" / "verify_report.json").read_text())
    assert "do not recognise fear on validation" in report["no_accepted_because"]["fear"]


def small_verify(data, reference, voters, output, **changes) -> VerifySettings:
    """Verify settings for the tiny voters: a low tau, small batches, no worker processes."""
    values = dict(min_probability=0.3, batch_size=16, workers=0, kid_subset_size=4)
    return VerifySettings(
        data=data, reference=reference, output=output, voters=voters, **{**values, **changes}
    )


def test_verify_relabel_mode_takes_the_majority(voters, synthetic, tmp_path):
    reference, paths = voters
    rows, images = synthetic
    data = write_dataset(tmp_path / "synthetic", rows, images)
    settings = small_verify(data, reference, paths, tmp_path / "relabelled", mode="relabel")
    frame = run_verify(
        settings, GuardSettings(test_sets=[], workers=1), seed=0, progress=False
    ).manifest.set_index("id")
    assert (frame.loc[[f"lost{i}" for i in range(4)], "label"] == "happy").all()
    assert (frame.loc[[f"good{i}" for i in range(6)], "label"] == "fear").all()
    assert (frame["v_intended"] == "fear").all()
    assert (frame["v_accepted"] == "true").all()


def test_new_identities_are_labelled_by_the_vote_and_expansions_keep_theirs(voters, synthetic, tmp_path):
    reference, paths = voters
    rows, images = synthetic
    rows = [{**row, "gen_kind": "expand"} for row in rows]
    for i in range(3):  # prompted as fear, drawn happy: the vote decides
        rows.append(
            {
                "id": f"face{i}",
                "label": "fear",
                "split": "train",
                "origin": "synthetic",
                "gen_kind": "identity",
            }
        )
        images.append(colour_image(HAPPY, 700 + i))
    data = write_dataset(tmp_path / "synthetic", rows, images)
    frame = run_verify(
        small_verify(data, reference, paths, tmp_path / "verified"),
        GuardSettings(test_sets=[], workers=1),
        seed=0,
        progress=False,
    ).manifest.set_index("id")
    faces = frame.loc[[f"face{i}" for i in range(3)]]
    assert (faces["label"] == "happy").all() and (faces["v_intended"] == "fear").all()
    assert (faces["v_accepted"] == "true").all()
    lost = frame.loc[[f"lost{i}" for i in range(4)]]  # an expansion keeps its seed's label
    assert (lost["label"] == "fear").all() and (lost["v_accepted"] == "false").all()


def test_verify_refuses_more_required_votes_than_voters(voters, tmp_path):
    reference, paths = voters
    settings = VerifySettings(data=reference, reference=reference, voters=paths[:1], min_votes=2)
    with pytest.raises(FersynthError, match="min_votes = 2: more than the 1 voters"):
        run_verify(settings, GuardSettings(test_sets=[]), seed=0, progress=False)


@pytest.mark.slow
def test_guard_finds_the_fer2013_training_copies_of_publictest_images(fer2013_dataset, tmp_path):
    settings = GuardSettings(data=fer2013_dataset, output=tmp_path / "guarded", test_sets=[])
    result = run_guard(settings, progress=False)
    exact = result.leaks[result.leaks["kind"] == "exact"]
    assert len(exact) == 351  # Training rows that repeat a PublicTest image pixel for pixel
    assert len(exact[["test_set", "test_id"]].drop_duplicates()) == 270  # distinct images
    assert set(exact["split"]) <= {"train", "val"}  # training and validation copies both go
    # Near-duplicates (pHash within 6 bits) come on top; every removed row is listed.
    near = result.leaks[result.leaks["kind"] == "perceptual"]
    assert (near["distance"] <= settings.max_distance).all()
    kept = read_manifest(tmp_path / "guarded").manifest
    assert len(kept) == 28_709 + 3_589 - len(result.leaks)
