"""The same code, settings and CPU kind give the same bytes: two separate processes that differ
in PYTHONHASHSEED (the order of every set and str-keyed hash) and in the thread count the
environment asks for (OMP_NUM_THREADS, what a machine with fewer cores gets) run the same
seeded stages and must write identical files (docs/testing.md#reproducibility)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# One process runs the whole chain through the CLI's entry point, as `fersynth ...` would.
CHAIN = """
import json, sys
from fersynth.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(f"fersynth {' '.join(argv)} failed")
"""

TRAIN = {
    "train.arch": "resnet10t",
    "train.image_size": 32,
    "train.batch_size": 16,
    "train.steps": 6,
    "train.warmup_steps": 2,
    "train.eval_every": 3,
    "train.checkpoint_every": 3,
    "train.log_every": 2,
    "train.workers": 0,
    "train.balanced_sampler": "true",  # the row that differed between two machines
}
PRIOR = {
    "prior.data": "data/demo/ingested",
    "prior.image_size": 32,
    "prior.channels": "[8, 16]",
    "prior.steps": 4,
    "prior.batch_size": 8,
    "prior.workers": 0,
}
GENERATE = {
    "generate.data": "data/demo/ingested",
    "generate.k": 2,
    "generate.guide_model": "runs/balanced",
    "generate.prior": "runs/demo/prior",
    "generate.device": "cpu",
    "generate.classes": "[fear, disgust]",
    "generate.max_seeds_per_class": 2,
}
NOT_REPRODUCIBLE = {"train_speed.jsonl"}  # wall-clock speed (left out of DVC's hashes too)


def _overrides(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={value}")]


def _run_chain(folder: Path, hash_seed: str, omp_threads: str) -> Path:
    commands = [
        ["-S", "demo.train_size=70", "-S", "demo.test_size=14", "-S", "demo.image_size=48", "demo-data"],
        ["ingest", "--quiet"],  # ingest.workers 0: a process pool over every core
        [*_overrides(TRAIN), "train", "--data", "data/demo/ingested", "--output", "runs/balanced", "--quiet"],
        [*_overrides(PRIOR), "train-prior", "--quiet"],
        [*_overrides(GENERATE), "generate", "--quiet"],
    ]
    folder.mkdir()
    env = {
        **os.environ,
        "PYTHONHASHSEED": hash_seed,
        "OMP_NUM_THREADS": omp_threads,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-c", CHAIN, json.dumps(commands)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def _files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in NOT_REPRODUCIBLE
    }


def _tensor_difference(a: Path, b: Path) -> str:
    """Where two model files differ, for the failure message."""
    first = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
    second = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
    worst = max(
        ((first[k].double() - second[k].double()).abs().max().item(), k)
        for k in first
        if first[k].is_floating_point()
    )
    return f"largest weight difference {worst[0]:.3g} in {worst[1]}"


def test_seeded_stages_write_the_same_bytes_whatever_the_hash_seed_and_core_count(tmp_path):
    one = _run_chain(tmp_path / "one", hash_seed="1", omp_threads="1")
    two = _run_chain(tmp_path / "two", hash_seed="2", omp_threads="2")
    files_one, files_two = _files(one), _files(two)
    assert files_one.keys() == files_two.keys()
    for part in (
        "data/demo/ingested/manifest.csv",
        "runs/balanced/model.pt",
        "runs/demo/prior/vae/diffusion_pytorch_model.safetensors",
    ):
        assert part in files_one, f"{part}: not written; the chain no longer covers this stage"
    assert any(name.startswith("data/demo/generated/shards/") and name.endswith(".png") for name in files_one)

    different = [name for name in files_one if files_one[name].read_bytes() != files_two[name].read_bytes()]
    details = [
        f"{name}: {_tensor_difference(files_one[name], files_two[name])}"
        for name in different
        if name.endswith("model.pt")
    ]
    assert not different, f"{len(different)} of {len(files_one)} files differ: {different[:10]} {details}"

    # The thread count the run used is the setting's (train.cpu_threads), not the environment's.
    summary = json.loads((one / "runs" / "balanced" / "train_summary.json").read_text())
    assert summary["cpu_threads"] == 2
    recorded = json.loads((one / "runs" / "balanced" / "settings.json").read_text())
    assert recorded["train"]["cpu_threads"] == 2
