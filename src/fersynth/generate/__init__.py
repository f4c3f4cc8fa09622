"""`fersynth generate` and `fersynth merge`: GIF expansion of the training split, in shards.

A job is one seed image and the class its K outputs are meant to show: its own (within-class
expansion) or an edit's target (`generate.edit`); or K new identities (`generate.identities`)
drawn from noise with no seed image, stored at the training images' median size. Seeds are
training images only (never test images). Jobs are sorted by key (the seed id,
`<seed id>_to_<target>` for an edit, `identity_<class>_<n>`); shard i of n takes every n-th
one. Each output is named `<key>_k<k>` and drawn from its own generator, seeded by (global
seed, key, k), so it can be regenerated exactly and a rerun never duplicates it; its image
and record do not depend on the other seeds of its batch or shard. A job is done when its
record file exists: written after its K images, atomically. A shard killed half-way and
started again skips the finished jobs and redoes the unfinished one, ending with exactly the
files an uninterrupted run writes; a shard folder made with other settings is refused, never
mixed.

    <output>/shards/shard-000-of-004/images/<key>_k<k>.png
                                     records/<key>.json
    <output>/dataset/                 written by merge: manifest.csv + images + contact sheets
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fersynth.augment import COPY_KIND, COPY_SUFFIX
from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, load_image, pixel_hash, read_manifest, write_manifest
from fersynth.errors import FersynthError
from fersynth.figures import contact_sheet, save_png
from fersynth.files import atomic_write_text, staged_folder
from fersynth.generate.backends import (
    Batch,
    GifPrior,
    GifSD,
    SeedCopy,
    make_prompts,
    resize_seed,
    to_seed_size,
)
from fersynth.generate.prompts import identity_prompt
from fersynth.memory import batch_fits
from fersynth.parallel import pins_torch_threads
from fersynth.settings import IDENTITY_SD_SCALE, GenerateSettings, resolved_dict
from fersynth.train.inference import pick_device

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


def identity_key(label: str, index: int) -> str:
    return f"identity_{label}_{index:05d}"


def job_key(seed_id: str, target: str, edit_from: str) -> str:
    """What names a job's records and outputs: the seed id for within-class expansion (as
    before edits existed), `<seed id>_to_<target>` for a cross-class edit."""
    return f"{seed_id}_to_{target}" if edit_from else seed_id


def select_seeds(settings: GenerateSettings, seed: int) -> pd.DataFrame:
    """The jobs, sorted by key (the same list on every machine): one per training image to
    expand within its class (`classes`; null: every class), then one per (source image, target)
    of each cross-class edit (`edit`), then `identities.per_class` new identities per prompted
    class (no seed: empty manifest columns). Columns: the manifest's, plus `target` (the
    intended label), `edit_from` (the source class of an edit, else ""), `strength`, `kind`
    (expand, edit or identity) and `key`."""
    frame = read_manifest(settings.data).manifest
    train = frame[frame["split"] == TRAIN_SPLIT]
    train = train.sort_values("id")  # sampling from the same order on every machine
    # Seed images and K per class, sized from what the grid's variants need (generate.sizing).
    plans = generation_plan(settings, train)
    expand = train[train["label"].isin([name for name, p in plans.items() if p.seeds])]
    if not expand.empty:
        expand = pd.concat(
            [
                g.sample(n=min(len(g), plans[name].seeds), random_state=seed).assign(k=plans[name].k)
                for name, g in expand.groupby("label")
            ]
        )
    jobs = [expand.assign(target=expand["label"], edit_from="", strength=settings.strength, kind="expand")]
    for target, edit in sorted(settings.edit.items()):
        pool = train[train["label"].isin(edit.sources)]
        if edit.max_seeds is not None and len(pool) > edit.max_seeds:
            pool = pool.sample(n=edit.max_seeds, random_state=seed + CLASSES.index(target))
        jobs.append(
            pool.assign(
                target=target, edit_from=pool["label"], strength=edit.strength, kind="edit", k=settings.k
            )
        )
    identities = settings.identities
    prompted = [name for name in CLASSES if identities.classes is None or name in identities.classes]
    jobs_per_class = math.ceil(identities.per_class / settings.k)  # K faces per job
    keys = [identity_key(name, i) for name in prompted for i in range(jobs_per_class)]
    if keys:
        targets = [name for name in prompted for _ in range(jobs_per_class)]
        blank = {column: "" for column in train.columns}
        jobs.append(
            pd.DataFrame([blank] * len(keys)).assign(
                target=targets, edit_from="", strength=None, kind="identity", key=keys, k=settings.k
            )
        )
    selected = pd.concat(jobs, ignore_index=True)
    if selected.empty and not train.empty and settings.sizing == "need" and settings.variants is not None:
        raise FersynthError(
            f"generate.sizing: need: no class needs synthetic images for the grid's variants "
            f"({', '.join(settings.variants) or 'none'}, rho {settings.rho}) and there are no edits or "
            "identities; set generate.sizing: fixed to generate max_seeds_per_class x K per class anyway"
        )
    if selected.empty:
        raise FersynthError(f"{settings.data}: no training images to expand or edit, and no identities")
    selected["k"] = selected["k"].astype(int)
    seeded = selected["kind"] != "identity"
    selected.loc[seeded, "key"] = [
        job_key(*row) for row in selected.loc[seeded, ["id", "target", "edit_from"]].itertuples(index=False)
    ]
    return selected.sort_values("key").reset_index(drop=True)


def generation_plan(settings: GenerateSettings, train: pd.DataFrame):
    """{class: sizing.ClassPlan} of the expanded classes, from the training split's counts."""
    from fersynth.generate.sizing import plan_generation

    counts = train["label"].value_counts()
    return plan_generation(settings, {name: int(counts.get(name, 0)) for name in CLASSES})


def output_batches(rows: list, outputs: int) -> list[list]:
    """Consecutive jobs in batches of at most `outputs` outputs (each job's K), one job at least."""
    batches: list[list] = []
    for row in rows:
        if batches and sum(r.k for r in batches[-1]) + row.k <= outputs:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def copies_wanted(settings: GenerateSettings) -> bool:
    """Whether each expansion output gets a copy twin from the null generator (generate.copy_twins;
    an edit's seed view shows its source class, so an edit has none)."""
    return bool(settings.copy_twins) and settings.backend != "seed-copy"


def expected_outputs(jobs: pd.DataFrame, twins: bool) -> int:
    """The images (and records) `jobs` write: each job's K, twice for an expansion with copy twins."""
    return int(
        sum(
            k * (2 if twins and kind == "expand" else 1)
            for k, kind in zip(jobs["k"], jobs["kind"], strict=True)
        )
    )


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
    """The configured backend and the size its seeds are resized to. Missing model folders are
    reported before anything is loaded."""
    for backend_name, key in (("gif-sd", "sd_model"), ("gif-unclip", "unclip_model")):
        if settings.backend == backend_name and not getattr(settings, key):
            raise FersynthError(f"generate.{key}: set a diffusers folder or s3:// prefix for {backend_name}")
    if settings.backend == "seed-copy":  # the null generator: no model, seeds at their own size
        return SeedCopy(device, settings.seed_rotation, settings.seed_hflip), None
    guide = _guide(settings, device)
    # GIF's step and the seed views, the same for every backend.
    gif = dict(
        step_size=settings.step_size,
        eps=settings.eps,
        seed_rotation=settings.seed_rotation,
        seed_hflip=settings.seed_hflip,
    )
    # The denoising of the img2img backends (gif-ldm, gif-sd).
    img2img = dict(steps=settings.steps, strength=settings.strength, scale=settings.scale, half=settings.half)
    if settings.backend == "gif-prior":
        from fersynth.generate.prior import load_prior

        vae, size = load_prior(settings.prior)
        return GifPrior(vae, guide, device, half=settings.half, keep_detail=settings.keep_detail, **gif), size
    if settings.backend == "gif-ldm":
        from fersynth.generate.ldm import GifLatentDiffusion, load_latent_diffusion
        from fersynth.generate.prior import load_prior

        vae, size = load_prior(settings.prior)
        unet, scheduler = load_latent_diffusion(settings.prior)
        return GifLatentDiffusion(vae, unet, scheduler, guide, device, **img2img, **gif), size
    if settings.backend == "gif-unclip":
        from fersynth.generate.unclip import GifUnclip, load_unclip

        half = settings.half and device.type == "cuda"
        pipe = load_unclip(settings.unclip_model, device, torch.float16 if half else torch.float32)
        backend = GifUnclip(
            pipe, guide, device, size=settings.image_size, steps=settings.steps, scale=settings.scale, **gif
        )
        return backend, settings.image_size
    from fersynth.generate.components import load_components

    components = load_components(settings.sd_model)
    return GifSD(components, guide, device, **img2img, **gif), settings.image_size


@dataclass
class ShardResult:
    folder: Path
    seeds: int
    skipped: int  # finished before this run (resume)
    written: int


# Settings that change how an image is computed, not what it is: a resume may change them.
_RESUMABLE_CHANGES = ("device", "cpu_threads", "seeds_per_batch")


def _refuse_other_settings(folder: Path, record: dict) -> None:
    """A shard folder holding outputs of other settings is refused: resuming into it would mix
    two sets of images under one manifest."""
    previous_file = folder / "settings.json"
    if not previous_file.is_file() or not any((folder / RECORDS).glob("*.json")):
        return
    previous = json.loads(previous_file.read_text())

    def comparable(values: dict) -> dict:
        generate = {k: v for k, v in values.get("generate", {}).items() if k not in _RESUMABLE_CHANGES}
        return {**values, "generate": generate}

    now = json.loads(json.dumps(record, default=str))
    if comparable(previous) != comparable(now):
        old, new = comparable(previous)["generate"], comparable(now)["generate"]
        changed = [
            f"generate.{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)
        ]
        changed += [
            f"{k} {json.dumps(previous.get(k))} -> {json.dumps(now.get(k))}"
            for k in ("seed", "shard", "num_shards")
            if previous.get(k) != now.get(k)
        ]
        raise FersynthError(
            f"{folder}: holds outputs of other settings (changed: {', '.join(changed) or 'generate'}); "
            "set them back to resume, or delete it or choose another generate.output, so that two sets "
            f"are never mixed (a resume may change only {', '.join(_RESUMABLE_CHANGES)})"
        )


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
    """Generate K outputs for each job of one shard (resumable); `only` restricts to job keys
    or seed ids (a seed id selects its expansion and its edits)."""
    dataset = read_manifest(settings.data)
    seeds = shard_seeds(select_seeds(settings, seed), shard, num_shards)
    if only:
        missing = sorted(set(only) - set(seeds["id"]) - set(seeds["key"]))
        if missing:
            raise FersynthError(f"not jobs of this shard (seed id or key): {', '.join(missing[:5])}")
        seeds = seeds[seeds["id"].isin(only) | seeds["key"].isin(only)]
    folder = Path(settings.output) / "shards" / shard_name(shard, num_shards)
    record = {"seed": seed, "shard": shard, "num_shards": num_shards, "generate": resolved_dict(settings)}
    _refuse_other_settings(folder, record)
    (folder / RECORDS).mkdir(parents=True, exist_ok=True)
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "settings.json", json.dumps(record, indent=2, default=str) + "\n")
    todo = seeds[[not (folder / RECORDS / f"{key}.json").is_file() for key in seeds["key"]]]
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
        if k
        in (
            "backend",
            "steps",
            "strength",
            "scale",
            "step_size",
            "eps",
            "guide",
            "image_size",
            "seed_rotation",
            "seed_hflip",
        )
    }
    twins = copies_wanted(settings)
    written = 0
    bar = tqdm(
        total=expected_outputs(todo, twins),
        desc=f"generate {shard_name(shard, num_shards)}",
        unit="img",
        disable=not progress,
    )
    new_faces = todo[todo["kind"] == "identity"]
    if not new_faces.empty:
        written += _generate_identities(
            settings, backend, device, size, new_faces, dataset, folder, seed, params, bar
        )
    rows = list(todo[todo["kind"] != "identity"].itertuples(index=False))
    # One strength per batch (gif-sd noises the whole batch alike): batches never mix them. A
    # batch holds at most seeds_per_batch x K outputs: a class short of seeds has a larger K.
    chunks = [
        chunk
        for strength in dict.fromkeys(r.strength for r in rows)
        for chunk in output_batches(
            [r for r in rows if r.strength == strength], settings.seeds_per_batch * settings.k
        )
    ]
    copier = SeedCopy(torch.device("cpu"), settings.seed_rotation, settings.seed_hflip) if twins else None
    for chunk in chunks:
        stored = [load_image(dataset.image_path(r.path)) for r in chunk]  # the seeds as stored
        seeds_pixels = stored if size is None else [resize_seed(pixels, size) for pixels in stored]
        index = [i for i in range(len(chunk)) for _ in range(chunk[i].k)]
        out_seeds = [output_seed(seed, chunk[i].key, k) for i in range(len(chunk)) for k in range(chunk[i].k)]
        batch = Batch(
            seeds=seeds_pixels,
            labels=[r.target for r in chunk],
            seed_index=index,
            generators=[torch.Generator().manual_seed(s) for s in out_seeds],
            prompts=make_prompts([chunk[i].target for i in index], out_seeds, settings.prompt_variants),
            edits=[bool(r.edit_from) for r in chunk],
            strength=chunk[0].strength,
        )
        with _batch_fits(settings, device, len(index), size):
            generated = backend.generate(batch)
        # Every backend's outputs are written at their seed's stored size (see to_seed_size).
        images = [
            to_seed_size(image, stored[i].shape[1], stored[i].shape[0])
            for image, i in zip(generated.images, index, strict=True)
        ]
        copies = None
        if copier is not None:  # the same views, from fresh generators of the same seeds
            fresh = replace(batch, generators=[torch.Generator().manual_seed(s) for s in out_seeds])
            copies = [
                to_seed_size(image, stored[i].shape[1], stored[i].shape[0])
                for image, i in zip(copier.generate(fresh).images, index, strict=True)
            ]
        first = 0
        for row in chunk:
            records = []
            for k in range(row.k):
                j = first + k
                name = output_name(row.key, k)
                save_png(folder / IMAGES / f"{name}.png", images[j])
                records.append(
                    {
                        "id": name,
                        "seed_id": row.id,
                        "label": row.target,
                        "edit_from": row.edit_from,  # a cross-class edit's source class, else ""
                        "kind": row.kind,  # expand or edit
                        "k": k,
                        "random_seed": out_seeds[j],
                        "prompt": batch.prompts[j] if getattr(backend, "text_conditioned", True) else None,
                        "gif_score": round(generated.scores[j], 6),
                        # share of this output's latent entries that the eps-ball projection clipped
                        "clipped_fraction": round(generated.clipped[j], 4),
                        "seed_path": row.path,
                        **params,
                        # an edit's own (generate.edit.<target>.strength); gif-prior and
                        # gif-unclip have no img2img strength
                        "strength": row.strength if settings.backend in ("gif-sd", "gif-ldm") else None,
                        "outputs_per_seed": row.k,
                    }
                )
                if copies is not None and row.kind == "expand":  # its copy twin: its seed view
                    save_png(folder / IMAGES / f"{name}{COPY_SUFFIX}.png", copies[j])
                    records.append(
                        {
                            **records[-1],
                            "id": f"{name}{COPY_SUFFIX}",
                            "kind": COPY_KIND,
                            "backend": "seed-copy",
                            "prompt": None,
                            "gif_score": None,
                            "clipped_fraction": None,
                        }
                    )
            first += row.k
            atomic_write_text(folder / RECORDS / f"{row.key}.json", json.dumps(records, indent=1) + "\n")
            written += len(records)
            bar.update(len(records))
    bar.close()
    return ShardResult(folder, len(seeds), skipped, written)


def identity_size(dataset) -> tuple[int, int]:
    """(width, height) of a new identity: the training images' median size, so that, like an
    expanded image at its seed's size, its resolution does not show its origin."""
    train = dataset.manifest[dataset.manifest["split"] == TRAIN_SPLIT]
    if train.empty or "width" not in train.columns:
        raise FersynthError(f"{dataset.root}: no training images to take the new identities' size from")
    return (
        round(pd.to_numeric(train["width"]).median()),
        round(pd.to_numeric(train["height"]).median()),
    )


def _batch_fits(settings: GenerateSettings, device, outputs: int, size: int | None):
    """Out of memory in a generation batch: one line naming the batch and what shrinks it."""
    at = f" at {size} px" if size else ""
    lower = [f"generate.seeds_per_batch (now {settings.seeds_per_batch})"]
    if settings.sizing == "need":
        lower.append(f"generate.max_k (now {settings.max_k}: K per seed image of a class short of seeds)")
    return batch_fits("generate", f"a batch of {outputs} generated images{at}", device, lower)


def _generate_identities(settings, backend, device, size, jobs, dataset, folder, seed, params, bar) -> int:
    """New identities, K per job, each from its own generator and prompt (text-to-image from
    noise, no GIF step: there is no seed to stay close to). A batch holds `seeds_per_batch`
    jobs, as an expansion batch does. Returns how many images were written."""
    if not hasattr(backend, "identities"):
        raise FersynthError(f"generate.identities: {settings.backend} cannot draw new identities")
    width, height = identity_size(dataset)
    text = getattr(backend, "text_conditioned", True)
    steps = settings.identities.steps or settings.steps
    scale = settings.identities.scale or (
        IDENTITY_SD_SCALE if settings.backend == "gif-sd" else settings.scale
    )
    written = 0
    rows = list(jobs.itertuples(index=False))
    for start in range(0, len(rows), settings.seeds_per_batch):
        chunk = rows[start : start + settings.seeds_per_batch]
        outputs = [(row, k, output_seed(seed, row.key, k)) for row in chunk for k in range(row.k)]
        prompts = [identity_prompt(row.target, np.random.default_rng(s)) for row, _, s in outputs]
        with _batch_fits(settings, device, len(outputs), size):
            images = backend.identities(
                [row.target for row, _, _ in outputs],
                prompts,
                [torch.Generator().manual_seed(s) for _, _, s in outputs],
                size=size,
                steps=steps,
                scale=scale,
            )
        records: dict[str, list[dict]] = {}
        for (row, k, random_seed), image, text_prompt in zip(outputs, images, prompts, strict=True):
            name = output_name(row.key, k)
            save_png(folder / IMAGES / f"{name}.png", to_seed_size(image, width, height))
            records.setdefault(row.key, []).append(
                {
                    "id": name,
                    "seed_id": "",
                    "label": row.target,  # the prompted class; verify relabels by the vote
                    "edit_from": "",
                    "kind": "identity",
                    "k": k,
                    "random_seed": random_seed,
                    "prompt": text_prompt if text else None,
                    "gif_score": None,
                    "clipped_fraction": None,
                    "seed_path": "",
                    **params,
                    "steps": steps,
                    "scale": scale,
                    "strength": None,
                    "outputs_per_seed": row.k,
                }
            )
        for key, job_records in records.items():
            atomic_write_text(folder / RECORDS / f"{key}.json", json.dumps(job_records, indent=1) + "\n")
            written += len(job_records)
            bar.update(len(job_records))
    return written


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
        expected = set(shard_seeds(seeds, shard, num_shards)["key"])
        present = {p.stem for p in (folder / RECORDS).glob("*.json")} if folder.is_dir() else set()
        if expected - present:
            problems.append(
                f"{folder.name}: {len(expected - present)} jobs not generated "
                f"(e.g. {sorted(expected - present)[0]}); rerun that shard"
            )
        if present - expected:
            problems.append(
                f"{folder.name}: {len(present - expected)} jobs that belong to no shard "
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
    expected = expected_outputs(seeds, copies_wanted(settings))
    if len(records) != expected:
        problems.append(f"{len(records)} outputs, expected {expected} from {len(seeds)} jobs")
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
                k: v
                for k, v in record.items()
                if k not in ("id", "seed_id", "label", "file", "seed_path", "edit_from", "kind")
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
                    "gen_edit_from": record.get("edit_from", ""),
                    # expand, edit or identity (a new face with no seed image)
                    "gen_kind": record.get("kind") or ("edit" if record.get("edit_from") else "expand"),
                    "gif_score": record["gif_score"],
                    "gen_params": json.dumps(params, sort_keys=True),
                }
            )
        frame = pd.DataFrame(rows)
        write_manifest(staging, frame)
        seeds_dataset = read_manifest(settings.data)
        write_contact_sheets(staging, frame, seeds_dataset, int(frame["gen_k"].max()) + 1)
        write_sizing(staging / SIZING_JSON, settings, seeds_dataset)
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


SIZING_JSON = "sizing.json"  # the generation plan per class, beside the merged manifest


def write_sizing(path: Path, settings: GenerateSettings, seeds_dataset) -> None:
    """The generation plan (fersynth.generate.sizing) per class, for the results page: real
    count, what the variants need, the expected acceptance, outputs aimed at, seeds and K."""
    train = seeds_dataset.manifest[seeds_dataset.manifest["split"] == TRAIN_SPLIT]
    plans = generation_plan(settings, train)
    record = {
        "sizing": settings.sizing,
        "variants": settings.variants,
        "rho": settings.rho,
        "copy_twins": copies_wanted(settings),
        "per_class": {
            name: {
                "real": plan.real,
                "needed": plan.needed,
                "acceptance": settings.acceptance_of(name),
                "outputs": plan.outputs,
                "seeds": plan.seeds,
                "k": plan.k,
                "generated": plan.generated,
            }
            for name, plan in plans.items()
        },
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def write_contact_sheets(
    folder: Path, synthetic: pd.DataFrame, seeds_dataset, k: int, seeds_per_class: int = 6
) -> None:
    """One PNG per class: first a row of the new identities prompted with the class, if any;
    then each seed image followed by its K generated images."""
    seed_rows = seeds_dataset.manifest.set_index("id")
    for name in CLASSES:
        group = synthetic[synthetic["label"] == name]
        faces = group[group["gen_kind"] == "identity"]
        group = group[~group["gen_kind"].isin(["identity", COPY_KIND])]  # copy twins: their seed
        rows = []
        if not faces.empty:
            images = [load_image(folder / p) for p in faces["path"].head(k + 1)]
            rows.append((f"{name}: new identities (prompted, before the vote)", images))
        for seed_id in sorted(group["seed_id"].unique())[:seeds_per_class]:
            outputs = group[group["seed_id"] == seed_id].sort_values("gen_k")
            images = [load_image(seeds_dataset.image_path(seed_rows.at[seed_id, "path"]))]
            images += [load_image(folder / p) for p in outputs["path"]]
            source = outputs["gen_edit_from"].iloc[0] if "gen_edit_from" in outputs else ""
            edited = f" (a {source} face edited)" if source else ""
            rows.append((f"{name}: seed {seed_id}{edited} | {len(outputs)} generated", images))
        if rows:
            save_png(folder / f"samples_{name}.png", contact_sheet(rows, columns=k + 1))
