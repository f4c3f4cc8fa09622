"""Quality-scoring throughput, and SwinIR x2 super-resolution throughput on a GPU.

Scoring: images/s of the stage's parallel scorer (every core, streaming) against a plain
one-image-at-a-time loop in one process, on the shared FER2013 images (48x48 PNG, ingested
into benchmarks/.cache by fer2013_baseline.py or here) and on 100x100 JPEGs (RAF-DB's aligned
size, drawn by the demo generator). SwinIR: random weights of the official classical x2
"M" size (same cost as the real model), 100x100 inputs, several batch sizes; skipped where
there is no GPU. Writes benchmarks/results/quality_throughput.json.

    .venv/bin/python benchmarks/quality_throughput.py [--jpegs 6000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from fersynth.dataset import read_manifest
from fersynth.demo import draw_face
from fersynth.ingest import run_ingest
from fersynth.parallel import imap, worker_count
from fersynth.quality_scores import score_file
from fersynth.settings import IngestSettings

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets" / "fer2013" / "fer2013.csv.gz"
CACHE = HERE / ".cache"
RESULTS = HERE / "results" / "quality_throughput.json"
CUTOFF = 0.25


def plain_loop(paths: list[str]) -> float:
    started = time.perf_counter()
    for path in paths:
        score_file(path, CUTOFF)
    return len(paths) / (time.perf_counter() - started)


def parallel(paths: list[str]) -> float:
    started = time.perf_counter()
    for _ in imap(score_file, paths, 0, chunksize=256, detail_cutoff=CUTOFF):
        pass
    return len(paths) / (time.perf_counter() - started)


def jpeg_folder(count: int) -> list[str]:
    folder = CACHE / "jpeg100"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            face = draw_face("happy", np.random.default_rng(i), 100)
            cv2.imwrite(str(path), cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(str(path))
    return paths


def swinir_gpu() -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA GPU on this machine"}
    from spandrel import ModelLoader
    from spandrel.architectures.SwinIR import SwinIR

    # Official classical SR x2 "M" configuration (001_classicalSR_DF2K_s64w8_SwinIR-M_x2).
    net = SwinIR(
        upscale=2,
        in_chans=3,
        img_size=64,
        window_size=8,
        img_range=1.0,
        depths=[6] * 6,
        embed_dim=180,
        num_heads=[6] * 6,
        mlp_ratio=2,
        upsampler="pixelshuffle",
        resi_connection="1conv",
    )
    model = ModelLoader().load_from_state_dict({"params": net.state_dict()}).cuda().eval()
    result = {
        "gpu": torch.cuda.get_device_name(),
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "input": "100x100",
        "runs": {},
    }
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for batch in (1, 8, 32, 64):
            x = torch.rand(batch, 3, 100, 100, device="cuda")
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                for _ in range(2):
                    model(x)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                started, repeats = time.perf_counter(), 5
                for _ in range(repeats):
                    model(x)
                torch.cuda.synchronize()
            result["runs"][f"{dtype_name}_batch{batch}"] = {
                "images_per_s": round(batch * repeats / (time.perf_counter() - started), 1),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
            print(dtype_name, batch, result["runs"][f"{dtype_name}_batch{batch}"], flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--jpegs", type=int, default=6000)
    args = parser.parse_args()
    results: dict = {"cores": worker_count(0)}
    sets = {"jpeg_100x100": jpeg_folder(args.jpegs)}
    if SHARED.is_file():
        dataset = CACHE / "fer2013"
        if not (dataset / "manifest.csv").is_file():
            run_ingest(IngestSettings(source="fer2013", input=SHARED, output=dataset), force=True)
        manifest = read_manifest(dataset).manifest
        sets["fer2013_48x48_png"] = [str(dataset / p) for p in manifest["path"]]
    else:
        results["fer2013_48x48_png"] = f"skipped: {SHARED} not found"
    for name, paths in sets.items():
        plain_loop(paths[:200])  # warm the page cache and imports
        plain = plain_loop(paths)
        fast = parallel(paths)
        results[name] = {
            "images": len(paths),
            "plain_loop_images_per_s": round(plain),
            "stage_images_per_s": round(fast),
            "ratio": round(fast / plain, 2),
        }
        print(name, results[name], flush=True)
    results["swinir_x2_gpu"] = swinir_gpu()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
