"""`fersynth generate` and `fersynth merge`: GIF expansion of the training split, in shards.

Seeds are the training images (never test images), sorted by id; shard i of n takes every
n-th one. Each output is named after (seed id, k) and drawn from its own generator, seeded by
(global seed, seed id, k), so it can be regenerated exactly and a rerun never duplicates it.
A seed is done when its record file exists: written after its K images, atomically. A shard
killed half-way and started again skips the finished seeds and redoes the unfinished one,
ending with exactly the files an uninterrupted run writes.

    <output>/shards/shard-000-of-004/images/<seed id>_k<k>.png
                                     records/<seed id>.json
    <output>/dataset/                 written by merge: manifest.csv + images + contact sheets
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, load_image, pixel_hash, read_manifest, write_manifest
from fersynth.errors import FersynthError
from fersynth.evaluate import pick_device
from fersynth.figures import contact_sheet, save_png
from fersynth.files import atomic_write_text, staged_folder
from fersynth.generate.backends import Batch, GifPrior, GifSD, make_prompts, resize_seed, to_seed_size
from fersynth.parallel import pins_torch_threads
from fersynth.settings import GenerateSettings, resolved_dict

RECORDS = "records"
IMAGES = "images"


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:03d}-of-{num_shards:03d}"


def output_name(seed_id: str, k: int) -> str:
    return f"{seed_id}_k{k}"


def output_seed(global_seed: int, seed_id: str, k: int) -> int:
    """The random seed of one output: a stable function of (global seed, seed image, k)."""
    digest = hashlib.sha256(f"{global_seed}/{seed_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def select_seeds(settings: GenerateSettings, seed: int) -> pd.DataFrame:
    """Training rows to expand, sorted by id (the same list on every machine)."""
    frame = read_manifest(settings.data).manifest
    train = frame[frame["split"] == TRAIN_SPLIT]
    if settings.classes:
        train = train[train["label"].isin(settings.classes)]
    if settings.max_seeds_per_class:
        limit = settings.max_seeds_per_class
        train = pd.concat(
            [g.sample(n=min(len(g), limit), random_state=seed) for _, g in train.groupby("label")]
        )
    if train.empty:
        raise FersynthError(f"{settings.data}: no training images to expand")
    return train.sort_values("id").reset_index(drop=True)


def shard_seeds(seeds: pd.DataFrame, shard: int, num_shards: int) -> pd.DataFrame:
    if not 0 <= shard < num_shards:
        raise FersynthError(f"--shard {shard}: expected 0 <= shard < --num-shards {num_shards}")
    return seeds.iloc[shard::num_shards]


def _guide(settings: GenerateSettings, device: torch.device):
    from fersynth.generate.guide import ClipGuide, FerGuide

    return (
        FerGuide(settings.guide_model, device)
        if settings.guide == "fer"
        else ClipGuide(settings.guide_model, device)
    )


def build_backend(settings: GenerateSettings, device: torch.device):
    """The configured backend and the size its seeds are resized to."""
    guide = _guide(settings, device)
    if settings.backend == "gif-prior":
        from fersynth.generate.prior import load_prior

        vae, size = load_prior(settings.prior)
        return GifPrior(vae, guide, device, settings.step_size, settings.eps, settings.half), size
    if not settings.sd_model:
        raise FersynthError("generate.sd_model: set a Stable Diffusion folder or s3:// prefix for gif-sd")
    from fersynth.generate.components import load_components

    components = load_components(settings.sd_model)
    backend = GifSD(
        components,
        guide,
        device,
        steps=settings.steps,
        strength=settings.strength,
        scale=settings.scale,
        step_size=settings.step_size,
        eps=settings.eps,
        half=settings.half,
    )
    return backend, settings.image_size


@dataclass
class ShardResult:
    folder: Path
    seeds: int
    skipped: int  # finished before this run (resume)
    written: int


@pins_torch_threads
def run_generate(
    settings: GenerateSettings,
    *,
    shard: int = 0,
    num_shards: int = 1,
    seed: int = 2048,
    only: list[str] | None = None,
    progress: bool = True,
    backend=None,
) -> ShardResult:
    """Generate K outputs for each seed of one shard (resumable); `only` restricts to seed ids."""
    dataset = read_manifest(settings.data)
    seeds = shard_seeds(select_seeds(settings, seed), shard, num_shards)
    if only:
        missing = sorted(set(only) - set(seeds["id"]))
        if missing:
            raise FersynthError(f"not training seeds of this shard: {', '.join(missing[:5])}")
        seeds = seeds[seeds["id"].isin(only)]
    folder = Path(settings.output) / "shards" / shard_name(shard, num_shards)
    (folder / RECORDS).mkdir(parents=True, exist_ok=True)
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        folder / "settings.json",
        json.dumps(
            {"seed": seed, "shard": shard, "num_shards": num_shards, "generate": resolved_dict(settings)},
            indent=2,
            default=str,
        )
        + "\n",
    )
    todo = seeds[[not (folder / RECORDS / f"{sid}.json").is_file() for sid in seeds["id"]]]
    skipped = len(seeds) - len(todo)
    if todo.empty:
        return ShardResult(folder, len(seeds), skipped, 0)
    device = pick_device(settings.device)
    if backend is None:
        backend, size = build_backend(settings, device)
    else:
        backend, size = backend
    params = {
        k: v
        for k, v in resolved_dict(settings).items()
        if k in ("backend", "steps", "strength", "scale", "step_size", "eps", "guide", "image_size")
    }
    params["outputs_per_seed"] = settings.k
    written = 0
    bar = tqdm(
        total=len(todo) * settings.k,
        desc=f"generate {shard_name(shard, num_shards)}",
        unit="img",
        disable=not progress,
    )
    rows = list(todo.itertuples(index=False))
    for start in range(0, len(rows), settings.seeds_per_batch):
        chunk = rows[start : start + settings.seeds_per_batch]
        stored = [load_image(dataset.image_path(r.path)) for r in chunk]  # the seeds as stored
        seeds_pixels = [resize_seed(pixels, size) for pixels in stored]
        index = [i for i in range(len(chunk)) for _ in range(settings.k)]
        out_seeds = [output_seed(seed, chunk[i].id, k) for i in range(len(chunk)) for k in range(settings.k)]
        batch = Batch(
            seeds=seeds_pixels,
            labels=[r.label for r in chunk],
            seed_index=index,
            generators=[torch.Generator().manual_seed(s) for s in out_seeds],
            prompts=make_prompts([chunk[i].label for i in index], out_seeds, settings.prompt_variants),
        )
        images, scores = backend.generate(batch)
        # Every backend's outputs are written at their seed's stored size (see to_seed_size).
        images = [
            to_seed_size(image, stored[i].shape[1], stored[i].shape[0])
            for image, i in zip(images, index, strict=True)
        ]
        for i, row in enumerate(chunk):
            records = []
            for k in range(settings.k):
                j = i * settings.k + k
                name = output_name(row.id, k)
                save_png(folder / IMAGES / f"{name}.png", images[j])
                records.append(
                    {
                        "id": name,
                        "seed_id": row.id,
                        "label": row.label,
                        "k": k,
                        "random_seed": out_seeds[j],
                        "prompt": batch.prompts[j],
                        "gif_score": round(scores[j], 6),
                        "seed_path": row.path,
                        **params,
                    }
                )
            atomic_write_text(folder / RECORDS / f"{row.id}.json", json.dumps(records, indent=1) + "\n")
            written += settings.k
            bar.update(settings.k)
    bar.close()
    return ShardResult(folder, len(seeds), skipped, written)


@dataclass
class MergeResult:
    output: Path
    images: int
    per_class: dict[str, int]


def run_merge(
    settings: GenerateSettings,
    *,
    num_shards: int,
    seed: int = 2048,
    force: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Join the shards into one synthetic dataset, checking nothing is missing or doubled."""
    seeds = select_seeds(settings, seed)
    root = Path(settings.output) / "shards"
    records: list[dict] = []
    problems = []
    for shard in range(num_shards):
        folder = root / shard_name(shard, num_shards)
        expected = set(shard_seeds(seeds, shard, num_shards)["id"])
        present = {p.stem for p in (folder / RECORDS).glob("*.json")} if folder.is_dir() else set()
        if expected - present:
            problems.append(
                f"{folder.name}: {len(expected - present)} seeds not generated "
                f"(e.g. {sorted(expected - present)[0]}); rerun that shard"
            )
        if present - expected:
            problems.append(
                f"{folder.name}: {len(present - expected)} seeds that belong to no shard "
                "of this partition (other settings?)"
            )
        for seed_id in sorted(expected & present):
            for record in json.loads((folder / RECORDS / f"{seed_id}.json").read_text()):
                record["file"] = folder / IMAGES / f"{record['id']}.png"
                if not record["file"].is_file():
                    problems.append(f"{record['file']}: missing")
                records.append(record)
    names = [r["id"] for r in records]
    if len(set(names)) != len(names):
        problems.append(f"{len(names) - len(set(names))} output names appear twice")
    if len(records) != len(seeds) * settings.k:
        problems.append(f"{len(records)} outputs, expected {len(seeds)} seeds x k={settings.k}")
    if problems:
        raise FersynthError("merge: " + "; ".join(problems[:5]))
    output = Path(settings.output) / "dataset"
    rows = []
    with staged_folder(output, force=force) as staging:
        for record in tqdm(records, desc="merge", unit="img", disable=not progress):
            relative = f"images/synthetic/{record['id']}.png"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record["file"], staging / relative)
            pixels = load_image(staging / relative)
            params = {
                k: v for k, v in record.items() if k not in ("id", "seed_id", "label", "file", "seed_path")
            }
            rows.append(
                {
                    "id": record["id"],
                    "path": relative,
                    "label": record["label"],
                    "split": TRAIN_SPLIT,
                    "origin": "synthetic",
                    "source": record["backend"],
                    "source_id": record["seed_path"],
                    "seed_id": record["seed_id"],
                    "width": pixels.shape[1],
                    "height": pixels.shape[0],
                    "channels": 3,
                    "pixel_hash": pixel_hash(pixels),
                    "gen_k": record["k"],
                    "gen_random_seed": str(record["random_seed"]),
                    "gen_prompt": record["prompt"],
                    "gif_score": record["gif_score"],
                    "gen_params": json.dumps(params, sort_keys=True),
                }
            )
        frame = pd.DataFrame(rows)
        write_manifest(staging, frame)
        write_contact_sheets(staging, frame, read_manifest(settings.data), settings.k)
        atomic_write_text(
            staging / "settings.json",
            json.dumps(
                {"seed": seed, "num_shards": num_shards, "generate": resolved_dict(settings)},
                indent=2,
                default=str,
            )
            + "\n",
        )
    per_class = frame["label"].value_counts().reindex(CLASSES, fill_value=0).astype(int).to_dict()
    return MergeResult(output, len(frame), per_class)


def write_contact_sheets(
    folder: Path, synthetic: pd.DataFrame, seeds_dataset, k: int, seeds_per_class: int = 6
) -> None:
    """One PNG per class: each seed image, then its K generated images."""
    seed_rows = seeds_dataset.manifest.set_index("id")
    for name in CLASSES:
        group = synthetic[synthetic["label"] == name]
        rows = []
        for seed_id in sorted(group["seed_id"].unique())[:seeds_per_class]:
            outputs = group[group["seed_id"] == seed_id].sort_values("gen_k")
            images = [load_image(seeds_dataset.image_path(seed_rows.at[seed_id, "path"]))]
            images += [load_image(folder / p) for p in outputs["path"]]
            rows.append((f"{name}: seed {seed_id} | {k} generated", images))
        if rows:
            save_png(folder / f"samples_{name}.png", contact_sheet(rows, columns=k + 1))
