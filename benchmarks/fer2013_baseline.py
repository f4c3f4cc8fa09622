"""FER2013 baselines: ResNet-18 at 48 px from scratch, supervised and MEK, on two CPU cores.

Ingests ../shared/datasets/fer2013/fer2013.csv.gz (once, cached under benchmarks/.cache),
trains on Training minus a stratified 5% validation slice, evaluates on PublicTest with
horizontal-flip test-time augmentation, and writes benchmarks/results/fer2013_baseline.json.

    .venv/bin/python benchmarks/fer2013_baseline.py                 # sl and mek
    .venv/bin/python benchmarks/fer2013_baseline.py --methods sl    # one of them
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fersynth.evaluate import run_evaluate
from fersynth.ingest import run_ingest
from fersynth.settings import EvaluateSettings, IngestSettings, TrainSettings
from fersynth.train.loop import run_train, validation_curve

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets" / "fer2013" / "fer2013.csv.gz"
CACHE = HERE / ".cache"
RESULTS = HERE / "results" / "fer2013_baseline.json"

# One place for the benchmark's recipe (see the README's table).
RECIPE = dict(
    arch="resnet18",
    image_size=48,
    batch_size=128,  # channels_last at batch 128 is 1.8x faster per image than batch 64 here
    lr=2e-3,
    weight_decay=0.05,
    warmup_steps=100,
    workers=1,
    in_memory="always",  # decoded once, whole batches augmented (the per-image path: 1.6 ms/image)
    log_every=100,
    eval_every=250,  # the validation curve shows whether more images would still help
    checkpoint_every=500,
)
STEPS = {"sl": 1400, "mek": 750}  # about 25 minutes each on two cores (MEK: two views a step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["sl", "mek"], choices=["sl", "mek"])
    parser.add_argument("--steps", type=int, help="override the steps of every method")
    parser.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    args = parser.parse_args()
    if not SHARED.is_file():
        print(f"FER2013 not found at {SHARED}; this benchmark needs ../shared", file=sys.stderr)
        return 2

    dataset = CACHE / "fer2013"
    if not (dataset / "manifest.csv").is_file():
        run_ingest(
            IngestSettings(source="fer2013", input=SHARED, output=dataset, val_fraction=0.05), force=True
        )
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for method in args.methods:
        name = f"{method}_balanced" if args.balanced else method
        steps = args.steps or STEPS[method]
        settings = TrainSettings(
            data=dataset,
            output=CACHE / "runs" / name,
            method=method,
            steps=steps,
            balanced_sampler=args.balanced,
            **RECIPE,
        )
        started = time.perf_counter()
        trained = run_train(settings, force=True)
        minutes = (time.perf_counter() - started) / 60
        evaluated = run_evaluate(
            EvaluateSettings(model=settings.output, data=[dataset], output=CACHE / "eval" / name, workers=1)
        )[0]
        m = evaluated.metrics
        train_threads = settings.cpu_threads or torch.get_num_threads()  # as run_train pinned them
        results[name] = {
            "method": method,
            "balanced_sampler": args.balanced,
            "steps": steps,
            "train_minutes": round(minutes, 1),
            "train_images_per_s": round(trained.images_per_second, 1),
            "test": "PublicTest (3589 images), flip TTA",
            "accuracy": round(m["accuracy"] * 100, 2),
            "mean_accuracy": round(m["mean_accuracy"] * 100, 2),
            "per_class_accuracy": {k: round(v * 100, 2) for k, v in m["per_class_accuracy"].items()},
            "best_step": trained.best_step,
            "val_curve": validation_curve(settings.output, settings.batch_size),
            "recipe": RECIPE,
            "train_images": sum(m["train_counts"].values()),
            "machine": f"{platform.machine()}, {train_threads} torch threads",
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results[name], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
