"""GIF-SD generation throughput: Stable-Diffusion-1.5-sized components with random weights
(the same cost as the real model), 512 px, DDIM 50 steps at strength 0.1 (5 denoising steps),
guidance scale 50, K=5 outputs per seed, GIF's guided step (gradients through the VAE decoder
and a ResNet-50 FER guide), fp16 UNet. Reports images/s and peak GPU memory for several
seeds-per-batch. Where there is no GPU it runs a tiny configuration on the CPU instead and says
so. Writes benchmarks/results/generation_throughput_{gpu,cpu}.json.

    .venv/bin/python benchmarks/generation_throughput.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fersynth.generate.backends import Batch, GifSD, make_prompts
from fersynth.generate.components import build_random, sd15_sized
from fersynth.generate.guide import FerGuide
from fersynth.settings import THESIS_MEAN, THESIS_STD
from fersynth.train.models import ModelSpec, create_model, save_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LABELS = ["fear", "disgust", "sad", "angry", "surprise", "neutral", "happy", "fear"]


def make_batch(seeds, labels, index, offset: int, k: int) -> Batch:
    """A batch whose outputs get fresh random seeds for each repeat."""
    ids = [offset * 1000 + j for j in range(len(index))]
    prompts = make_prompts([labels[i] for i in index], ids, True)
    return Batch(seeds, labels, index, [torch.Generator().manual_seed(s) for s in ids], prompts)


def run(
    device: torch.device,
    components,
    size: int,
    guide_arch: str,
    guide_size: int,
    seeds_per_batch: list[int],
    k: int = 5,
    repeats: int = 2,
) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        spec = ModelSpec(guide_arch, guide_size, guide_size, THESIS_MEAN, THESIS_STD)
        save_model(Path(folder) / "model.pt", create_model(spec), spec)
        guide = FerGuide(Path(folder) / "model.pt", device)
    backend = GifSD(
        components,
        guide,
        device,
        steps=50,
        strength=0.1,
        scale=50.0,
        step_size=0.1,
        eps=0.1,
        half=device.type == "cuda",
    )
    rng = np.random.default_rng(0)
    runs = {}
    for n in seeds_per_batch:
        seeds = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
        index = [i for i in range(n) for _ in range(k)]
        labels = [LABELS[i % len(LABELS)] for i in range(n)]

        try:
            backend.generate(make_batch(seeds, labels, index, 0, k))  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for r in range(repeats):
                backend.generate(make_batch(seeds, labels, index, r + 1, k))
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            runs[f"seeds_per_batch_{n}"] = {
                "images": n * k * repeats,
                "images_per_s": round(n * k * repeats / elapsed, 3),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if device.type == "cuda"
                else None,
            }
        except torch.OutOfMemoryError:
            runs[f"seeds_per_batch_{n}"] = {"error": "out of GPU memory"}
            torch.cuda.empty_cache()
        except Exception as exc:  # report the setting that failed, measure the others
            runs[f"seeds_per_batch_{n}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(n, runs[f"seeds_per_batch_{n}"], flush=True)
    return runs


def main() -> int:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        result = {
            "device": torch.cuda.get_device_name(),
            "config": "SD-1.5-sized random weights, 512 px, "
            "DDIM 50 x strength 0.1, scale 50, K=5, fp16 UNet, gif-sd's VAE as run (bf16 on "
            "CUDA, the decoder's activations stored or recomputed by memory, seed by seed), "
            "ResNet-50 guide at 224 px",
            "runs": run(device, sd15_sized(), 512, "resnet50", 224, [1, 2, 4, 8, 16]),
        }
    else:
        result = {
            "device": "cpu (no CUDA GPU here: tiny configuration only)",
            "config": "tiny random components, 64 px, DDIM 50 x strength 0.1, scale 50, K=5, "
            "ResNet-18 guide at 32 px",
            "runs": run(torch.device("cpu"), build_random(sample_size=64), 64, "resnet18", 32, [1, 2]),
        }
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    (RESULTS_DIR / f"generation_throughput_{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
