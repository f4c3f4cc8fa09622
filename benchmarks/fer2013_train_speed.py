"""`fersynth train`'s images/s on the fer2013 profile's Original_SL row, on this machine's CPU:
the figure issue 32 asks to hold while the GPU path changes ("the CPU path must not get
slower"). Compare two versions of the code by running this script with each on the import
path, alternately, on an otherwise idle machine:

    .venv/bin/python benchmarks/fer2013_train_speed.py --label after
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/fer2013_train_speed.py --label before
    # /tmp/old: git worktree add /tmp/old <commit>

Each run trains the row's first seed for `--steps` steps (the profile's model, batch, threads
and data; log windows of 25 steps, the first left out as warm-up) into a scratch folder and
appends its record (label, the imported code's git commit, the windows' images/s, their mean,
wall-clock seconds) to benchmarks/results/fer2013_train_speed.json. Needs the profile's
training split: `make run PARAMS=profiles/fer2013.yaml`, or `dvc repro guard` with that profile
active.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fersynth
from fersynth.settings import load_settings
from fersynth.stages import row_settings
from fersynth.train.loop import SPEED_FILE, run_train

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "fer2013.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "fer2013_train_speed.json"
ROW = "original_sl"
WINDOW = 25


def code_commit() -> str:
    """The git commit of the fersynth package that this process imported, `-dirty` where the
    package's own files have local edits (this script's results file is not the code)."""
    source = Path(fersynth.__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--", ".") else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--label", required=True, help="what this run measures, e.g. before / after")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the profile's paths are relative to the project root
    settings = load_settings(PROFILE)
    data = Path(settings.train.data)
    if not (data / "manifest.csv").is_file():
        print(f"{data} is missing: run `make run PARAMS=profiles/fer2013.yaml` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        row = row_settings(settings, ROW, output=Path(scratch) / ROW)
        train = row.train.model_copy(
            update={
                "steps": args.steps,
                "log_every": WINDOW,
                "eval_every": args.steps,
                "checkpoint_every": args.steps,
            }
        )
        started = time.perf_counter()
        run_train(train, seed=settings.seeds[0], force=True, progress=False)
        seconds = time.perf_counter() - started
        # Read here, not through a newer helper: the script also runs the code from before.
        lines = (Path(scratch) / ROW / SPEED_FILE).read_text().splitlines()
        # The settings as run (their "auto" values resolved, where the code has any).
        ran = json.loads((Path(scratch) / ROW / "settings.json").read_text())["train"]
    windows = [json.loads(line)["images_per_s"] for line in lines if line]
    record = {
        "label": args.label,
        "code": code_commit(),
        "row": ROW,
        "recipe": {k: ran[k] for k in ("arch", "in_chans", "image_size", "batch_size", "cpu_threads")},
        "steps": args.steps,
        "windows_images_per_s": windows,
        "images_per_s": round(sum(windows[1:]) / len(windows[1:]), 1),
        "seconds": round(seconds, 1),
        "machine": f"{os.cpu_count()} cores",
    }
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps({"runs": [*runs, record]}, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("label", "code", "images_per_s", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
