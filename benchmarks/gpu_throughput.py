"""Does fersynth keep the accelerator busy? Its training and generation against plain
references, side by side in one run (issue 32), written to one JSON file.

Training, per architecture (Swin-T 224 and ResNet-18 at full size), all at the same batch,
precision and optimiser step (timm AdamW, autocast, gradient clipping 5):
- `random_batches`: a plain timm loop on random batches already on the device (the model's
  ceiling: no input pipeline at all);
- `plain_loader`: a plain timm loop fed by a DataLoader of the same JPEGs with torchvision's
  transforms (resize, random crop, flip, rotation 5, normalise), the way most projects feed;
- `fersynth_in_memory`, `fersynth_loader`: `fersynth train` (`run_train`) on the same images,
  its in-memory path and its DataLoader path, images/s of its log windows after the first;
- `fersynth_mek`: the same in-memory run with MEK;
- `fersynth_sl_double_batch`: SL in memory at twice the batch, as many images per step as MEK
  forwards (the batch and its mirror).
Ratios: fersynth against the plain loader and against random batches; MEK against SL, per
image and per forwarded image (MEK's step against SL's on the same 2B images: what the class
activation maps and the consistency loss add beyond the mirrored view).

Generation: GIF-SD's guided step (`GifSD.generate`) against diffusers' plain
`StableDiffusionImg2ImgPipeline` on the same random components, seeds and settings (DDIM 50 x
strength 0.1, scale 50, K outputs per seed): images/s and peak device memory, and their ratios;
also the guided step over the whole batch at once (as before issue 32; fersynth takes it seed
by seed), and with the decoder's activations recomputed (gradient checkpointing) and stored,
beside the defaults' own choice (by memory: generate/checkpointing.py) and the bytes a guided pass's
activations take (counted on the meta device), so that one GPU run shows which holds the
targets.

Full size where CUDA is present (batch 128, bf16, 100 px JPEGs, SD-1.5-sized components at
512 px); `--tiny` (always on a CPU) measures the same things on ResNet-18-sized models at 32 px
and tiny diffusers components at 64 px, in about a minute, so the test suite runs it and it
never rots. A measurement that fails is recorded with its error; the others go on.

    .venv/bin/python benchmarks/gpu_throughput.py [--tiny] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Size:
    archs: tuple[tuple[str, int], ...]  # (timm name, input px)
    batch: int
    steps: int  # measured optimiser steps per training measurement (after warm-up)
    warmup: int
    images: int  # JPEGs written
    image_px: int
    workers: int
    gen_size: int  # generation working size (px)
    gen_seeds: int  # seeds per generation batch
    gen_k: int
    gen_repeats: int


FULL = Size(
    (("swin_tiny_patch4_window7_224", 224), ("resnet18", 224)), 128, 40, 10, 2048, 100, 14, 512, 4, 5, 2
)
TINY = Size((("resnet18", 32),), 8, 4, 2, 64, 40, 0, 64, 2, 2, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def write_images(folder: Path, count: int, px: int) -> Path:
    """`count` random-texture JPEGs in a fersynth dataset folder (manifest.csv, every class),
    with 10% of them as the validation split."""
    from fersynth.classes import CLASSES
    from fersynth.dataset import COLUMNS, pixel_hash, write_manifest

    rng = np.random.default_rng(0)
    rows = []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (px // 4, px // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        relative = f"images/{i:05d}.jpg"
        Image.fromarray(pixels).save(folder / relative, quality=90)
        rows.append(
            {
                "id": f"b{i}",
                "path": relative,
                "label": CLASSES[i % len(CLASSES)],
                "split": "val" if i % 10 == 9 else "train",
                "origin": "real",
                "source": "benchmark",
                "source_id": relative,
                "seed_id": "",
                "width": pixels.shape[1],
                "height": pixels.shape[0],
                "channels": 3,
                "pixel_hash": pixel_hash(pixels),
            }
        )
    import pandas as pd

    write_manifest(folder, pd.DataFrame(rows, columns=list(COLUMNS)))
    return folder


class _Jpegs(Dataset):
    """The plain way: decode with PIL, torchvision transforms per image in the workers."""

    def __init__(self, folder: Path, transform) -> None:
        import pandas as pd

        from fersynth.classes import CLASS_INDEX

        frame = pd.read_csv(folder / "manifest.csv")
        self.paths = [str(folder / p) for p in frame["path"]]
        self.labels = [CLASS_INDEX[label] for label in frame["label"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.array(Image.open(self.paths[index]).convert("RGB"))).permute(2, 0, 1)
        return self.transform(image), self.labels[index]


def plain_loop(arch: str, px: int, size: Size, device, dtype, folder: Path | None) -> dict:
    """A plain timm loop; on random device batches (`folder` None) or fed by a DataLoader."""
    from fersynth.settings import THESIS_MEAN, THESIS_STD
    from fersynth.train.data import train_transform
    from fersynth.train.models import ModelSpec, create_model, default_resize

    torch.manual_seed(0)
    model = create_model(ModelSpec(arch, px, default_resize(px), THESIS_MEAN, THESIS_STD)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05)
    if folder is None:
        x = torch.randn(size.batch, 3, px, px, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (size.batch,), device=device)
        batches = iter(lambda: (x, y), None)
    else:
        transform = train_transform(px, default_resize(px), True, 5.0, THESIS_MEAN, THESIS_STD)
        loader = DataLoader(
            _Jpegs(folder, transform),
            batch_size=size.batch,
            shuffle=True,
            drop_last=True,
            num_workers=size.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=size.workers > 0,
        )
        batches = (batch for _ in iter(int, 1) for batch in loader)  # endless epochs

    def step() -> None:
        x, y = next(batches)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    for _ in range(size.warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(size.steps):
        step()
    _sync(device)
    return {"images_per_s": round(size.batch * size.steps / (time.perf_counter() - started), 1)}


def fersynth_loop(arch: str, px: int, size: Size, device, folder: Path, work: Path, **changes) -> dict:
    """`run_train` as a user runs it; images/s of its log windows after the first (warm-up)."""
    from fersynth.settings import TrainSettings
    from fersynth.train.loop import SPEED_FILE, run_train

    output = work / f"{arch}_{'_'.join(f'{k}-{v}' for k, v in changes.items())}"
    values = dict(
        data=folder,
        output=output,
        arch=arch,
        image_size=px,
        batch_size=size.batch,
        steps=size.warmup + size.steps,
        warmup_steps=1,
        log_every=size.warmup,
        eval_every=10**6,
        checkpoint_every=10**6,
        workers=size.workers,
        device=str(device),
        precision="bf16" if device.type == "cuda" else "fp32",
    )
    settings = TrainSettings(**{**values, **changes})
    result = run_train(settings, force=True, progress=False)
    windows = [json.loads(line) for line in (output / SPEED_FILE).read_text().splitlines() if line]
    measured = [w["images_per_s"] for w in windows[1:]] or [result.images_per_second]
    summary = json.loads((output / "train_summary.json").read_text())
    return {
        "images_per_s": round(float(np.mean(measured)), 1),
        "cpu_threads": summary["cpu_threads"],
        "device": summary["device"],
    }


def generation(size: Size, device: torch.device, tiny: bool) -> dict:
    """GIF-SD's guided generation against diffusers' plain img2img, same components and seeds."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from fersynth.generate.backends import Batch, GifSD, make_prompts
    from fersynth.generate.checkpointing import saved_activation_bytes
    from fersynth.generate.components import build_random, sd15_sized
    from fersynth.generate.guide import FerGuide
    from fersynth.settings import THESIS_MEAN, THESIS_STD
    from fersynth.train.models import ModelSpec, create_model, save_model

    components = build_random(sample_size=size.gen_size) if tiny else sd15_sized()
    guide_arch, guide_px = ("resnet18", 32) if tiny else ("resnet50", 224)
    with tempfile.TemporaryDirectory() as folder:
        spec = ModelSpec(guide_arch, guide_px, guide_px, THESIS_MEAN, THESIS_STD)
        save_model(Path(folder) / "model.pt", create_model(spec), spec)
        guide = FerGuide(Path(folder) / "model.pt", device)
    half = device.type == "cuda"
    guided = GifSD(
        components, guide, device, steps=50, strength=0.1, scale=50.0, step_size=0.1, eps=0.1, half=half
    )
    dtype = torch.float16 if half else torch.float32
    vae = copy.deepcopy(guided.vae).to(device, dtype)  # the plain pipeline's own, in the UNet's dtype
    plain = StableDiffusionImg2ImgPipeline(**{**guided.pipe.components, "vae": vae})
    plain.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    labels = ["fear", "disgust", "sad", "angry", "surprise", "neutral", "happy"]
    seeds = [
        rng.integers(0, 255, (size.gen_size, size.gen_size, 3), dtype=np.uint8) for _ in range(size.gen_seeds)
    ]
    names = [labels[i % 7] for i in range(size.gen_seeds)]
    index = [i for i in range(size.gen_seeds) for _ in range(size.gen_k)]

    def batch(repeat: int) -> Batch:
        ids = [repeat * 1000 + j for j in range(len(index))]
        prompts = make_prompts([names[i] for i in index], ids, True)
        return Batch(seeds, names, index, [torch.Generator().manual_seed(s) for s in ids], prompts)

    def run_guided(repeat: int) -> None:
        guided.generate(batch(repeat))

    def run_plain(repeat: int) -> None:
        b = batch(repeat)
        images = torch.stack([torch.from_numpy(seeds[i]).permute(2, 0, 1) for i in index]).float() / 255
        with torch.inference_mode():
            plain(
                prompt=b.prompts,
                image=images.to(device, dtype),
                strength=0.1,
                num_inference_steps=50,
                guidance_scale=50.0,
                generator=b.generators,
                output_type="np",
            )

    # (name, run, guided step's seeds per pass, decoder checkpointing: None lets the backend
    # choose by memory, as by default): the defaults, the step over the whole batch at once
    # (before issue 32), and the step with the decoder's activations recomputed and stored.
    variants = [
        ("plain_img2img", run_plain, None, None),
        ("gif_sd_guided", run_guided, GifSD.guided_seeds_per_pass, None),
        ("gif_sd_guided_whole_batch", run_guided, None, None),
        ("gif_sd_guided_checkpointing", run_guided, GifSD.guided_seeds_per_pass, True),
        ("gif_sd_guided_no_checkpointing", run_guided, GifSD.guided_seeds_per_pass, False),
    ]
    measured = {}
    for name, run, seeds_per_pass, checkpointing in variants:
        guided.guided_seeds_per_pass, guided.force_checkpointing = seeds_per_pass, checkpointing
        run(0)  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for repeat in range(size.gen_repeats):
            run(repeat + 1)
        _sync(device)
        elapsed = time.perf_counter() - started
        images = len(index) * size.gen_repeats
        measured[name] = {"images_per_s": round(images / elapsed, 3), "peak_memory_gib": _peak_gib(device)}
        if run is run_guided:
            measured[name]["decoder_checkpointed"] = guided.last_pass_checkpointed
    # What a guided pass's decoder activations take stored (counted on the meta device).
    side = size.gen_size // 2 ** (len(guided.vae.config.block_out_channels) - 1)
    for label, outputs in (("one_seed", size.gen_k), ("whole_batch", size.gen_k * size.gen_seeds)):
        latent = (outputs, guided.vae.config.latent_channels, side, side)
        measured[f"decoder_activations_bytes_{label}"] = saved_activation_bytes(
            guided.vae, latent, guided.vae_dtype
        )
    _attempt(measured, "outputs", same_outputs, guided, batch)
    reference = measured["plain_img2img"]
    for name, _, _, _ in variants[1:]:
        speed = measured[name]["images_per_s"]
        measured[name]["time_ratio_over_plain"] = round(reference["images_per_s"] / speed, 3)
        if device.type == "cuda":
            measured[name]["memory_ratio_over_plain"] = round(
                measured[name]["peak_memory_gib"] / reference["peak_memory_gib"], 3
            )
    measured["time_ratio_guided_over_plain"] = measured["gif_sd_guided"]["time_ratio_over_plain"]
    if device.type == "cuda":
        measured["memory_ratio_guided_over_plain"] = measured["gif_sd_guided"]["memory_ratio_over_plain"]
    return measured


def same_outputs(guided, batch) -> dict:
    """One batch generated again with the decoder's activations recomputed and stored (the same
    images are expected), and with the VAE as before issue 32 (float32 weights, the decoder
    under bf16 autocast on CUDA) against the defaults (bf16 weights on CUDA): grey levels of
    the written images, GIF's scores and the clipped shares."""
    from fersynth.generate.backends import GifSD

    guided.guided_seeds_per_pass = GifSD.guided_seeds_per_pass

    def generate(checkpointing: bool, dtype: torch.dtype):
        torch.nn.Module.to(guided.vae, dtype)  # torch's own `to`: diffusers' warns on every cast
        guided.vae_dtype, guided.force_checkpointing = dtype, checkpointing
        out = guided.generate(batch(99))
        return np.stack(out.images).astype(np.int16), np.array(out.scores), np.array(out.clipped)

    default = guided.vae_dtype
    recomputed = generate(True, default)
    stored = generate(False, default)
    before = generate(True, torch.float32)  # recomputed: float32 activations would not fit stored
    torch.nn.Module.to(guided.vae, default)  # back to the defaults
    guided.vae_dtype, guided.force_checkpointing = default, None
    return {
        "checkpointing_max_grey_difference": int(np.abs(recomputed[0] - stored[0]).max()),
        "vae_dtype": str(default),
        "before_issue_32_mean_grey_difference": round(float(np.abs(before[0] - stored[0]).mean()), 3),
        "before_issue_32_max_score_difference": round(float(np.abs(before[1] - stored[1]).max()), 5),
        "before_issue_32_clipped_share": [round(float(v), 4) for v in before[2]],
        "clipped_share": [round(float(v), 4) for v in stored[2]],
    }


def _attempt(results: dict, key: str, function, *args, **kwargs) -> None:
    """One measurement; a failure is recorded with its error and the run goes on."""
    try:
        results[key] = function(*args, **kwargs)
    except Exception as exc:  # a benchmark reports what failed and measures the rest
        results[key] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        traceback.print_exc()
    print(key, json.dumps(results[key]), flush=True)


def _ratio(results: dict, top: str, bottom: str, scale: float = 1.0) -> float | None:
    """`scale` x top's images/s over bottom's; None where either measurement failed."""
    a, b = results.get(top, {}), results.get(bottom, {})
    if "images_per_s" not in a or "images_per_s" not in b:
        return None
    return round(scale * a["images_per_s"] / b["images_per_s"], 3)


def run(tiny: bool) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = tiny or not cuda
    size = TINY if tiny else FULL
    dtype = torch.bfloat16 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": "tiny" if tiny else "full",
        "torch": torch.__version__,
        "config": {k: v for k, v in size.__dict__.items()},
        "training": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folder = write_images(work / "data", size.images, size.image_px)
        for arch, px in size.archs:
            runs: dict = {}
            _attempt(runs, "random_batches", plain_loop, arch, px, size, device, dtype, None)
            _attempt(runs, "plain_loader", plain_loop, arch, px, size, device, dtype, folder)
            variants = {
                "fersynth_in_memory": {"in_memory": "always"},
                "fersynth_loader": {"in_memory": "never"},
                "fersynth_mek": {"in_memory": "always", "method": "mek"},
                # SL on as many images per step as MEK forwards (the batch and its mirror)
                "fersynth_sl_double_batch": {"in_memory": "always", "batch_size": 2 * size.batch},
            }
            for key, changes in variants.items():
                _attempt(runs, key, fersynth_loop, arch, px, size, device, folder, work, **changes)
            runs["ratios"] = {
                "fersynth_in_memory_over_plain_loader": _ratio(runs, "fersynth_in_memory", "plain_loader"),
                "fersynth_loader_over_plain_loader": _ratio(runs, "fersynth_loader", "plain_loader"),
                "fersynth_in_memory_over_random_batches": _ratio(
                    runs, "fersynth_in_memory", "random_batches"
                ),
                "mek_over_sl": _ratio(runs, "fersynth_mek", "fersynth_in_memory"),
                # MEK's step against SL's step on the same 2B forwarded images: what the class
                # activation maps and the consistency loss cost beyond the mirrored view itself.
                "mek_over_sl_same_forwarded_images": _ratio(
                    runs, "fersynth_mek", "fersynth_sl_double_batch", 2.0
                ),
            }
            result["training"][f"{arch}_{px}"] = runs
    _attempt(result, "generation", generation, size, device, tiny)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (always on a CPU)")
    parser.add_argument(
        "--output", type=Path, help="JSON file [benchmarks/results/gpu_throughput_<size>.json]"
    )
    args = parser.parse_args(argv)
    result = run(args.tiny)
    output = args.output or RESULTS / f"gpu_throughput_{result['size']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
