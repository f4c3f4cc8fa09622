from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import colour_dataset, tiny_train_settings

from fersynth.classes import CLASSES
from fersynth.demo import RAFDB_TRAIN_COUNTS
from fersynth.errors import FersynthError
from fersynth.settings import load_settings
from fersynth.train.loop import effective_rates, run_train
from fersynth.train.losses import (
    attention_consistency,
    mek_class_weights,
    rebalanced_targets,
    soft_cross_entropy,
)
from fersynth.train.models import ModelSpec, class_activation_maps, create_model


def test_class_weights_match_mek_on_rafdb_counts():
    weights = mek_class_weights([RAFDB_TRAIN_COUNTS[name] for name in CLASSES])
    expected = torch.tensor([0.9512, 4.3669, 1.7114, 0.2571, 0.6191, 1.7406, 0.4862])
    assert torch.allclose(weights, expected, atol=1e-4)


def test_an_empty_class_gets_weight_zero_and_no_data_is_refused():
    weights = mek_class_weights([10, 0, 5, 5, 5, 5, 5])
    assert weights[1] == 0 and torch.allclose(weights[0], torch.tensor(35 / 100))  # N = 35
    targets = rebalanced_targets(torch.tensor([0]), weights, eps=0.3)
    assert targets[0, 1] == 0 and torch.isclose(targets.sum(), torch.tensor(1.0))
    with pytest.raises(FersynthError, match="no training images"):
        mek_class_weights([0] * 7)


def test_a_single_class_training_set_smooths_evenly_instead_of_nan():
    # A synthetic-only set whose vote accepted one class (it happened in make run's demo).
    weights = mek_class_weights([19, 0, 0, 0, 0, 0, 0])
    targets = rebalanced_targets(torch.tensor([0, 0]), weights, eps=0.3)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets.sum(dim=1), torch.ones(2))
    assert torch.allclose(targets[:, 0], torch.full((2,), 0.7))
    assert torch.allclose(targets[:, 1:], torch.full((2, 6), 0.05))


def test_rebalanced_targets_sum_to_one_with_true_class_at_0_7():
    weights = mek_class_weights([RAFDB_TRAIN_COUNTS[name] for name in CLASSES])
    labels = torch.tensor([0, 1, 3, 6])
    targets = rebalanced_targets(labels, weights, eps=0.3)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert torch.allclose(targets[torch.arange(4), labels], torch.full((4,), 0.7))
    # Off-label mass follows the weights: fear (rare) gets more than happy (frequent).
    row = targets[0]
    assert row[1] > row[3]
    others = weights.clone()
    others[0] = 0
    assert torch.allclose(row[1:], 0.3 * others[1:] / others.sum(), atol=1e-6)


def test_soft_cross_entropy_equals_plain_ce_for_one_hot_targets():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 2, 4, 6, 1])
    one_hot = torch.nn.functional.one_hot(labels, 7).float()
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(soft_cross_entropy(logits, one_hot), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "size", "extra"),
    [("resnet18", 64, {}), ("swin_tiny_patch4_window7_224", 128, {"window_size": 4})],
)
def test_cam_spatial_mean_plus_bias_equals_logits(arch, size, extra):
    torch.manual_seed(0)
    spec = ModelSpec(
        arch=arch,
        image_size=size,
        resize=size,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        window_size=extra.get("window_size"),
    )
    model = create_model(spec).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        maps = class_activation_maps(model, features)
        logits = model(x)
    bias = model.get_classifier().bias
    assert maps.shape[:2] == (2, 7) and maps.shape[2] == maps.shape[3]
    assert torch.allclose(maps.mean(dim=(2, 3)) + bias, logits, atol=1e-4)


def test_attention_consistency_zero_for_mirrored_maps_positive_otherwise():
    torch.manual_seed(0)
    weights = torch.rand(7) + 0.1
    maps = torch.randn(4, 7, 7, 7)
    # The flipped view's maps are exactly the mirror of the original's: consistent.
    assert attention_consistency(maps, maps.flip(dims=(3,)), weights).item() == 0.0
    # Maps that do not mirror each other are penalised.
    assert attention_consistency(maps, torch.randn(4, 7, 7, 7), weights).item() > 0.1
    # A map that is itself left-right symmetric needs no flip back; an asymmetric one does.
    symmetric = torch.cat([maps[..., :3], maps[..., 3:4], maps[..., :3].flip(dims=(3,))], dim=3)
    assert attention_consistency(symmetric, symmetric, weights).item() < 1e-12
    assert attention_consistency(maps, maps, weights).item() > 0.1


def test_attention_consistency_on_model_maps_of_an_image_and_its_mirror():
    """Through a real backbone: a random image and its mirror give a positive term, and the
    term is exactly zero when the flipped view's maps are the mirrored originals."""
    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet18", image_size=64, resize=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = create_model(spec).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = class_activation_maps(model, model.forward_features(torch.cat([image, image.flip(dims=(3,))])))
    weights = torch.ones(7)
    assert attention_consistency(maps[:2], maps[2:], weights).item() > 0
    assert attention_consistency(maps[:2], maps[:2].flip(dims=(3,)), weights).item() == 0.0


def test_attention_consistency_weights_classes():
    maps = torch.zeros(1, 7, 2, 2)
    maps[0, 1, :, 0] = 1.0  # class 1 differs from its mirror
    flipped = torch.zeros(1, 7, 2, 2)
    weights = torch.ones(7)
    base = attention_consistency(maps, flipped, weights)
    weights[1] = 3.0
    assert torch.isclose(attention_consistency(maps, flipped, weights), 3 * base)
    assert torch.isclose(base, torch.tensor(0.5))


OFFICIAL = {"lr_scale_batch": 512, "warmup_steps": 1}  # the official scaling, a 1-step warm-up


@pytest.mark.parametrize("method", ["mek", "sl"])
def test_mek_rates_scale_by_batch_over_512_and_sl_rates_do_not(tmp_path, method):
    """A real run: MEK's optimiser runs at lr 5e-4 * 32 / 512 = 3.125e-5 (the official code's
    rate), saved in train_summary.json; an SL run with the same settings keeps train.*."""
    data = colour_dataset(tmp_path / "data", per_class=5, test_per_class=1)
    settings = tiny_train_settings(
        data,
        tmp_path / method,
        method=method,
        batch_size=32,
        steps=2,
        lr=5e-4,
        warmup_lr=5e-7,
        min_lr=5e-6,
        warmup_steps=5,
        log_every=2,
        eval_every=2,
        checkpoint_every=2,
        mek=OFFICIAL,
    )
    run_train(settings, progress=False)
    rates = json.loads((tmp_path / method / "train_summary.json").read_text())["effective_lr"]
    logged = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    step2 = next(r for r in logged if r.get("step") == 2 and "lr" in r)
    if method == "mek":
        assert rates == pytest.approx(
            {"lr": 3.125e-05, "warmup_lr": 3.125e-08, "min_lr": 3.125e-07, "warmup_steps": 1}
        )
        assert step2["lr"] == pytest.approx(3.125e-05)  # past its 1-step warm-up: the peak
    else:
        assert rates == {"lr": 5e-4, "warmup_lr": 5e-7, "min_lr": 5e-6, "warmup_steps": 5}
        assert step2["lr"] == pytest.approx(5e-7 + (5e-4 - 5e-7) / 5)  # 1 of 5 warm-up steps


def test_rates_are_as_given_unless_set_and_the_thesis_profile_follows_the_official_code():
    mek = tiny_train_settings(Path("d"), Path("o"), method="mek")
    assert effective_rates(mek) == {
        "lr": mek.lr,
        "warmup_lr": mek.warmup_lr,
        "min_lr": mek.min_lr,
        "warmup_steps": 2,
    }
    thesis = load_settings(Path(__file__).resolve().parents[1] / "profiles" / "rafdb-thesis.yaml").train
    assert thesis.mek.lr_scale_batch == 512 and thesis.mek.warmup_steps == 2000
    assert effective_rates(thesis.model_copy(update={"method": "mek"})) == pytest.approx(
        {"lr": 3.125e-05, "warmup_lr": 3.125e-08, "min_lr": 3.125e-07, "warmup_steps": 2000}
    )
    assert effective_rates(thesis)["lr"] == 5e-4  # the profile's SL rows: the thesis' rate
