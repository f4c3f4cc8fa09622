"""Generation sized to the need (fersynth.generate.sizing) on hand-computed cases, and the grid's
copy twins and cross-fitting folds in the settings."""

from __future__ import annotations

import pandas as pd
import pytest

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.folds import fold_folder, fold_models, fold_of
from fersynth.generate.sizing import needed_per_class, plan_generation
from fersynth.settings import GenerateSettings, load_settings

# FER2013's training counts (DESIGN.md): happy / disgust = 16.5.
FER2013 = dict(angry=3995, disgust=436, fear=4097, happy=7215, sad=4830, surprise=3171, neutral=4965)


def test_need_is_the_largest_ask_of_the_grids_variants():
    needed = needed_per_class(["rho"], FER2013, 2.0)
    # rho 2 on happy 7215: every class up to ceil(7215 / 2) = 3608; only disgust and surprise are below.
    assert needed == {**dict.fromkeys(CLASSES, 0), "disgust": 3608 - 436, "surprise": 3608 - 3171}
    balanced = needed_per_class(["rho", "balanced"], FER2013, 2.0)
    assert balanced["disgust"] == 7215 - 436 and balanced["happy"] == 0
    for variant in ("expanded", "original", "identities"):  # no count asked
        assert needed_per_class([variant], FER2013, 2.0) == dict.fromkeys(CLASSES, 0)


def test_outputs_are_the_need_over_the_acceptance_and_k_rises_where_seeds_are_short():
    settings = GenerateSettings(variants=["rho"], rho=2.0, acceptance={"disgust": 0.8}, max_k=20)
    plans = plan_generation(settings, FER2013)
    disgust, surprise, happy = plans["disgust"], plans["surprise"], plans["happy"]
    # disgust: 3172 / 0.8 = 3965 outputs; 436 seed images at K=5 give 2180, so K = ceil(3965 / 436) = 10.
    assert (disgust.needed, disgust.outputs, disgust.seeds, disgust.k) == (3172, 3965, 436, 10)
    # surprise: 437 / 0.5 = 874 outputs: ceil(874 / 5) = 175 seed images at K=5.
    assert (surprise.outputs, surprise.seeds, surprise.k) == (874, 175, 5)
    assert happy.seeds == 0 and happy.generated == 0  # nothing needed
    capped = plan_generation(settings.model_copy(update={"max_k": 8, "max_per_class": 3000}), FER2013)
    assert (capped["disgust"].outputs, capped["disgust"].k) == (3000, 7)  # ceil(3000 / 436) = 7 <= 8
    assert plan_generation(settings.model_copy(update={"max_k": 6}), FER2013)["disgust"].k == 6
    fixed = plan_generation(
        settings.model_copy(update={"sizing": "fixed", "max_seeds_per_class": 100}), FER2013
    )
    assert all((p.seeds, p.k) == (100, 5) for p in fixed.values())
    # A variant that takes the whole pool gets the fixed size at least, not divided by acceptance.
    whole = plan_generation(
        settings.model_copy(update={"variants": ["rho", "expanded"], "max_seeds_per_class": 100}), FER2013
    )
    assert (whole["happy"].outputs, whole["happy"].seeds, whole["happy"].k) == (500, 100, 5)
    assert whole["disgust"].outputs == 3965  # the rho need is larger
    with pytest.raises(ValueError, match="max_k = 3: below k = 5"):
        GenerateSettings(max_k=3)


def test_the_settings_derive_the_need_and_the_copy_twins_from_the_grid(tmp_path):
    settings = load_settings("profiles/demo.yaml")
    assert (
        settings.generate.variants
        == settings.experiment.grid.variants() + settings.experiment.grid.twin_variants()
    )
    assert settings.generate.rho == settings.augment.rho and settings.generate.copy_twins is True
    twins = settings.experiment.grid.twins()
    assert twins == {
        "expanded_sl": "expanded_sl_copies",
        "expanded_sl_balanced": "expanded_sl_balanced_copies",
    }
    assert settings.layout.augmented("rho", "copies").name == "copies_rho"
    assert settings.report.twins == [
        ("Expanded_SL", "Expanded_SL_copies"),
        ("Expanded_SL_balanced", "Expanded_SL_balanced_copies"),
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"method": "mek", "variant": "rho", "twin_of": "expanded_sl"}, "differs from its row"),
        ({"method": "sl", "variant": "balanced", "twin_of": "expanded_sl"}, "differs from its row"),
        ({"method": "sl", "variant": "rho", "twin_of": "nothing"}, "no row on synthetic data"),
        ({"method": "sl", "variant": "rho", "twin_of": "twin"}, "itself"),
    ],
)
def test_a_copy_twin_differs_from_its_row_in_the_generator_only(row, message):
    overrides = [
        'experiment.grid.synthetic={"expanded_sl": {"method": "sl", "variant": "rho"}, '
        f'"twin": {{"method": "sl", "variant": "rho", "twin_of": "expanded_sl"}}, "bad": {row!r}}}'.replace(
            "'", '"'
        )
    ]
    with pytest.raises(FersynthError, match=message):
        load_settings(None, overrides)


def test_folds_keep_copies_of_an_image_together_and_do_not_depend_on_order():
    frame = pd.DataFrame(
        {"id": [f"i{n}" for n in range(200)], "pixel_hash": [f"h{n % 150}" for n in range(200)]}
    )
    folds = fold_of(frame, 2)
    assert set(folds) == {0, 1} and 60 < (folds == 0).sum() < 140  # both folds hold a fair share
    by_hash = pd.Series(folds).groupby(frame["pixel_hash"]).nunique()
    assert (by_hash == 1).all()  # duplicates (same pixels, other ids) share their fold
    shuffled = frame.sample(frac=1.0, random_state=3)
    assert (fold_of(shuffled, 2) == folds[shuffled.index]).all()
    with pytest.raises(ValueError, match="at least 1"):
        fold_of(frame, 0)
    with pytest.raises(FersynthError, match="voter_folds"):
        load_settings(None, ["experiment.voter_folds=1"])


def test_fold_models_finds_the_fold_folders(tmp_path):
    for fold in (1, 0):
        (tmp_path / "voter" / fold_folder(fold)).mkdir(parents=True)
    (tmp_path / "voter" / "fold_x").mkdir()
    assert fold_models(tmp_path / "voter") == {
        0: tmp_path / "voter" / "fold_0",
        1: tmp_path / "voter" / "fold_1",
    }
    assert fold_models(tmp_path / "plain") == {}


def test_a_grid_that_needs_nothing_says_so_in_one_line(tmp_path):
    from fersynth.generate import select_seeds
    from helpers import make_demo_dataset

    data = make_demo_dataset(tmp_path, train_size=21, test_size=7)
    settings = GenerateSettings(data=data, variants=["original"], rho=2.0)
    with pytest.raises(FersynthError, match="no class needs synthetic images.*sizing: fixed"):
        select_seeds(settings, 2048)
    assert not select_seeds(settings.model_copy(update={"sizing": "fixed"}), 2048).empty


def test_a_voter_never_judges_an_image_seeded_from_its_own_training_data():
    """The fold a voter model leaves out in training (train.fold, fersynth.folds) is the fold
    verify assigns to every image generated from a seed in it (verify.crossfit.image_folds)."""
    import numpy as np

    from fersynth.verify.crossfit import image_folds

    reference = pd.DataFrame(
        {
            "id": [f"r{n}" for n in range(60)],
            "pixel_hash": [f"h{n % 45}" for n in range(60)],  # 15 duplicated images
            "split": "train",
        }
    )
    folds = 2
    trained_without = {f: set(reference["id"][fold_of(reference, folds) == f]) for f in range(folds)}
    synthetic_seeds = pd.Series([f"r{n}" for n in range(60)] * 2)
    assigned = image_folds(synthetic_seeds, np.ones(len(synthetic_seeds), bool), reference, folds)
    for seed, fold in zip(synthetic_seeds, assigned, strict=True):
        assert seed in trained_without[fold]  # its fold's models never trained on its seed
        twin = reference.loc[reference["id"] == seed, "pixel_hash"].iloc[0]
        duplicates = set(reference.loc[reference["pixel_hash"] == twin, "id"])
        assert duplicates <= trained_without[fold]  # nor on a duplicate of it
