from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import colour_dataset, colour_image, tiny_train_settings, write_dataset

from fersynth.classes import CLASSES
from fersynth.dataset import read_manifest
from fersynth.demo import RAFDB_TRAIN_COUNTS
from fersynth.errors import FersynthError
from fersynth.settings import load_settings
from fersynth.train.loop import effective_rates, mek_weight_counts, run_train
from fersynth.train.losses import (
    attention_consistency,
    mek_class_weights,
    rebalanced_targets,
    soft_cross_entropy,
)
from fersynth.train.models import ModelSpec, class_activation_maps, create_model, load_model
from helpers import REPO


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


def test_attention_consistency_by_hand_on_an_asymmetric_map():
    """mean_b sum_k w_k mean_hw (CAM - flip(CAM of the flipped image))^2 on B=2, K=2, H=1, W=2."""
    maps = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]], [[[0.0, 0.0]], [[1.0, 1.0]]]])
    flipped = torch.tensor([[[[5.0, -1.0]], [[2.0, 2.0]]], [[[0.0, 0.0]], [[1.0, 1.0]]]])
    weights = torch.tensor([0.5, 3.0])
    # Image 0: flipped back, class 0 is [-1, 5] against [1, 3]: squares 4, 4, mean 4; class 1 is
    # [2, 2] against [0, 2]: squares 4, 0, mean 2; 0.5 * 4 + 3 * 2 = 8. Image 1 agrees: 0.
    assert attention_consistency(maps, flipped, weights).item() == 4.0  # (8 + 0) / 2
    # Compared without flipping back, image 0 class 0 would be [-4, 4]: 0.5 * 16 + 3 * 2 = 14.
    assert attention_consistency(maps[:1], flipped[:1].flip(dims=(3,)), weights).item() == 14.0


def test_attention_consistency_is_exactly_zero_on_a_flip_symmetric_map():
    """An image equal to its mirror has maps equal to the mirror's maps: a left-right symmetric
    map (the same for both views) costs exactly nothing, whatever the weights."""
    torch.manual_seed(0)
    half = torch.randn(3, 7, 5, 3)
    symmetric = torch.cat([half, torch.randn(3, 7, 5, 1), half.flip(dims=(3,))], dim=3)  # W = 7
    assert torch.equal(symmetric, symmetric.flip(dims=(3,)))
    assert attention_consistency(symmetric, symmetric.clone(), torch.rand(7) + 0.1).item() == 0.0
    asymmetric = torch.randn(3, 7, 5, 7)  # the same comparison on an asymmetric map is not free
    assert attention_consistency(asymmetric, asymmetric.clone(), torch.ones(7)).item() > 0.1


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
    thesis = load_settings(REPO / "profiles" / "rafdb-thesis.yaml").train
    assert thesis.mek.lr_scale_batch == 512 and thesis.mek.warmup_steps == 2000
    assert effective_rates(thesis.model_copy(update={"method": "mek"})) == pytest.approx(
        {"lr": 3.125e-05, "warmup_lr": 3.125e-08, "min_lr": 3.125e-07, "warmup_steps": 2000}
    )
    assert effective_rates(thesis)["lr"] == 5e-4  # the profile's SL rows: the thesis' rate


REAL = [3, 1, 2, 3, 2, 1, 3]  # the original training counts of the augmented-style set below
ADDED = [0, 2, 1, 0, 1, 2, 0]  # synthetic images added: every class ends at 3


def _augmented(root: Path, report: bool = True) -> Path:
    """An `expanded`-style dataset as `fersynth augment` writes it: real and synthetic training
    images, a real val split, and augment_report.json with the original counts."""
    rows, images = [], []
    for k, name in enumerate(CLASSES):
        for origin, count in (("real", REAL[k]), ("synthetic", ADDED[k])):
            for i in range(count):
                rows.append({"id": f"{origin}_{name}_{i}", "label": name, "split": "train", "origin": origin})
                images.append(colour_image(k, len(rows)))
        rows.append({"id": f"val_{name}", "label": name, "split": "val"})
        images.append(colour_image(k, 1000 + k))
    write_dataset(root, rows, images)
    if report:
        per_class = {
            name: {"original": REAL[k], "accepted pool": ADDED[k], "added": ADDED[k], "training set": 3}
            for k, name in enumerate(CLASSES)
        }
        (root / "augment_report.json").write_text(json.dumps({"variant": "expanded", "per_class": per_class}))
    return root


def _mek_run(data: Path, output: Path, **mek) -> tuple[dict, dict]:
    settings = tiny_train_settings(
        data, output, method="mek", steps=2, eval_every=2, checkpoint_every=2, mek=mek
    )
    run_train(settings, progress=False)
    return json.loads((output / "train_summary.json").read_text()), load_model(output).extra


def _rounded(counts: list[int]) -> list[float]:
    return [round(float(w), 4) for w in mek_class_weights(counts)]


def test_mek_class_weights_come_from_the_original_counts_of_an_augmented_set(tmp_path):
    """A synthetic MEK row differs from Original_MEK in its data only: its class weights come
    from augment_report.json's original counts, not from the augmented training split."""
    data = _augmented(tmp_path / "expanded")
    summary, extra = _mek_run(data, tmp_path / "original")
    assert summary["train_counts"] == dict.fromkeys(CLASSES, 3)  # what it trained on
    assert _rounded(REAL) != _rounded([3] * 7)
    for record in (summary, extra):
        assert record["mek_class_weights"] == _rounded(REAL)
        assert record["mek_class_weights_from"] == "original"
        assert record["mek_class_weight_counts_source"] == "augment_report.json"
        assert record["mek_class_weight_counts"] == dict(zip(CLASSES, REAL, strict=True))
    # `own`: the training split's counts, synthetic images included.
    summary, extra = _mek_run(data, tmp_path / "own", class_weights_from="own")
    for record in (summary, extra):
        assert record["mek_class_weights"] == _rounded([3] * 7)
        assert record["mek_class_weights_from"] == "own"
        assert record["mek_class_weight_counts_source"] == "train split"
    # A pinned set of weights wins over both.
    pinned = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    summary, _ = _mek_run(data, tmp_path / "pinned", class_weights=pinned)
    assert summary["mek_class_weights"] == pinned and summary["mek_class_weights_from"] == "pinned"


def test_original_class_weights_of_a_dataset_without_augment_report_are_its_own(tmp_path):
    data = colour_dataset(tmp_path / "data", per_class=2, test_per_class=0)
    frame = read_manifest(data).manifest  # no augment report: the dataset is the original
    counts, source = mek_weight_counts(data, frame[frame["split"] == "train"], "original")
    assert counts == [2] * 7 and source == "train split"


@pytest.mark.parametrize(
    "report",
    [None, "{not json", '{"per_class": {}}', '{"per_class": {"angry": {"original": "3"}}}'],
    ids=["missing", "not-json", "no-classes", "not-a-count"],
)
def test_a_missing_or_malformed_augment_report_is_one_line_naming_the_file(tmp_path, report):
    data = _augmented(tmp_path / "data", report=False)
    if report is not None:
        (data / "augment_report.json").write_text(report)
    output = tmp_path / "run"
    with pytest.raises(FersynthError) as error:
        _mek_run(data, output)
    message = str(error.value)
    assert message.startswith(str(data / "augment_report.json")) and "\n" not in message
    assert not output.exists()  # refused before the output folder is touched
    train = read_manifest(data).manifest.query("split == 'train'")
    assert mek_weight_counts(data, train, "own") == ([3] * 7, "train split")  # needs no report
