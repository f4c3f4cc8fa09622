"""`fersynth train`: supervised learning or MEK on a dataset folder, resumable and exact.

The output folder holds `model.pt` (the best weights by validation, ready for evaluate and
predict), `checkpoint.pt` (everything needed to resume), `train_log.jsonl`,
`train_summary.json`, `val_ids.csv` and `settings.json`.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from fersynth.augment import REPORT_JSON as AUGMENT_REPORT
from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, VAL_SPLIT, read_manifest
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_bytes, atomic_write_text
from fersynth.memory import batch_fits
from fersynth.parallel import pins_torch_threads
from fersynth.settings import TrainSettings, resolved_dict, save_resolved
from fersynth.skipped import write_skipped
from fersynth.train.data import (
    InMemoryBatches,
    ManifestImages,
    SampleStream,
    train_transform,
    use_in_memory,
)
from fersynth.train.inference import compute_metrics, pick_device, predict_probabilities
from fersynth.train.losses import (
    attention_consistency,
    mek_class_weights,
    rebalanced_targets,
    soft_cross_entropy,
)
from fersynth.train.models import (
    MODEL_FILE,
    ModelSpec,
    class_activation_maps,
    create_model,
    default_resize,
    save_model,
)
from fersynth.train.resume import (
    CHANGES_KEY,
    SCHEDULE_KEYS,
    check_steps,
    restore_rng,
    restore_scaler,
    settings_changes,
)

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best_weights.pt"
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


def _precision(settings: TrainSettings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    choice = settings.precision
    if choice == "auto":
        choice = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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


@pins_torch_threads
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
    skipped record (fersynth.skipped) instead of failing."""
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
    counts = [int((train_frame["label"] == name).sum()) for name in CLASSES]
    class_weights, weights_info = None, {}
    if settings.method == "mek":
        # Recorded in model.pt and train_summary.json (and MLflow tags): which counts gave w_c.
        pinned = settings.mek.class_weights
        if pinned:
            class_weights = torch.tensor(pinned)
            weights_info = {"mek_class_weights_from": "pinned"}
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
    resuming = _prepare_output(output, resume, force)
    record = {"seed": seed, "train": settings}
    changes: dict[str, list] = {}
    if resuming:  # before any work: a refused change costs nothing
        saved_record = json.loads((output / "settings.json").read_text(encoding="utf-8"))
        changes = settings_changes(saved_record, resolved_dict(record), output)
        previous = saved_record.get(CHANGES_KEY, [])

    device = pick_device(settings.device)
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
    if rates["lr"] != settings.lr or rates["warmup_steps"] != settings.warmup_steps:
        log.info(
            "MEK rates (train.mek): lr %.4g, warmup_lr %.4g, min_lr %.4g, warm-up %d steps",
            rates["lr"],
            rates["warmup_lr"],
            rates["min_lr"],
            rates["warmup_steps"],
        )
    optimizer = create_optimizer_v2(model, "adamw", lr=rates["lr"], weight_decay=settings.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        # Linear warm-up, then one cosine from the peak to min_lr at the last step.
        t_initial=max(1, settings.steps - rates["warmup_steps"]),
        lr_min=rates["min_lr"],
        warmup_t=rates["warmup_steps"],
        warmup_lr_init=rates["warmup_lr"],
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if class_weights is not None:
        class_weights = class_weights.to(device)

    step, best_step, best_score, best_metrics = 0, 0, -1.0, None
    if resuming:
        state = torch.load(output / CHECKPOINT, map_location="cpu", weights_only=True)
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
        step, best_step, best_score = state["step"], state["best_step"], state["best_score"]
        best_metrics = state["best_metrics"] or None
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

    transform = train_transform(
        spec.image_size, spec.resize, settings.hflip, settings.rotation, spec.mean, spec.std
    )
    images = ManifestImages(dataset.root, train_frame, transform, seed=seed)
    sampler = SampleStream(images.labels, seed, settings.balanced_sampler, start=step * settings.batch_size)
    if use_in_memory(settings.in_memory, len(images), spec.resize):
        batches = InMemoryBatches(
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
    else:
        loader = DataLoader(
            images,
            batch_size=settings.batch_size,
            sampler=sampler,
            num_workers=settings.workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        batches = iter(loader)
    if resuming:
        restore_rng(state["rng"])

    def evaluate_val() -> dict[str, Any] | None:
        if val_frame.empty:
            return None
        probs = predict_probabilities(
            model,
            spec,
            dataset.root,
            val_frame,
            batch_size=max(64, settings.batch_size),
            device=device,
            tta_flip=False,
        )
        y_true = np.array([CLASSES.index(v) for v in val_frame["label"]])
        return compute_metrics(y_true, probs.argmax(axis=1))

    def checkpoint() -> None:
        _save(
            output / CHECKPOINT,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "best_step": best_step,
                "best_score": best_score,
                "best_metrics": best_metrics or {},
            },
        )

    model.train()
    bar = tqdm(
        total=settings.steps,
        initial=step,
        desc=f"train {settings.method}",
        unit="step",
        disable=not progress,
    )
    window_start, window_images, total_images, total_time = time.perf_counter(), 0, 0, 0.0
    # Speed lives in its own file, which .dvcignore leaves out of the output's hash: the rest of
    # the folder is the same bytes on every run of the same settings.
    with (
        (output / LOG_FILE).open("a", encoding="utf-8") as log_file,
        (output / SPEED_FILE).open("a", encoding="utf-8") as speed_file,
        batch_fits(
            "train",
            f"a {settings.method.upper()} batch of {settings.batch_size} images at {spec.image_size} px",
            device,
            [
                f"train.batch_size (now {settings.batch_size})",
                f"train.image_size (now {spec.image_size})",
            ],
        ),
    ):
        while step < settings.steps:
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            scheduler.step_update(step)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if class_weights is None:
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=settings.label_smoothing)
                    parts = {}
                else:
                    batch = x.shape[0]
                    features = model.forward_features(torch.cat([x, x.flip(dims=(3,))]))
                    logits = model.forward_head(features)[:batch]
                    maps = class_activation_maps(model, features)
                    targets = rebalanced_targets(y, class_weights, settings.mek.smoothing)
                    rsl = soft_cross_entropy(logits, targets)
                    rac = attention_consistency(maps[:batch], maps[batch:], class_weights)
                    loss = rsl + settings.mek.attention_weight * rac
                    parts = {"loss_rsl": rsl.detach(), "loss_rac": rac.detach()}
            if not torch.isfinite(loss):
                raise FersynthError(
                    f"training diverged at step {step} (loss {float(loss)}); "
                    "lower train.lr or use train.precision=bf16"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            window_images += x.shape[0]
            bar.update(1)

            if step % settings.log_every == 0 or step == settings.steps:
                elapsed = time.perf_counter() - window_start
                speed = window_images / max(elapsed, 1e-9)
                total_images, total_time = total_images + window_images, total_time + elapsed
                record = {
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "lr": optimizer.param_groups[0]["lr"],
                    **{k: round(v.item(), 5) for k, v in parts.items()},
                }
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                speed_file.write(json.dumps({"step": step, "images_per_s": round(speed, 1)}) + "\n")
                speed_file.flush()
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.0f}")
                window_start, window_images = time.perf_counter(), 0
            if step % settings.eval_every == 0 or step == settings.steps:
                validation_start = time.perf_counter()
                metrics = evaluate_val()
                score = metrics[settings.select_metric] if metrics else float(step)
                if metrics:
                    log_file.write(
                        json.dumps(
                            {
                                "step": step,
                                "val_accuracy": metrics["accuracy"],
                                "val_mean_accuracy": metrics["mean_accuracy"],
                            }
                        )
                        + "\n"
                    )
                if score > best_score:
                    best_step, best_score, best_metrics = step, score, metrics
                    _save(output / BEST_WEIGHTS, {"step": step, "model": model.state_dict()})
                # Validation time is not training time: move the window's start past it (the
                # window's images so far stay counted against the training time before it).
                window_start += time.perf_counter() - validation_start
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                checkpoint()
    bar.close()

    best = torch.load(output / BEST_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    save_model(
        output / MODEL_FILE,
        model,
        spec,
        extra={"method": settings.method, "step": best_step, **weights_info},
    )
    speed = total_images / total_time if total_time else _logged_speed(output)
    summary = {
        "method": settings.method,
        "arch": settings.arch,
        "steps": settings.steps,
        "best_step": best_step,
        "select_metric": settings.select_metric,
        "val_metrics": best_metrics
        and {k: best_metrics[k] for k in ("accuracy", "mean_accuracy", "per_class_accuracy")},
        "train_counts": spec.train_counts,
        "val_images": len(val_frame),
        "device": str(device),
        "precision": str(dtype).replace("torch.", "") if dtype else "float32",
        "cpu_threads": torch.get_num_threads(),  # train.cpu_threads, or torch's choice here for 0
        "effective_lr": rates,  # the rates the optimiser and scheduler really used
        **weights_info,
    }
    atomic_write_text(output / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return TrainResult(output, step, best_step, best_metrics, speed)
