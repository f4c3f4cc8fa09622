from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.train.checkpoint import BEST_WEIGHTS, CHECKPOINT
from fersynth.train.data import InMemoryBatches, SampleStream, use_in_memory
from fersynth.train.loop import run_train, split_validation
from fersynth.train.models import ModelSpec, create_model, load_model
from helpers import colour_dataset, make_demo_dataset, tiny_train_settings


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    return make_demo_dataset(root, train_size=140, test_size=42)


tiny = tiny_train_settings


def test_sample_stream_resumes_mid_epoch_and_balances():
    labels = np.array([0] * 90 + [1] * 10)
    full = SampleStream(labels, seed=3)
    first = [item for _, item in zip(range(250), iter(full), strict=False)]
    resumed = [item for _, item in zip(range(130), iter(SampleStream(labels, 3, start=120)), strict=False)]
    assert resumed == first[120:250]
    assert sorted(i for i, _ in first[:100]) == list(range(100))  # an epoch is a permutation
    balanced = SampleStream(labels, seed=3, balanced=True)
    drawn = [labels[i] for _, (i, _pos) in zip(range(4000), iter(balanced), strict=False)]
    assert 0.45 < np.mean(drawn) < 0.55  # the 10% class drawn half of the time


def _in_memory_batches(rotation: float, hflip: bool, seed: int = 5) -> InMemoryBatches:
    batches = InMemoryBatches.__new__(InMemoryBatches)
    batches.pixels = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    batches.image_size, batches.hflip, batches.rotation, batches.seed = 8, hflip, rotation, seed
    batches.mean, batches.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    return batches


def test_in_memory_augmentation_is_an_exact_crop_and_flip_without_rotation():
    batches = _in_memory_batches(rotation=0.0, hflip=True)
    images = batches.pixels.float() / 255
    out = batches.augment(batches.pixels, torch.Generator().manual_seed(1))
    for image, result in zip(images, out, strict=True):
        crops = [image[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        plain = any(torch.allclose(result, crop, atol=1e-5) for crop in crops)
        mirrored = any(torch.allclose(result, crop.flip(dims=(2,)), atol=1e-5) for crop in crops)
        assert plain or mirrored
    again = batches.augment(batches.pixels, torch.Generator().manual_seed(1))
    assert torch.equal(out, again), "the same generator seed must give the same batch"


def test_in_memory_rotation_turns_the_image_and_fills_corners_with_black():
    batches = _in_memory_batches(rotation=40.0, hflip=False)
    batches.pixels = torch.full((4, 3, 12, 12), 200, dtype=torch.uint8)
    out = batches.augment(batches.pixels, torch.Generator().manual_seed(3)) * 255
    centre = out[:, :, 3:5, 3:5]
    assert torch.allclose(centre, torch.full_like(centre, 200.0), atol=1e-3)
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners < 199).any(), "a turn of up to 40 degrees must bring in the black fill somewhere"


def test_in_memory_auto_follows_the_decoded_size():
    assert use_in_memory("auto", 28_709, 55)  # FER2013 at 48 px: 260 MB
    assert not use_in_memory("auto", 300_000, 256)  # AffectNet at 224 px: 59 GB
    assert use_in_memory("always", 300_000, 256) and not use_in_memory("never", 10, 16)


def test_validation_split_is_stratified_seeded_and_keeps_copies_together(demo_dataset):
    from fersynth.dataset import read_manifest
    from fersynth.splits import draw_validation

    frame = read_manifest(demo_dataset).manifest
    frame = frame[frame["split"] != "val"].copy()
    copy = frame[frame["split"] == "train"].iloc[0].copy()
    copy["id"], copy["label"] = "copy_of_first", "happy"  # exact copy under another label
    frame = pd.concat([frame, copy.to_frame().T], ignore_index=True)
    drawn = draw_validation(frame, 0.1, seed=1)
    shuffled = frame.sample(frac=1, random_state=3)  # the manifest's row order does not matter
    assert set(drawn) == set(draw_validation(shuffled, 0.1, seed=1))
    assert list(drawn) != list(draw_validation(frame, 0.1, seed=2))
    val = frame.loc[drawn]
    train = frame[(frame["split"] == "train") & ~frame.index.isin(drawn)]
    assert set(val["split"]) == {"train"}  # taken from training, never from test
    assert set(val["label"]) == set(train["label"]) == set(CLASSES)
    for name in CLASSES:  # about 10% of every class
        n = int((frame[frame["split"] == "train"]["label"] == name).sum())
        assert abs(int((val["label"] == name).sum()) - round(n * 0.1)) <= 2
    assert not set(val["pixel_hash"]) & set(train["pixel_hash"])  # copies go together
    synthetic = frame.assign(origin="synthetic")
    assert draw_validation(synthetic, 0.1, seed=1).empty  # synthetic rows never validate


def test_validation_never_empties_a_class_nor_splits_copies():
    from fersynth.splits import draw_validation

    rows = [dict(id=f"d{i}", label="disgust", pixel_hash="same") for i in range(5)]  # one image, 5 rows
    rows += [dict(id=f"h{i}", label="happy", pixel_hash="g8" if i < 8 else f"x{i}") for i in range(10)]
    rows += [dict(id="f0", label="fear", pixel_hash="c"), dict(id="f1", label="fear", pixel_hash="f1")]
    rows += [dict(id="s0", label="surprise", pixel_hash="c")]  # a copy of f0 under another label
    frame = pd.DataFrame(rows).assign(split="train", origin="real")
    for seed in range(5):
        val = set(frame.loc[draw_validation(frame, 0.1, seed), "id"])
        assert not val & {f"d{i}" for i in range(5)}  # all copies of one image: stays in training
        assert not val & {f"h{i}" for i in range(8)}  # a group larger than the class' share
        assert len(val & {"h8", "h9"}) == 1 and "f1" in val
        assert not val & {"f0", "s0"}  # copies under two labels stay in training


def test_training_refuses_a_synthetic_validation_image(demo_dataset):
    from fersynth.dataset import read_manifest

    frame = read_manifest(demo_dataset).manifest.copy()
    train, val = split_validation(frame)
    assert len(val) > 0 and set(val["origin"]) <= {"real", "enhanced"}
    frame.loc[val.index[0], "origin"] = "synthetic"
    with pytest.raises(FersynthError, match="validation must be real images only"):
        split_validation(frame)


@pytest.mark.parametrize("method", ["sl", "mek"])
def test_tiny_resnet_run_writes_a_usable_model(demo_dataset, tmp_path, method):
    result = run_train(tiny(demo_dataset, tmp_path / method, method=method), progress=False)
    assert result.steps == 6 and result.best_metrics is not None
    summary = json.loads((tmp_path / method / "train_summary.json").read_text())
    assert summary["method"] == method and summary["val_images"] > 0
    records = [json.loads(x) for x in (tmp_path / method / "train_log.jsonl").read_text().split("\n") if x]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) for r in losses)
    speeds = [json.loads(x) for x in (tmp_path / method / "train_speed.jsonl").read_text().split("\n") if x]
    assert [r["step"] for r in speeds] == [2, 4, 6] and all(r["images_per_s"] > 0 for r in speeds)
    assert "images_per_s" not in (tmp_path / method / "train_log.jsonl").read_text()  # kept out of DVC hashes
    if method == "mek":
        assert all("loss_rac" in r and r["loss_rac"] >= 0 for r in losses)
        assert len(summary["mek_class_weights"]) == 7
    loaded = load_model(tmp_path / method)
    assert loaded.spec.train_counts == summary["train_counts"]
    assert loaded.extra["method"] == method
    saved = json.loads((tmp_path / method / "settings.json").read_text())
    assert saved["train"]["method"] == method and saved["seed"] == 2048


@pytest.mark.parametrize("method", ["sl", "mek"])
def test_tiny_swin_run_nhwc_features(demo_dataset, tmp_path, method):
    settings = tiny(
        demo_dataset,
        tmp_path / "swin",
        arch="swin_tiny_patch4_window7_224",
        image_size=64,
        window_size=2,
        batch_size=4,
        steps=2,
        eval_every=2,
        checkpoint_every=2,
        log_every=1,
        method=method,
    )
    result = run_train(settings, progress=False)
    assert result.steps == 2
    loaded = load_model(tmp_path / "swin")
    assert loaded.spec.window_size == 2 and loaded.model.output_fmt == "NHWC"


def test_learning_rate_schedule_warms_up_then_decays(demo_dataset, tmp_path):
    settings = tiny(
        demo_dataset,
        tmp_path / "lr",
        steps=10,
        log_every=1,
        warmup_steps=3,
        warmup_lr=5e-7,
        min_lr=5e-6,
        lr=1e-3,
        eval_every=10,
        checkpoint_every=10,
    )
    run_train(settings, progress=False)
    lrs = [
        json.loads(x)["lr"]
        for x in (tmp_path / "lr" / "train_log.jsonl").read_text().split("\n")
        if x and "lr" in json.loads(x)
    ]
    assert lrs[0] < 1e-3 / 2  # still warming up at step 1
    assert max(lrs) == pytest.approx(1e-3, rel=0.05)
    assert lrs[-1] < lrs[4] and lrs[-1] >= 5e-6 * 0.999


def test_existing_run_needs_resume_or_force(demo_dataset, tmp_path):
    run_train(tiny(demo_dataset, tmp_path / "r", steps=3), progress=False)
    with pytest.raises(FersynthError, match="--resume"):
        run_train(tiny(demo_dataset, tmp_path / "r", steps=3), progress=False)
    assert run_train(tiny(demo_dataset, tmp_path / "r", steps=3), force=True, progress=False).steps == 3


def _cli_train(output: Path, data: Path, *extra: str, in_memory: str = "auto") -> list[str]:
    overrides = [
        f"in_memory={in_memory}",
        "arch=resnet18",
        "image_size=32",
        "batch_size=8",
        "steps=40",
        "warmup_steps=2",
        "workers=0",
        "log_every=5",
        "eval_every=10",
        "checkpoint_every=4",
        "lr=1e-3",
    ]
    args = [sys.executable, "-m", "fersynth.cli"]
    for item in overrides:
        args += ["-S", f"train.{item}"]
    return [*args, "train", "--data", str(data), "--output", str(output), "--quiet", *extra]


@pytest.mark.slow  # kills a real training process and resumes it: about 27 s each
@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_killed_and_resumed_run_ends_with_identical_weights(demo_dataset, tmp_path, in_memory):
    straight = tmp_path / "straight"
    subprocess.run(
        _cli_train(straight, demo_dataset, in_memory=in_memory), check=True, capture_output=True, timeout=600
    )

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _cli_train(killed, demo_dataset, in_memory=in_memory),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / CHECKPOINT, weights_only=True)["step"]
    assert 0 < interrupted_at < 40, "the run must be killed part-way for this test to mean anything"

    subprocess.run(
        _cli_train(killed, demo_dataset, "--resume", in_memory=in_memory),
        check=True,
        capture_output=True,
        timeout=600,
    )
    a = torch.load(straight / CHECKPOINT, weights_only=True)
    b = torch.load(killed / CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == 40
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["best_step"] == b["best_step"]
    assert (straight / "model.pt").exists() and (killed / "model.pt").exists()


def test_pretrained_backbone_from_a_local_file(tmp_path):
    spec = ModelSpec(arch="resnet18", image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(1)
    source = create_model(spec)
    state = {k: v for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet head: must be dropped, not loaded
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "backbone.pth")
    torch.manual_seed(2)
    model = create_model(spec, pretrained=str(tmp_path / "backbone.pth"))
    assert torch.equal(model.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    assert model.get_classifier().out_features == 7
    with pytest.raises(FersynthError, match="not found"):
        create_model(spec, pretrained=str(tmp_path / "absent.pth"))
    with pytest.raises(FersynthError, match="not a timm model"):
        create_model(ModelSpec("resnet_nonexistent", 32, 37, (0.5,) * 3, (0.5,) * 3))


def test_timm_full_names_with_a_pretrained_tag_are_models():
    spec = ModelSpec(arch="resnet18.a1_in1k", image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = create_model(spec)
    assert type(model).__name__ == "ResNet" and model.get_classifier().out_features == 7
    with pytest.raises(FersynthError, match="'resnet18x.a1_in1k': not a timm model name"):
        create_model(ModelSpec("resnet18x.a1_in1k", 32, 37, (0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize(
    ("source_arch", "message"),
    [
        # Same names, other shapes: torch's 78-line size-mismatch list, cut to the first tensor.
        (
            "resnet50",
            "tensor layer1.0.conv1.weight is [64, 64, 1, 1] in the file, [64, 64, 3, 3] in the model",
        ),
        # More blocks: timm would load the common ones and warn about the rest.
        ("resnet34", "the file's tensor layer1.2.conv1.weight is not in the model"),
        # Nothing in common: timm would start from random weights with a warning.
        ("vit_tiny_patch16_224", "the file has no tensor conv1.weight"),
    ],
)
def test_weights_of_another_architecture_are_one_line_naming_file_and_tensor(tmp_path, source_arch, message):
    import timm

    torch.save(timm.create_model(source_arch, num_classes=1000).state_dict(), tmp_path / "other.pth")
    spec = ModelSpec(arch="resnet18", image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(FersynthError) as refused:
        create_model(spec, pretrained=str(tmp_path / "other.pth"))
    text = str(refused.value)
    assert text.startswith(f"{tmp_path / 'other.pth'}: weights do not fit resnet18 (") and message in text
    assert "\n" not in text and len(text) < 300


def test_a_model_file_whose_weights_do_not_fit_its_spec_is_one_line(demo_dataset, tmp_path):
    run_train(tiny(demo_dataset, tmp_path / "run", steps=1, eval_every=1, checkpoint_every=1), progress=False)
    payload = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    payload["state_dict"]["fc.weight"] = torch.zeros(9, 512)
    torch.save(payload, tmp_path / "bent.pt")
    with pytest.raises(
        FersynthError, match=r"bent.pt: weights do not fit resnet18 \(tensor fc.weight is \[9, 512\]"
    ):
        load_model(tmp_path / "bent.pt")


def test_pretrained_backbone_and_model_file_from_s3(s3_env, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("FERSYNTH_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(arch="resnet18", image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(3)
    source = create_model(spec)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    client = boto3.client("s3")
    client.create_bucket(Bucket="weights")
    client.upload_file(str(tmp_path / "backbone.pth"), "weights", "resnet18/backbone.pth")
    model = create_model(spec, pretrained="s3://weights/resnet18/backbone.pth")
    assert torch.equal(
        model.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"]
    )
    with pytest.raises(FersynthError, match="s3://weights/absent.pth: download from http://127.0.0.1"):
        create_model(spec, pretrained="s3://weights/absent.pth")


@pytest.mark.parametrize("arch", ["resnet18", "resnet10t"])
def test_one_channel_model_takes_grey_rgb_tensors_on_every_path(arch):
    """in_chans=1: one-channel stem; 3-channel tensors (evaluate, predict, the guide, the vote)
    are averaged to one channel by the stem's pre-hook, through forward and forward_features."""
    spec = ModelSpec(arch=arch, image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=1)
    torch.manual_seed(4)
    model = create_model(spec).eval()
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert first_conv.weight.shape[1] == 1
    rgb = torch.randn(2, 3, 32, 32)
    one = rgb.mean(dim=1, keepdim=True)
    with torch.no_grad():
        assert torch.allclose(model(rgb), model(one), atol=1e-5)
        features = model.forward_features(rgb)
        assert torch.allclose(model.forward_head(features), model(one), atol=1e-5)
        assert not torch.allclose(model(rgb), model(rgb[:, :1].repeat(1, 3, 1, 1)), atol=1e-3)


def test_one_channel_refused_where_the_first_layer_does_not_take_the_image():
    # TResNet's first convolution comes after a space-to-depth step (16 channels for one).
    spec = ModelSpec(arch="tresnet_m", image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=1)
    with pytest.raises(FersynthError, match="in_chans=1 needs a first convolution"):
        create_model(spec)


def test_one_channel_model_pickles_with_its_hook(tmp_path):
    import pickle

    spec = ModelSpec(arch="resnet10t", image_size=32, resize=37, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=1)
    model = create_model(spec).eval()
    copy = pickle.loads(pickle.dumps(model))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x.mean(dim=1, keepdim=True)), atol=1e-5)


def test_one_channel_run_saves_and_reloads_a_grey_model(demo_dataset, tmp_path):
    result = run_train(tiny(demo_dataset, tmp_path / "grey", in_chans=1), progress=False)
    assert result.steps == 6
    loaded = load_model(tmp_path / "grey")
    assert loaded.spec.in_chans == 1 and loaded.model.conv1.weight.shape[1] == 1
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():  # the reloaded model carries the hook again: 3-channel input works
        assert torch.allclose(loaded.model(x), loaded.model(x.mean(dim=1, keepdim=True)), atol=1e-5)


def test_a_resumed_run_logs_each_step_once(demo_dataset, tmp_path):
    """A run killed after its checkpoint at step 3 but after logging steps 4 and 5 (and half a
    line of step 6) logs steps 1..6 once each when resumed."""
    output = tmp_path / "run"
    settings = dict(log_every=1, eval_every=3, checkpoint_every=3)
    run_train(tiny(demo_dataset, output, steps=3, **settings), progress=False)
    assert torch.load(output / CHECKPOINT, weights_only=True)["step"] == 3
    with (output / "train_log.jsonl").open("a") as log_file:
        log_file.write('{"step": 4, "loss": 99.0, "lr": 0.001}\n{"step": 5, "loss": 99.0, "lr": 0.001}\n')
        log_file.write('{"step": 6, "lo')  # killed mid-write
    with (output / "train_speed.jsonl").open("a") as speed_file:
        speed_file.write('{"step": 4, "images_per_s": 1.0}\n{"step": 5, "images_per_s": 1.0}\n')

    run_train(tiny(demo_dataset, output, steps=6, **settings), resume=True, progress=False)

    records = [json.loads(x) for x in (output / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_accuracy" in r] == [3, 6]
    assert all(r["loss"] != 99.0 for r in records if "loss" in r)  # the killed run's lines are gone
    speeds = [json.loads(x) for x in (output / "train_speed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in speeds] == [1, 2, 3, 4, 5, 6]
    assert all(r["images_per_s"] != 1.0 for r in speeds)


def test_model_file_holds_the_best_validation_steps_weights_not_the_last(tmp_path, monkeypatch):
    """Validation after each of 4 steps, its score peaking at step 2: model.pt holds the weights
    the model had at step 2, as the validation saw them, not step 4's (checkpoint.pt).
    The run is real; only the score is scripted, so that the best step is surely not the last."""
    import fersynth.train.loop as loop

    seen: list[dict[str, torch.Tensor]] = []  # the weights at each validation, in order
    real_predict, real_metrics = loop.predict_probabilities, loop.compute_metrics

    def predict(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_predict(model, *args, **kwargs)

    scores = iter([0.2, 0.9, 0.5, 0.3])

    def metrics(y_true, y_pred):
        score = next(scores)
        return {**real_metrics(y_true, y_pred), "accuracy": score, "mean_accuracy": score}

    monkeypatch.setattr(loop, "predict_probabilities", predict)
    monkeypatch.setattr(loop, "compute_metrics", metrics)
    data = colour_dataset(tmp_path / "data", per_class=3, test_per_class=0, val_per_class=1)
    output = tmp_path / "run"
    settings = tiny(data, output, steps=4, eval_every=1, checkpoint_every=4, log_every=1)
    result = run_train(settings, progress=False)

    assert len(seen) == 4 and result.best_step == 2
    logged = [json.loads(x) for x in (output / "train_log.jsonl").read_text().splitlines() if x]
    curve = [(r["step"], r["val_mean_accuracy"]) for r in logged if "val_mean_accuracy" in r]
    assert curve == [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.3)]
    assert json.loads((output / "train_summary.json").read_text())["best_step"] == 2
    kept = load_model(output).model.state_dict()
    last = torch.load(output / CHECKPOINT, weights_only=True)
    assert last["step"] == 4 and last["best_step"] == 2
    assert torch.load(output / BEST_WEIGHTS, weights_only=True)["step"] == 2
    assert kept.keys() == seen[1].keys()
    for name, tensor in kept.items():
        assert torch.equal(tensor, seen[1][name]), name  # step 2's weights, exactly
    assert torch.equal(seen[3]["fc.weight"], last["model"]["fc.weight"])  # what step 4 validated
    changed = [name for name in kept if not torch.equal(kept[name], last["model"][name])]
    assert "fc.weight" in changed and "conv1.weight" in changed  # not the last step's weights


def _lrs(output: Path) -> dict[int, float]:
    return {
        r["step"]: r["lr"]
        for r in map(json.loads, (output / "train_log.jsonl").read_text().splitlines())
        if "lr" in r
    }


def test_resume_applies_a_lowered_lr_and_longer_schedule_and_records_it(demo_dataset, tmp_path, caplog):
    """The advice after a divergence ("lower train.lr") works on --resume: the new rates and
    step count drive the schedule from the checkpoint on, the log says so, settings.json keeps it."""
    output = tmp_path / "run"
    cadence = dict(log_every=1, eval_every=3, checkpoint_every=3, warmup_steps=0)
    run_train(tiny(demo_dataset, output, steps=3, lr=1e-2, **cadence), progress=False)
    assert _lrs(output)[3] > 1e-3
    with caplog.at_level("WARNING"):
        result = run_train(
            tiny(demo_dataset, output, steps=9, lr=1e-4, **cadence), resume=True, progress=False
        )
    assert result.steps == 9
    lrs = _lrs(output)
    assert all(5e-6 * 0.99 <= lrs[step] <= 1e-4 * 1.0001 for step in range(4, 10)), lrs
    assert lrs[4] == pytest.approx(
        1e-4 * (1 + np.cos(np.pi * 3 / 9)) / 2 + 5e-6 * (1 - np.cos(np.pi * 3 / 9)) / 2, rel=0.02
    )
    assert "train.lr 0.01 -> 0.0001" in caplog.text and "train.steps 3 -> 9" in caplog.text
    saved = json.loads((output / "settings.json").read_text())
    assert saved["train"]["lr"] == 1e-4
    assert saved["resumed_with_changes"] == [{"step": 3, "train.lr": [0.01, 0.0001], "train.steps": [3, 9]}]


@pytest.mark.parametrize(
    ("change", "key", "values"),
    [
        ({"batch_size": 16}, "train.batch_size", "16, but the run was started with 8"),
        ({"arch": "resnet10t"}, "train.arch", '"resnet10t", but the run was started with "resnet18"'),
        ({"balanced_sampler": True}, "train.balanced_sampler", "true, but the run was started with false"),
    ],
)
def test_resume_refuses_a_change_that_makes_another_run(demo_dataset, tmp_path, change, key, values):
    output = tmp_path / "run"
    run_train(tiny(demo_dataset, output, steps=3), progress=False)
    before = (output / CHECKPOINT).read_bytes()
    with pytest.raises(FersynthError, match=f"--resume with {key} = ") as refused:
        run_train(tiny(demo_dataset, output, steps=6, **change), resume=True, progress=False)
    assert values in str(refused.value) and "--force" in str(refused.value)
    assert (output / CHECKPOINT).read_bytes() == before  # nothing trained, nothing lost


def test_resume_refuses_fewer_steps_than_the_checkpoint_holds(demo_dataset, tmp_path):
    output = tmp_path / "run"
    run_train(tiny(demo_dataset, output, steps=6), progress=False)
    with pytest.raises(FersynthError, match="train.steps = 3, but the checkpoint is at step 6"):
        run_train(tiny(demo_dataset, output, steps=3), resume=True, progress=False)


@pytest.mark.parametrize(("first", "then"), [("fp32", "fp16"), ("fp16", "fp32")])
def test_resume_across_precision(demo_dataset, tmp_path, first, then):
    """A checkpoint saved without fp16 holds an empty GradScaler state, which torch refuses to
    load ("The source state dict is empty"); fp16 to fp32 drops the scaler's state."""
    output = tmp_path / "run"
    run_train(tiny(demo_dataset, output, steps=3, precision=first), progress=False)
    result = run_train(tiny(demo_dataset, output, steps=6, precision=then), resume=True, progress=False)
    assert result.steps == 6 and (output / "model.pt").is_file()
    assert json.loads((output / "settings.json").read_text())["resumed_with_changes"][0][
        "train.precision"
    ] == [
        first,
        then,
    ]


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_cpu(demo_dataset, tmp_path):
    """What a CUDA run leaves (its device setting, CUDA generator states in the checkpoint)
    resumes here on the CPU, with the CPU generator restored."""
    output = tmp_path / "run"
    run_train(tiny(demo_dataset, output, steps=3), progress=False)
    state = torch.load(output / CHECKPOINT, weights_only=True)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # eight GPUs' generators
    torch.save(state, output / CHECKPOINT)
    saved = json.loads((output / "settings.json").read_text())
    saved["train"]["device"] = "cuda"
    (output / "settings.json").write_text(json.dumps(saved))
    result = run_train(tiny(demo_dataset, output, steps=6, device="cpu"), resume=True, progress=False)
    assert result.steps == 6
    assert json.loads((output / "settings.json").read_text())["resumed_with_changes"][0]["train.device"] == [
        "cuda",
        "cpu",
    ]


def _limited_memory(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def test_a_batch_that_does_not_fit_in_memory_is_one_line_naming_batch_and_settings(demo_dataset, tmp_path):
    """A real CPU allocation failure (the process' address space capped a little above what
    importing torch takes), not a simulated one: one line, exit status 2, what to lower."""
    command = _cli_train(tmp_path / "run", demo_dataset)
    command[command.index("train.batch_size=8")] = "train.batch_size=4096"
    command[command.index("train.image_size=32")] = "train.image_size=96"
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limited_memory(6 * 2**30),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "fersynth: error: train: a SL batch of 4096 images at 96 px does not fit in cpu memory ("
    )
    assert "(DefaultCPUAllocator: " in line
    assert line.endswith("; lower train.batch_size (now 4096) or train.image_size (now 96)")


def test_out_of_gpu_memory_names_the_batch_too():
    """torch.OutOfMemoryError (what CUDA raises; no GPU here) gets the same one line."""
    from fersynth.memory import batch_fits

    with (
        pytest.raises(FersynthError) as failed,
        batch_fits("evaluate", "a batch of 512 images", "cuda:0", ["evaluate.batch_size (now 512)"]),
    ):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    assert str(failed.value) == (
        "evaluate: a batch of 512 images does not fit in cuda:0 memory (CUDA out of memory. Tried to "
        "allocate 2.00 GiB (GPU 0; 79.1 GiB total)); lower evaluate.batch_size (now 512)"
    )
    with pytest.raises(RuntimeError, match="shape mismatch"), batch_fits("train", "x", "cpu", []):
        raise RuntimeError("shape mismatch")  # anything else passes through unchanged
