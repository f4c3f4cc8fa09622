"""Voting, the test-leakage guard, fidelity, on voters with known behaviour."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tests.helpers import colour_dataset, colour_image, markdown_rows, tiny_train_settings, write_dataset

from fersynth.classes import CLASSES
from fersynth.dataset import read_manifest
from fersynth.demo import draw_face
from fersynth.errors import FersynthError
from fersynth.folds import fold_of
from fersynth.settings import GuardSettings, VerifySettings
from fersynth.train.loop import run_train
from fersynth.train.models import MODEL_FILE, load_model
from fersynth.verify import run_guard, run_verify
from fersynth.verify.crossfit import image_folds, voter_folds
from fersynth.verify.fidelity import extract_features
from fersynth.verify.leakage import nearest, perceptual_hash
from fersynth.verify.voting import (
    calibrated_thresholds,
    decide,
    majority,
    near_copy_threshold,
    nearest_neighbour_distances,
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


def test_near_copy_threshold_is_a_percentile_of_nearest_neighbour_distances():
    # 1-D features 0, 1, 3, 7: nearest-neighbour distances 1, 1, 2, 4 (never the point itself).
    line = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert nearest_neighbour_distances(line).tolist() == pytest.approx([1.0, 1.0, 2.0, 4.0])
    # Sorted 1, 1, 2, 4 at ranks 0..3; percentile p sits at rank 3p/100, linearly interpolated.
    assert near_copy_threshold(line, 50.0) == pytest.approx(1.5)  # rank 1.5: 1 + 0.5 * (2 - 1)
    assert near_copy_threshold(line, 75.0) == pytest.approx(2.5)  # rank 2.25: 2 + 0.25 * (4 - 2)
    assert near_copy_threshold(line, 5.0) == pytest.approx(1.0)  # rank 0.15, between 1 and 1
    # 2-D: (0,0)-(3,0) 3, (3,4)-(3,0) 4, (3,0)-(0,0) 3.
    plane = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 0.0]])
    assert nearest_neighbour_distances(plane).tolist() == pytest.approx([3.0, 4.0, 3.0])
    assert near_copy_threshold(plane, 100.0) == pytest.approx(4.0)
    assert near_copy_threshold(plane, 50.0) == pytest.approx(3.0)
    assert np.isnan(near_copy_threshold(plane[:2], 50.0))  # fewer than 3 real images: no threshold
    assert nearest_neighbour_distances(np.array([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0]]))[0] == 0.0


def test_decide_rejects_near_copies_of_their_seed():
    probabilities = np.stack([one_hot([FEAR] * 4), one_hot([FEAR] * 4)])
    votes = decide(
        probabilities,
        np.array([FEAR] * 4),
        min_votes=2,
        min_probability=0.5,
        seed_distance=np.array([0.1, 0.5, np.nan, 0.1]),  # image 2 has no seed
        copy_threshold=np.array([0.2, 0.2, 0.2, np.nan]),  # image 3: no threshold (or exempt)
    )
    assert votes["v_rejected_by"].tolist() == ["near_copy", "", "", ""]
    assert votes["v_accepted"].tolist() == [False, True, True, True]
    assert votes["v_reason"][0] == "a near copy of its seed image (feature distance 0.100 < 0.200)"


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


@pytest.mark.slow  # trains voters and votes: about 35 s
def test_verify_accepts_what_the_voters_agree_on(voters, synthetic, tmp_path):
    reference, paths = voters
    rows, images = synthetic
    test_image = read_manifest(reference).split("test").iloc[0]
    rows.append({"id": "leak", "label": test_image["label"], "split": "train", "origin": "synthetic"})
    images.append(np.asarray(Image.open(reference / test_image["path"]).convert("RGB")))
    seeds = read_manifest(reference).split("train").query("label == 'fear'").head(3)
    for i, seed_row in enumerate(seeds.itertuples()):
        # Seed copies (the copy-twin control): near copies by design, never rejected as such.
        rows[i]["seed_id"], rows[i]["source"] = seed_row.id, "seed-copy"
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
    copies = pd.to_numeric(good["v_seed_distance"].iloc[:3])
    assert copies.max() == pytest.approx(0.0, abs=1e-4)  # recorded, and no reason to reject
    assert good["v_seed_distance"].iloc[3:].isna().all()  # no seed: no distance
    # The written dataset keeps every verified row with its votes, images linked.
    written = read_manifest(tmp_path / "verified").manifest
    assert len(written) == 10 and (written["v_accepted"] == "true").sum() == 6
    assert all((tmp_path / "verified" / p).is_file() for p in written["path"])
    fear = result.fidelity.loc["fear"]
    # The generator's images only: the three copy twins (the control) are left out of its counts.
    assert fear["generated"] == 7 and fear["accepted"] == 3
    assert fear["acceptance_rate"] == pytest.approx(3 / 7)
    assert np.isfinite(fear["frechet_distance"]) and fear["frechet_distance"] >= 0
    assert np.isfinite(fear["diversity_synthetic"]) and fear["diversity_synthetic"] > 0
    # good0-2 copy their seed image (copy twins, not described); the others have no seed.
    assert np.isnan(fear["seed_distance"])
    report = json.loads((tmp_path / "verified" / "verify_report.json").read_text())
    assert report["accepted"] == 6 and report["leaks"]["removed"] == 1
    assert report["rejected"] == 4 and report["rejected_by"]["votes"] == 4
    assert report["rejection_reasons"]["too few of 3 voters agree (need 2)"] == 4
    assert "v_rejected_by" in written.columns
    assert (tmp_path / "verified" / "verify_classes.png").is_file()
    page = (tmp_path / "verified" / "verify_report.md").read_text()
    assert "6 of 10" in page and "## What the voters recognise" in page
    assert "Not cross-fitted: every voter was trained on the whole training split" in page
    assert report["cross_fitted"] is False and len(report["folds"]) == 1
    assert report["folds"][0]["fold"] is None and report["folds"][0]["images"] == 10
    assert report["near_copy"]["exempt_images"] == 3 and report["rejected_by"]["near_copy"] == 0
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


def copy_model(source: str, folder) -> str:
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes((Path(source) / MODEL_FILE).read_bytes())
    return str(folder)


@pytest.fixture(scope="module")
def fold_voters(voters, tmp_path_factory):
    """Two cross-fitted voters of two folds: fold 0's models are the shifted voter (every class
    one on), fold 1's the good ones (voter a, voter b), so the votes show which fold voted."""
    reference, (good_a, good_b, shifted) = voters
    root = tmp_path_factory.mktemp("fold_voters")
    for name, good in (("voter_p", good_a), ("voter_q", good_b)):
        copy_model(shifted, root / name / "fold_0")
        copy_model(good, root / name / "fold_1")
    return reference, [str(root / "voter_p"), str(root / "voter_q")]


def test_cross_fitted_images_are_voted_only_by_their_seeds_fold_models(fold_voters, tmp_path):
    reference, paths = fold_voters
    train = read_manifest(reference).split("train")
    fear = train[train["label"] == "fear"].reset_index(drop=True)
    fold = fold_of(fear, 2)
    assert {0, 1} <= set(fold.tolist()), "the fear seeds fall in both folds"
    rows, images = [], []
    for i, seed_row in enumerate(fear.itertuples()):  # a new fear-coloured image per seed
        rows.append({"id": f"img{i}", "label": "fear", "split": "train", "origin": "synthetic"})
        rows[-1].update(seed_id=seed_row.id, gen_kind="expand")
        images.append(colour_image(FEAR, 800 + i))
    for i in range(2):  # new identities: no seed, so fold 0's models vote (and label) them
        rows.append({"id": f"face{i}", "label": "happy", "split": "train", "origin": "synthetic"})
        rows[-1]["gen_kind"] = "identity"
        images.append(colour_image(HAPPY, 900 + i))
    data = write_dataset(tmp_path / "synthetic", rows, images)
    settings = small_verify(data, reference, paths, tmp_path / "verified", min_votes=2)
    result = run_verify(settings, GuardSettings(test_sets=[], workers=1), seed=0, progress=False)
    frame = result.manifest.set_index("id")
    seeded = frame.loc[[f"img{i}" for i in range(len(fear))]]
    assert seeded["v_fold"].astype(int).tolist() == fold.tolist()  # each image in its seed's fold
    in_0, in_1 = seeded[fold == 0], seeded[fold == 1]
    # Fold 0's (shifted) models alone vote on fold 0's images; fold 1's (good) ones on fold 1's.
    assert (in_0["v_votes"] == "disgust,disgust").all() and (in_1["v_votes"] == "fear,fear").all()
    assert (in_1["v_accepted"] == "true").all() and (in_0["v_accepted"] == "false").all()
    # Fold 0's models recall nothing on validation: its images are unverifiable; fold 1's not.
    assert in_0["v_rejected_by"].str.contains("unrecognised").all()
    assert not in_1["v_rejected_by"].str.contains("unrecognised").any()
    faces = frame.loc[["face0", "face1"]]
    assert (faces["v_fold"].astype(int) == 0).all() and (faces["v_votes"] == "sad,sad").all()
    assert (faces["label"] == "sad").all()  # relabelled by fold 0's models' majority
    assert result.cross_fitted and [g.fold for g in result.folds] == [0, 1]

    report = json.loads((tmp_path / "verified" / "verify_report.json").read_text())
    assert report["cross_fitted"] is True
    folds = {entry["fold"]: entry for entry in report["folds"]}
    assert folds[0]["models"] == {
        "voter_p / fold_0": f"{paths[0]}/fold_0",
        "voter_q / fold_0": f"{paths[1]}/fold_0",
    }
    assert folds[1]["models"]["voter_q / fold_1"] == f"{paths[1]}/fold_1"
    assert folds[0]["images"] == int((fold == 0).sum()) + 2 and folds[0]["images_without_seed"] == 2
    assert folds[1]["images"] == int((fold == 1).sum()) and folds[1]["images_without_seed"] == 0
    assert folds[0]["recognised"]["fear"] is False and folds[1]["recognised"]["fear"] is True
    assert report["recognised"]["fear"] is False  # recognised only when every fold does
    assert report["voter_recall"]["voter_p / fold_0"]["fear"] == 0.0
    assert report["voter_recall"]["voter_p / fold_1"]["fear"] == 100.0
    low = min(folds[f]["probability_thresholds"]["fear"] for f in (0, 1))
    assert report["probability_thresholds"]["fear"] == low
    page = (tmp_path / "verified" / "verify_report.md").read_text()
    assert "Cross-fitted over 2 folds" in page and "fold 0's models vote on them" in page
    assert any(row[0] == "voter_q / fold_1" for row in markdown_rows(page))
    assert any(row[0] == "fold_1" and row[2] == str(folds[1]["images"]) for row in markdown_rows(page))


def test_cross_fitted_and_plain_voters_do_not_mix(tmp_path):
    for name, folds in (("p", [0, 1]), ("q", [0, 1]), ("r", []), ("s", [0]), ("t", [0, 2])):
        (tmp_path / name).mkdir()
        for fold in folds:
            (tmp_path / name / f"fold_{fold}").mkdir()
    p, q, r, s, t = (str(tmp_path / name) for name in "pqrst")
    assert voter_folds([p, q]) == {0: [f"{p}/fold_0", f"{q}/fold_0"], 1: [f"{p}/fold_1", f"{q}/fold_1"]}
    assert voter_folds([r]) == {None: [r]}
    settings = VerifySettings(data=tmp_path, reference=tmp_path, voters=[p, r], min_votes=1)
    with pytest.raises(FersynthError, match="mixed with plain ones") as error:
        run_verify(settings, GuardSettings(test_sets=[]), seed=0, progress=False)
    assert "\n" not in str(error.value) and p in str(error.value) and r in str(error.value)
    with pytest.raises(FersynthError, match=f"different folds .*{s}: fold_0\\)"):
        voter_folds([p, s])
    with pytest.raises(FersynthError, match="expected fold_0 to fold_1"):
        voter_folds([t])


def test_an_images_fold_is_its_seeds_fold(tmp_path):
    reference = pd.DataFrame({"id": ["a", "b", "c"], "pixel_hash": ["h1", "h2", "h1"]})
    folds = fold_of(reference, 3)
    assert folds[0] == folds[2]  # pixel copies share a fold
    seed_ids = pd.Series(["b", "c", "", "zz"])
    has_seed = np.array([True, True, False, False])
    assert image_folds(seed_ids, has_seed, reference, 3).tolist() == [folds[1], folds[2], 0, 0]


def test_near_copies_of_the_seed_are_rejected_unless_seed_copies(voters, tmp_path):
    reference, paths = voters
    fear = read_manifest(reference).split("train").query("label == 'fear'")
    seed_row = fear.iloc[0]
    seed_pixels = np.asarray(Image.open(reference / seed_row["path"]).convert("RGB"))
    base = {"label": "fear", "split": "train", "origin": "synthetic", "seed_id": seed_row["id"]}
    rows = [
        {**base, "id": "copy"},  # its seed, unchanged: a near copy
        {**base, "id": "twin", "source": "seed-copy"},  # the same, from the null generator
        {**base, "id": "other"},  # another fear face: a new image of the class
        {**base, "id": "face", "seed_id": "", "gen_kind": "identity"},  # no seed
    ]
    images = [seed_pixels, seed_pixels.copy(), colour_image(FEAR, 950), colour_image(FEAR, 951)]
    data = write_dataset(tmp_path / "synthetic", rows, images)
    settings = small_verify(data, reference, paths[:2], tmp_path / "verified", min_votes=2)
    result = run_verify(settings, GuardSettings(test_sets=[], workers=1), seed=0, progress=False)
    frame = result.manifest.set_index("id")
    assert frame.at["copy", "v_rejected_by"] == "near_copy"
    assert frame.at["copy", "v_reason"].startswith("a near copy of its seed image (feature distance 0.000 <")
    assert frame.at["twin", "v_accepted"] == "true" and frame.at["twin", "v_rejected_by"] == ""
    assert float(frame.at["twin", "v_seed_distance"]) == pytest.approx(0.0, abs=1e-4)
    assert frame.at["other", "v_accepted"] == "true" and float(frame.at["other", "v_seed_distance"]) > 0
    assert frame.at["face", "v_accepted"] == "true" and pd.isna(frame.at["face", "v_seed_distance"])
    # The fear threshold: the 5th percentile of the real fear training images' nearest-neighbour
    # distances on the first voter's features (all 12 sampled: fewer than 500).
    model = load_model(paths[0], "cpu")
    real = extract_features(model, reference, fear, device="cpu", batch_size=16, workers=0)
    expected = near_copy_threshold(real, 5.0)
    report = json.loads((tmp_path / "verified" / "verify_report.json").read_text())
    assert report["folds"][0]["near_copy_thresholds"]["fear"] == pytest.approx(expected, abs=1e-4)
    assert expected > float(frame.at["copy", "v_seed_distance"])
    assert expected < float(frame.at["other", "v_seed_distance"])
    assert report["rejected_by"]["near_copy"] == 1 and report["near_copy"]["exempt_images"] == 1
    label = (
        "a near copy of its seed image "
        "(closer than the 5th percentile of real nearest-neighbour distances in its class)"
    )
    assert report["rejection_reasons"] == {label: 1}
    assert report["rejected_by_class"]["fear"][label] == 1
    page = (tmp_path / "verified" / "verify_report.md").read_text()
    assert "rejected as a near copy when its distance to its own seed image" in page


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
