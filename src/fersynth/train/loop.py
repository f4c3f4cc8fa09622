"""`fersynth train`: supervised learning or MEK on a dataset folder, resumable and exact.

The output folder holds `model.pt` (the best weights by validation, ready for evaluate and
predict), `checkpoint.pt` (everything needed to resume), `train_log.jsonl`,
`train_summary.json`, `val_ids.csv` and `settings.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from fersynth.augment import REPORT_JSON as AUGMENT_REPORT
from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, VAL_SPLIT, read_manifest
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.memory import batch_fits
from fersynth.parallel import torch_threads
from fersynth.settings import TrainSettings, resolved_dict, save_resolved
from fersynth.skipped import write_skipped
from fersynth.train.checkpoint import CHECKPOINT, CheckpointSaver, restore_rng
from fersynth.train.data import (
    InMemoryBatches,
    ManifestImages,
    SampleStream,
    train_transform,
    use_in_memory,
)
from fersynth.train.inference import compute_metrics, pick_device, predict_probabilities
from fersynth.train.losses import mek_class_weights
from fersynth.train.models import (
    MODEL_FILE,
    ModelSpec,
    create_model,
    default_resize,
    save_model,
)
from fersynth.train.objectives import Mek, Supervised
from fersynth.train.resume import (
    CHANGES_KEY,
    SCHEDULE_KEYS,
    check_steps,
    restore_scaler,
    settings_changes,
)

log = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"
SUMMARY = "train_summary.json"
SPEED_FILE = "train_speed.jsonl"  # images/s per log window (left out of DVC hashes)
APPENDED = (LOG_FILE, SPEED_FILE)  # the files the loop appends a line to per step logged


@dataclass
class TrainResult:
    output: Path
    steps: int
    best_step: int
    best_metrics: dict[str, Any] | None
    images_per_second: float
    skipped: str | None = None  # why nothing was trained (`skip_if_empty`); None when it trained
    settings: TrainSettings | None = None  # as run: the device's "auto" values resolved


def validation_curve(output: Path, batch_size: int) -> list[dict[str, float]]:
    """A run's validation accuracy against images seen, from its `train_log.jsonl` (accuracy in
    %): [{"images_seen", "val_accuracy", "val_mean_accuracy"}], one per `eval_every`."""
    rows = [json.loads(line) for line in (Path(output) / LOG_FILE).read_text().splitlines() if line]
    return [
        {
            "images_seen": row["step"] * batch_size,
            "val_accuracy": round(row["val_accuracy"] * 100, 2),
            "val_mean_accuracy": round(row["val_mean_accuracy"] * 100, 2),
        }
        for row in rows
        if "val_accuracy" in row
    ]


def split_validation(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): the dataset's own splits. The validation split is drawn once, upstream, by
    `fersynth ingest` (fersynth.splits), so every row selects on the same real images; no row
    holds out images of its own (a synthetic one would validate)."""
    train = frame[frame["split"] == TRAIN_SPLIT]
    val = frame[frame["split"] == VAL_SPLIT]
    synthetic = val[val["origin"] == "synthetic"] if "origin" in val.columns else val.iloc[:0]
    if not synthetic.empty:
        raise FersynthError(
            f"split 'val' holds {len(synthetic)} synthetic images (e.g. {synthetic['path'].iloc[0]}): "
            "validation must be real images only"
        )
    return train, val


def effective_rates(settings: TrainSettings) -> dict[str, float | int]:
    """The learning rates and warm-up a run really uses. MEK runs follow `train.mek`: with
    `lr_scale_batch` (the official code: 512) lr, warmup_lr and min_lr are multiplied by
    batch_size / lr_scale_batch (5e-4 at batch 32 -> 3.125e-5), and `warmup_steps` replaces
    train.warmup_steps; SL runs use train.* as given."""
    factor, warmup = 1.0, settings.warmup_steps
    if settings.method == "mek":
        if settings.mek.lr_scale_batch is not None:
            factor = settings.batch_size / settings.mek.lr_scale_batch
        if settings.mek.warmup_steps is not None:
            warmup = settings.mek.warmup_steps
    return {
        "lr": settings.lr * factor,
        "warmup_lr": settings.warmup_lr * factor,
        "min_lr": settings.min_lr * factor,
        "warmup_steps": warmup,
    }


def mek_weight_counts(data: Path, train_frame: pd.DataFrame, choice: str) -> tuple[list[int], str]:
    """The per-class counts MEK's class weights come from (`train.mek.class_weights_from`, in
    canonical class order) and where they were read. "original": a dataset written by `fersynth
    augment` carries its original training counts in augment_report.json (per_class.<class>.
    original; a synthetic-only variant has no real training image to count), any other dataset is
    the original and its training split is counted; "own": the training split, whatever it is."""
    own = [int((train_frame["label"] == name).sum()) for name in CLASSES]
    report = Path(data) / AUGMENT_REPORT
    if choice == "own":
        return own, "train split"
    if not report.is_file():
        origins = train_frame["origin"] if "origin" in train_frame.columns else pd.Series(dtype=str)
        if (origins == "synthetic").any():
            raise FersynthError(
                f"{report}: not found, and {data} trains on synthetic images, so the original "
                "counts for MEK's class weights are unknown (write the dataset with `fersynth "
                "augment`, or set train.mek.class_weights_from: own, or pin train.mek.class_weights)"
            )
        return own, "train split"
    try:
        per_class = json.loads(report.read_text(encoding="utf-8"))["per_class"]
        counts = [per_class[name]["original"] for name in CLASSES]
        if not all(type(n) is int and n >= 0 for n in counts) or not sum(counts):
            raise ValueError("not counts")
    except (OSError, ValueError, KeyError, TypeError):
        raise FersynthError(
            f"{report}: malformed: MEK's class weights (train.mek.class_weights_from: original) "
            "need per_class.<class>.original, a count, for every class"
        ) from None
    return counts, AUGMENT_REPORT


def _mek_weights(settings: TrainSettings, train_frame: pd.DataFrame) -> tuple[torch.Tensor | None, dict]:
    """MEK's class weights w_c (None for SL) and the record of where they came from (written to
    model.pt, train_summary.json and MLflow tags): pinned, or from `mek_weight_counts`."""
    if settings.method != "mek":
        return None, {}
    if settings.mek.class_weights:
        class_weights = torch.tensor(settings.mek.class_weights)
        weights_info: dict[str, Any] = {"mek_class_weights_from": "pinned"}
    else:
        choice = settings.mek.class_weights_from
        weight_counts, source = mek_weight_counts(settings.data, train_frame, choice)
        class_weights = mek_class_weights(weight_counts)
        weights_info = {
            "mek_class_weights_from": choice,
            "mek_class_weight_counts_source": source,
            "mek_class_weight_counts": dict(zip(CLASSES, weight_counts, strict=True)),
        }
        log.info("MEK class weights from %s counts (%s)", choice, source)
    weights_info["mek_class_weights"] = [round(float(w), 4) for w in class_weights]
    return class_weights, weights_info


def _precision(settings: TrainSettings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    choice = settings.precision
    if choice == "auto":
        choice = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def _logged_step(line: str) -> float:
    """The step a log line is about; infinity for a line torn by a kill mid-write."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _drop_logged_after(output: Path, step: int) -> None:
    """Keep only the log lines of steps up to `step` (the checkpoint's). A run killed after
    its last checkpoint has logged steps that the resumed run trains, and logs, again."""
    for name in APPENDED:
        path = output / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) <= step]
        if kept != lines:
            atomic_write_text(path, "".join(kept))


def _logged_speed(output: Path) -> float:
    """The mean images/s of the run's logged windows: a resumed run that had nothing left to
    train (resumed to log it to MLflow again) reports the speed it trained at."""
    path = output / SPEED_FILE
    if not path.is_file():
        return 0.0
    speeds = [
        json.loads(line)["images_per_s"] for line in path.read_text(encoding="utf-8").splitlines() if line
    ]
    return float(np.mean(speeds)) if speeds else 0.0


def _prepare_output(output: Path, resume: bool, force: bool) -> bool:
    """Make the output folder ready; True when a checkpoint is there to resume from."""
    checkpoint = output / CHECKPOINT
    if output.exists() and any(output.iterdir()):
        if force:
            shutil.rmtree(output)
        elif resume:
            if checkpoint.is_file():
                return True
            log.warning("%s: no checkpoint to resume from; starting from step 0", output)
        else:
            raise FersynthError(
                f"{output}: already holds a training run (pass --resume to continue it, "
                "or --force to start over)"
            )
    output.mkdir(parents=True, exist_ok=True)
    return False


def device_settings(settings: TrainSettings, device: torch.device) -> TrainSettings:
    """`settings` with the "auto" values that depend on the device resolved (what the run saves
    in settings.json): on a CPU 2 torch threads (a table's bits depend on the thread count,
    docs/testing.md#reproducibility), 4 DataLoader workers and no torch.compile; on CUDA every
    core for torch, the cores less two (at most 16) for the DataLoader, and torch.compile when a
    C compiler is there to build its kernels."""
    cuda = device.type == "cuda"
    update: dict[str, Any] = {}
    if settings.cpu_threads == "auto":
        update["cpu_threads"] = 0 if cuda else 2
    if settings.workers == "auto":
        update["workers"] = min(16, max(1, (os.cpu_count() or 2) - 2)) if cuda else 4
    if settings.compile == "auto":
        update["compile"] = cuda and c_compiler() is not None
    return settings.model_copy(update=update)


def c_compiler() -> str | None:
    """The C compiler torch.compile's kernels are built with (Triton's launcher on CUDA,
    Inductor's C++ on a CPU), or None when none is on PATH (a slim image has none)."""
    return next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)


def check_compiler(settings: TrainSettings) -> None:
    """`train.compile: true` with no C compiler would fail at the first step, after loading and
    decoding: said at once instead. (`auto` just stays off without one.)"""
    if settings.compile is True and c_compiler() is None:
        raise FersynthError(
            "train.compile: true, but no C compiler (cc, gcc, clang) is on PATH, and torch.compile "
            "builds its kernels with one: install gcc, or set train.compile=false (or auto)"
        )


def run_train(
    settings: TrainSettings,
    *,
    seed: int = 2048,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    skip_if_empty: bool = False,
) -> TrainResult:
    """Train, validate every `eval_every` steps, keep the best weights. `skip_if_empty`: a
    dataset without training images (a synthetic-only set whose vote accepted nothing) writes a
    skipped record (fersynth.skipped) instead of failing. The device's "auto" settings are
    resolved first (`device_settings`), and torch runs on `cpu_threads` threads."""
    output = Path(settings.output)
    dataset = read_manifest(settings.data)
    train_frame, val_frame = split_validation(dataset.manifest)
    if settings.fold is not None:  # a cross-fitted voter: never trains on the fold it judges
        from fersynth.folds import fold_of

        held_out, folds = settings.fold
        train_frame = train_frame[fold_of(train_frame, folds) != held_out]
    if val_frame.empty:
        log.warning(
            "%s: no validation split; the last step's weights are kept "
            "(ingest draws one: ingest.val_fraction)",
            settings.data,
        )
    if train_frame.empty:
        reason = f"{settings.data}: no training images (split 'train')"
        if not skip_if_empty:
            raise FersynthError(reason)
        settings_record = {"seed": seed, "train": settings}
        write_skipped(output, reason, settings_record, force=force or resume, data=str(settings.data))
        return TrainResult(output, 0, 0, None, 0.0, skipped=reason)
    # The device only now: a row with nothing to train is recorded as skipped on any machine.
    device = pick_device(settings.device)
    settings = device_settings(settings, device)
    check_compiler(settings)
    with torch_threads(settings.cpu_threads):
        return _train(settings, device, seed, resume, force, progress, dataset, train_frame, val_frame)


def _train(settings, device, seed, resume, force, progress, dataset, train_frame, val_frame) -> TrainResult:
    """`run_train` once its rows are known and its device settings resolved: setup, the loop of
    `train_steps` between log, validation and checkpoint events, the best weights saved."""
    output = Path(settings.output)
    counts = [int((train_frame["label"] == name).sum()) for name in CLASSES]
    class_weights, weights_info = _mek_weights(settings, train_frame)
    resuming = _prepare_output(output, resume, force)
    record = {"seed": seed, "train": settings}
    changes: dict[str, list] = {}
    if resuming:  # before any work: a refused change costs nothing
        saved_record = json.loads((output / "settings.json").read_text(encoding="utf-8"))
        changes = settings_changes(saved_record, resolved_dict(record), output)
        previous = saved_record.get(CHANGES_KEY, [])

    dtype = _precision(settings, device)
    spec = ModelSpec(
        arch=settings.arch,
        image_size=settings.image_size,
        resize=settings.resize or default_resize(settings.image_size),
        mean=settings.mean,
        std=settings.std,
        window_size=settings.window_size,
        in_chans=settings.in_chans,
        train_counts=dict(zip(CLASSES, counts, strict=True)),
    )
    torch.manual_seed(seed)
    model = create_model(spec, settings.pretrained).to(device)
    # channels_last pays on GPUs and on CPUs too (oneDNN: ResNet-18 at 48 px, batch 128, two
    # cores, 152 against 120 images/s).
    memory_format = torch.channels_last if settings.channels_last else None
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    rates = effective_rates(settings)
    optimizer, scheduler = _optimizer_and_schedule(model, settings, rates)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    objective = (
        Supervised(settings.label_smoothing)
        if class_weights is None
        else Mek(class_weights.to(device), settings.mek.smoothing, settings.mek.attention_weight)
    )
    if settings.compile:  # the whole objective, SL or MEK (MEK's two views and maps included)
        objective = torch.compile(objective.__call__)

    saver = CheckpointSaver(output)
    step = 0
    if resuming:
        state = saver.load_resume()
        check_steps(settings.steps, state["step"], output)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if any(key in SCHEDULE_KEYS for key in changes):
            # The schedule is the new settings' from this step on (the scheduler built above from
            # them); the checkpoint's would bring the old rates back.
            for group in optimizer.param_groups:
                group["initial_lr"] = rates["lr"]
        else:
            scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state["scaler"])
        step = state["step"]
        _drop_logged_after(output, step)
        log.info("resuming %s at step %d", output, step)
        if changes:
            said = ", ".join(f"{key} {json.dumps(a)} -> {json.dumps(b)}" for key, (a, b) in changes.items())
            log.warning("%s: resumed at step %d with changed settings, from here: %s", output, step, said)
            save_resolved({**record, CHANGES_KEY: [*previous, {"step": step, **changes}]}, output)
    else:
        save_resolved(record, output)
        atomic_write_text(output / "val_ids.csv", val_frame[["id"]].to_csv(index=False))
        for name in APPENDED:  # a run started over (--resume without a checkpoint) logs anew
            (output / name).unlink(missing_ok=True)

    batches = _batches(settings, spec, dataset.root, train_frame, seed, step, device, progress)
    if resuming:
        restore_rng(state["rng"])

    bar = tqdm(
        total=settings.steps, initial=step, desc=f"train {settings.method}", unit="step", disable=not progress
    )
    total_images, total_time = 0, 0.0
    window_images, window_seconds = 0, 0.0  # the log window so far (a validation may split it)
    step_state = _StepState(
        model, objective, optimizer, scheduler, scaler, device, dtype, memory_format, settings.grad_clip
    )
    # Speed lives in its own file, which .dvcignore leaves out of the output's hash: the rest of
    # the folder is the same bytes on every run of the same settings.
    with (
        (output / LOG_FILE).open("a", encoding="utf-8") as log_file,
        (output / SPEED_FILE).open("a", encoding="utf-8") as speed_file,
        batch_fits(
            "train",
            f"a {settings.method.upper()} batch of {settings.batch_size} images at {spec.image_size} px",
            device,
            [f"train.batch_size (now {settings.batch_size})", f"train.image_size (now {spec.image_size})"],
        ),
    ):
        model.train()
        while step < settings.steps:
            # Up to the next event: a log line, a validation or a checkpoint (or the end).
            stop = min(
                _next_multiple(step, every)
                for every in (settings.log_every, settings.eval_every, settings.checkpoint_every)
            )
            done = train_steps(step_state, batches, step, min(stop, settings.steps), bar)
            step = done["step"]
            window_images, window_seconds = window_images + done["images"], window_seconds + done["seconds"]
            if step % settings.log_every == 0 or step == settings.steps:
                speed = window_images / max(window_seconds, 1e-9)
                total_images, total_time = total_images + window_images, total_time + window_seconds
                window_images, window_seconds = 0, 0.0
                record_line = {"step": step, "loss": done["loss"], "lr": optimizer.param_groups[0]["lr"]}
                log_file.write(json.dumps({**record_line, **done["parts"]}) + "\n")
                log_file.flush()
                speed_file.write(json.dumps({"step": step, "images_per_s": round(speed, 1)}) + "\n")
                speed_file.flush()
                bar.set_postfix(loss=f"{done['loss']:.3f}", img_s=f"{speed:.0f}")
            if step % settings.eval_every == 0 or step == settings.steps:
                metrics = validate(model, spec, dataset.root, val_frame, settings.batch_size, device)
                if metrics:
                    val_line = {
                        "step": step,
                        "val_accuracy": metrics["accuracy"],
                        "val_mean_accuracy": metrics["mean_accuracy"],
                    }
                    log_file.write(json.dumps(val_line) + "\n")
                saver.offer(step, metrics[settings.select_metric] if metrics else float(step), metrics, model)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                saver.save_resume(step, model, optimizer, scheduler, scaler)
    bar.close()

    model.load_state_dict(saver.best_weights())
    best = saver.best
    save_model(
        output / MODEL_FILE,
        model,
        spec,
        extra={"method": settings.method, "step": best.step, **weights_info},
    )
    speed = total_images / total_time if total_time else _logged_speed(output)
    summary = {
        "method": settings.method,
        "arch": settings.arch,
        "steps": settings.steps,
        "best_step": best.step,
        "select_metric": settings.select_metric,
        "val_metrics": best.metrics
        and {k: best.metrics[k] for k in ("accuracy", "mean_accuracy", "per_class_accuracy")},
        "train_counts": spec.train_counts,
        "val_images": len(val_frame),
        "device": str(device),
        "precision": str(dtype).replace("torch.", "") if dtype else "float32",
        "cpu_threads": torch.get_num_threads(),  # train.cpu_threads, or torch's choice here for 0
        "effective_lr": rates,  # the rates the optimiser and scheduler really used
        **weights_info,
    }
    atomic_write_text(output / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return TrainResult(output, step, best.step, best.metrics, speed, settings=settings)


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def _optimizer_and_schedule(model: torch.nn.Module, settings: TrainSettings, rates: dict[str, Any]):
    """AdamW and a linear warm-up, then one cosine from the peak to min_lr at the last step."""
    if rates["lr"] != settings.lr or rates["warmup_steps"] != settings.warmup_steps:
        log.info(
            "MEK rates (train.mek): lr %.4g, warmup_lr %.4g, min_lr %.4g, warm-up %d steps",
            rates["lr"],
            rates["warmup_lr"],
            rates["min_lr"],
            rates["warmup_steps"],
        )
    # One fused kernel for every parameter on CUDA (torch's for-each on a CPU would change the
    # float summation order, and with it a CPU table's bits).
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    optimizer = create_optimizer_v2(
        model, "adamw", lr=rates["lr"], weight_decay=settings.weight_decay, **fused
    )
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, settings.steps - rates["warmup_steps"]),
        lr_min=rates["min_lr"],
        warmup_t=rates["warmup_steps"],
        warmup_lr_init=rates["warmup_lr"],
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def _batches(
    settings: TrainSettings, spec: ModelSpec, root: Path, frame, seed: int, step: int, device, progress
):
    """The training batches from `step` on: decoded once and augmented whole on the device
    (in memory), or through a DataLoader."""
    transform = train_transform(
        spec.image_size, spec.resize, settings.hflip, settings.rotation, spec.mean, spec.std
    )
    images = ManifestImages(root, frame, transform, seed=seed)
    sampler = SampleStream(images.labels, seed, settings.balanced_sampler, start=step * settings.batch_size)
    if use_in_memory(settings.in_memory, len(images), spec.resize):
        return InMemoryBatches(
            images,
            sampler,
            settings.batch_size,
            spec.image_size,
            spec.resize,
            settings.hflip,
            settings.rotation,
            spec.mean,
            spec.std,
            device=device,
            progress=progress,
        )
    loader = DataLoader(
        images,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if settings.workers else None,  # batches ready while the device steps
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


@dataclass
class _StepState:
    """What a training step works on."""

    model: torch.nn.Module
    objective: Any
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format | None
    grad_clip: float | None


def train_steps(state: _StepState, batches, start: int, stop: int, bar=None) -> dict[str, Any]:
    """Steps `start` .. `stop` - 1: the batch to the device, the learning rate of the step, the
    objective under autocast, backward (scaled for fp16), clipping, the optimizer step. Nothing
    in a step waits for the device; the loss is read once, at `stop` (a log, validation or
    checkpoint step).

    Returns {"step": stop, "loss": the last step's loss (a float), "parts": the objective's
    logged parts, "images": images trained, "seconds": the time they took}. Raises
    FersynthError when the loss stops being finite."""
    images, began = 0, time.perf_counter()
    loss, parts = None, {}
    # The first step whose loss was not finite, kept on the device: reading the loss every step
    # would make the host wait for the accelerator every step. It is read once, at `stop`,
    # before anything is validated or saved, so no weights trained past it are ever kept.
    diverged = torch.full((), -1, dtype=torch.long, device=state.device)
    for step in range(start, stop):
        x, y = next(batches)
        x, y = x.to(state.device, non_blocking=True), y.to(state.device, non_blocking=True)
        if state.memory_format is not None:
            x = x.contiguous(memory_format=state.memory_format)
        state.scheduler.step_update(step)
        with torch.autocast(
            state.device.type, dtype=state.dtype or torch.float32, enabled=state.dtype is not None
        ):
            loss, parts = state.objective(state.model, x, y)
        diverged = torch.where((diverged < 0) & ~torch.isfinite(loss.detach()), step, diverged)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if state.grad_clip:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        images += x.shape[0]
        if bar is not None:
            bar.update(1)
    first_bad = int(diverged)  # the window's one wait for the device
    if first_bad >= 0:
        raise FersynthError(
            f"training diverged at step {first_bad} (its loss was not finite); "
            "lower train.lr (--resume applies it) or use train.precision=bf16"
        )
    last_loss = round(loss.item(), 5)
    return {
        "step": stop,
        "loss": last_loss,
        "parts": {k: round(v.item(), 5) for k, v in parts.items()},
        "images": images,
        "seconds": time.perf_counter() - began,  # after the device caught up (the reads above)
    }


def validate(
    model: torch.nn.Module, spec: ModelSpec, root: Path, frame, batch_size: int, device
) -> dict[str, Any] | None:
    """Metrics (fersynth.train.inference.compute_metrics) of `model` on the validation rows,
    without flip test-time augmentation; None without a validation split. The model is left in
    the mode it was in (predict_probabilities restores it)."""
    if frame.empty:
        return None
    probs = predict_probabilities(
        model, spec, root, frame, batch_size=max(64, batch_size), device=device, tta_flip=False
    )
    y_true = np.array([CLASSES.index(v) for v in frame["label"]])
    return compute_metrics(y_true, probs.argmax(axis=1))
