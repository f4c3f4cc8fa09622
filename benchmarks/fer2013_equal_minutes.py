"""The fer2013 profile's Original_SL row against a plain timm loop, for the same wall-clock minutes.

Both train on the profile's training split (data/fer2013/guarded: Training minus copies of
PublicTest images and minus the validation split) on the same two CPU cores, one after the
other, and are tested on PublicTest with horizontal-flip test-time augmentation.

- the row: `fersynth train` with profiles/fer2013.yaml's settings for `original_sl` (its first
  seed), timed from start to the saved model (decoding, validation and checkpoints included);
- the plain loop: about 40 lines of timm and torch (ResNet-18 at 48 px, in_chans as the data,
  AdamW, random crop from 4 px of padding and horizontal flip, batch 64, a cosine learning rate
  over its time budget), given exactly the row's seconds, its own decoding included, and
  tested with its last weights. Its validation curve (every 30 s, clock paused) sits beside
  the row's, so the two recipes' curves can be read at equal images and equal minutes;
- the same model in both loops: `fersynth train` for 150 steps on the plain loop's ResNet-18,
  batch 64, one channel, its images/s against the plain loop's.

Needs the profile's data: `make run PARAMS=profiles/fer2013.yaml`, or only
`dvc repro guard in_domain_test_set` with that profile active. Writes
benchmarks/results/fer2013_equal_minutes.json.

    .venv/bin/python benchmarks/fer2013_equal_minutes.py
    .venv/bin/python benchmarks/fer2013_equal_minutes.py --steps 200   # a shorter row (and loop)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F

from fersynth.classes import CLASS_INDEX, CLASSES
from fersynth.dataset import load_image, read_manifest
from fersynth.evaluate import compute_metrics, run_evaluate
from fersynth.settings import load_settings
from fersynth.stages import row_settings
from fersynth.train.loop import run_train, validation_curve

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "fer2013.yaml"
CACHE = ROOT / "benchmarks" / ".cache" / "equal_minutes"
RESULTS = ROOT / "benchmarks" / "results" / "fer2013_equal_minutes.json"
ROW = "original_sl"
PLAIN = dict(arch="resnet18", image_size=48, batch_size=64, lr=1e-3, weight_decay=0.05, pad=4)


def _grey(root: Path, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images as N x 1 x H x W uint8 and their class indices."""
    # FER2013 is grey (R = G = B): the mean of the channels is the grey image.
    images = np.stack([load_image(root / p).mean(axis=2).round().astype(np.uint8) for p in frame["path"]])
    labels = np.array([CLASS_INDEX[v] for v in frame["label"]])
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def _predict(model, x: torch.Tensor, mean, std, flip: bool) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for chunk in torch.split(x, 256):
            chunk = ((chunk.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            p = model(chunk).softmax(1)
            if flip:
                p = (p + model(chunk.flip(dims=(3,))).softmax(1)) / 2
            out.append(p)
    model.train()
    return torch.cat(out).argmax(1).numpy()


def plain_loop(data: Path, test: Path, seconds: float, seed: int) -> dict:
    """The reference: a plain timm loop trained for `seconds` of wall-clock time in all."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    dataset = read_manifest(data)
    train = dataset.manifest[dataset.manifest["split"] == "train"]
    val = dataset.manifest[dataset.manifest["split"] == "val"]
    x_train, y_train = _grey(dataset.root, train)
    x_val, y_val = _grey(dataset.root, val)
    mean, std = x_train.float().mean() / 255, x_train.float().std() / 255
    model = timm.create_model(PLAIN["arch"], num_classes=len(CLASSES), in_chans=1)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PLAIN["lr"], weight_decay=PLAIN["weight_decay"])
    size, pad, batch = PLAIN["image_size"], PLAIN["pad"], PLAIN["batch_size"]
    padded = F.pad(x_train, (pad, pad, pad, pad))
    steps, images, train_time, paused, curve = 0, 0, 0.0, 0.0, []
    next_check = 30.0
    model.train()
    while (elapsed := time.perf_counter() - started - paused) < seconds:
        if elapsed >= next_check:  # the validation curve, off the clock
            check = time.perf_counter()
            metrics = compute_metrics(y_val.numpy(), _predict(model, x_val, mean, std, flip=False))
            curve.append({"seconds": round(elapsed), "images_seen": images, **_val(metrics)})
            paused += time.perf_counter() - check
            next_check += 30.0
        for group in optimizer.param_groups:  # cosine over the time budget
            group["lr"] = PLAIN["lr"] * 0.5 * (1 + math.cos(math.pi * min(elapsed / seconds, 1.0)))
        step_start = time.perf_counter()
        rows = torch.randint(0, len(x_train), (batch,))
        dy, dx = torch.randint(0, 2 * pad + 1, (2, batch, 1)) + torch.arange(size)  # a crop per image
        x = padded[rows[:, None, None], 0, dy[:, :, None], dx[:, None, :]].unsqueeze(1).float() / 255
        flip = torch.rand(batch) < 0.5
        x[flip] = x[flip].flip(dims=(3,))
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y_train[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps, images = steps + 1, images + batch
        train_time += time.perf_counter() - step_start
    metrics = compute_metrics(y_val.numpy(), _predict(model, x_val, mean, std, flip=False))
    curve.append({"seconds": round(seconds), "images_seen": images, **_val(metrics)})
    test_set = read_manifest(test)
    x_test, y_test = _grey(test_set.root, test_set.manifest)
    metrics = compute_metrics(y_test.numpy(), _predict(model, x_test, mean, std, flip=True))
    return {
        "recipe": PLAIN,
        "seconds": round(seconds, 1),  # decoding and training, as the row's; testing after it
        "train_seconds": round(train_time, 1),
        "steps": steps,
        "images_seen": images,
        "images_per_s": round(images / train_time, 1),
        **_scores(metrics),
        "val_curve": curve,
    }


def _val(metrics: dict) -> dict:
    return {
        "val_accuracy": round(metrics["accuracy"] * 100, 2),
        "val_mean_accuracy": round(metrics["mean_accuracy"] * 100, 2),
    }


def _scores(metrics: dict) -> dict:
    return {
        "accuracy": round(metrics["accuracy"] * 100, 2),
        "mean_accuracy": round(metrics["mean_accuracy"] * 100, 2),
        "per_class_accuracy": {k: round(v * 100, 2) for k, v in metrics["per_class_accuracy"].items()},
    }


def same_model_speed(row, seed: int, plain_images_per_s: float, steps: int) -> dict:
    """`fersynth train` on the plain loop's own model and batch (ResNet-18, 48 px, one channel,
    batch 64) for a few steps: images/s of its training windows (the first, warm-up, left out)
    against the plain loop's, so the loops are compared on one model."""
    train = row.train.model_copy(
        update={
            "arch": PLAIN["arch"],
            "batch_size": PLAIN["batch_size"],
            "in_chans": 1,
            "steps": steps,
            "log_every": 25,
            "eval_every": steps,
            "checkpoint_every": steps,
            "output": CACHE / "same_model",
        }
    )
    run_train(train, seed=seed, force=True, progress=False)
    windows = [json.loads(x) for x in (CACHE / "same_model" / "train_speed.jsonl").read_text().splitlines()]
    speeds = [w["images_per_s"] for w in windows[1:]]
    fersynth = round(sum(speeds) / len(speeds), 1)
    return {
        "recipe": {"arch": PLAIN["arch"], "batch_size": PLAIN["batch_size"], "in_chans": 1, "steps": steps},
        "fersynth_train_images_per_s": fersynth,
        "plain_loop_images_per_s": plain_images_per_s,
        "ratio": round(fersynth / plain_images_per_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, help="train the row this many steps (default: the profile's)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the profile's paths are relative to the project root
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    settings = load_settings(PROFILE, overrides)
    data = Path(settings.train.data)
    test = settings.layout.test_set(settings.experiment.in_domain)
    if not (data / "manifest.csv").is_file() or not (test / "manifest.csv").is_file():
        print(
            f"{data} or {test} is missing: run `make run PARAMS=profiles/fer2013.yaml` "
            "(or `dvc repro guard in_domain_test_set` with that profile active) first",
            file=sys.stderr,
        )
        return 2
    seed = settings.seeds[0]
    row = row_settings(settings, ROW, output=CACHE / ROW)
    started = time.perf_counter()
    trained = run_train(row.train, seed=seed, force=True)
    row_seconds = time.perf_counter() - started
    evaluate = row.evaluate.model_copy(
        update={"model": CACHE / ROW, "data": [test], "output": CACHE / "eval"}
    )
    metrics = run_evaluate(evaluate)[0].metrics
    train = row.train
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {train.cpu_threads} torch threads",
        "test": f"PublicTest ({metrics['images']} images), flip TTA",
        "row": {
            "profile": str(PROFILE.relative_to(ROOT)),
            "row": ROW,
            "recipe": {
                k: getattr(train, k)
                for k in ("arch", "in_chans", "image_size", "batch_size", "steps", "lr", "warmup_steps")
            },
            "seconds": round(row_seconds, 1),
            "steps": trained.steps,
            "best_step": trained.best_step,
            "images_seen": trained.steps * train.batch_size,
            "images_per_s": round(trained.images_per_second, 1),
            **_scores(metrics),
            "val_curve": validation_curve(CACHE / ROW, train.batch_size),
        },
    }
    torch.set_num_threads(train.cpu_threads or torch.get_num_threads())
    result["plain_loop"] = plain_loop(data, test, row_seconds, seed)
    speed_steps = 150 if not args.steps else max(50, min(150, args.steps))
    plain_speed = result["plain_loop"]["images_per_s"]
    result["same_model_speed"] = same_model_speed(row, seed, plain_speed, speed_steps)
    result["row_minus_plain"] = {
        k: round(result["row"][k] - result["plain_loop"][k], 2) for k in ("accuracy", "mean_accuracy")
    }
    result["measured"] = time.strftime("%Y-%m-%d", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
