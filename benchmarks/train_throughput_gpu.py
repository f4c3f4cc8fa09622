"""GPU training throughput: Swin-T at 224 px, batch 128, bf16 and fp16 (grad scaler),
channels_last, with and without torch.compile; images/s and peak memory per variant.

Runs the same step as `fersynth train` (timm AdamW, autocast, gradient clipping) on random
batches already on the GPU, so it measures the model, not the input pipeline. Where no GPU is
available it says so, and writes that into benchmarks/results/train_throughput_gpu.json.

    .venv/bin/python benchmarks/train_throughput_gpu.py [--steps 30] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from fersynth.settings import THESIS_MEAN, THESIS_STD
from fersynth.train.models import ModelSpec, create_model

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput_gpu.json"


def measure(dtype: torch.dtype, compiled: bool, batch: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec("swin_tiny_patch4_window7_224", 224, 256, THESIS_MEAN, THESIS_STD)
    model = create_model(spec).cuda().to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(forward(x).float(), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": round(batch * steps / elapsed, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "warmup_s": round(warmup_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        result = {"status": "skipped: no CUDA GPU on this machine", "torch": torch.__version__}
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(result["status"])
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "input": "224 px, channels_last",
        "model": "swin_tiny_patch4_window7_224",
        "runs": {},
    }
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for compiled in (False, True):
            key = f"{name}{'+compile' if compiled else ''}"
            try:
                result["runs"][key] = measure(dtype, compiled, args.batch, args.steps, args.warmup)
            except Exception as exc:  # report the variant that failed, measure the others
                result["runs"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(key, result["runs"][key], flush=True)
            torch.cuda.empty_cache()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
