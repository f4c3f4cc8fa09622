"""What `fersynth train --resume` may change, and how a checkpoint resumes elsewhere.

A run is resumed from `checkpoint.pt` with the settings it was started with (`settings.json`).
Settings that only steer how the rest of the run goes may change on resume and are applied,
each named in the log and recorded in `settings.json` (`resumed_with_changes`): the learning
rates and their schedule (the advice after a divergence is "lower train.lr"), the number of
steps, the evaluation, checkpoint and log cadence, gradient clipping, precision, device, loader
threads and torch.compile. Any other change would make the result a different run than its
record says (another architecture, data, batch size, sampler, seed...): it is refused, naming
the key and both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fersynth.errors import FersynthError
from fersynth.settings import flatten

# Dotted keys of {"seed": ..., "train": TrainSettings} that may change on --resume.
SCHEDULE_KEYS = (
    "train.lr",
    "train.warmup_lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.steps",
    "train.mek.lr_scale_batch",
    "train.mek.warmup_steps",
)
APPLIED_ON_RESUME = (
    *SCHEDULE_KEYS,
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.grad_clip",
    "train.precision",
    "train.device",
    "train.workers",
    "train.cpu_threads",
    "train.in_memory",
    "train.compile",
)
# Where the run is written, not what it is: never compared.
IGNORED = ("train.output",)
CHANGES_KEY = "resumed_with_changes"


def settings_changes(saved: dict[str, Any], current: dict[str, Any], output: Path) -> dict[str, list]:
    """{dotted key: [started with, now]} for the settings `current` changes that resume applies
    (APPLIED_ON_RESUME); both mappings are resolved settings ({"seed", "train"}, JSON values).

    Raises FersynthError naming the first other key that differs, with both values."""
    old, new = flatten(saved), flatten(current)
    changes: dict[str, list] = {}
    for key in sorted(set(old) | set(new)):
        if key in IGNORED or key == CHANGES_KEY:
            continue
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key in APPLIED_ON_RESUME:
            changes[key] = [before, after]
            continue
        raise FersynthError(
            f"{output}: --resume with {key} = {json.dumps(after)}, but the run was started with "
            f"{json.dumps(before)}: the result would be a different run; set it back, or start over "
            "with --force (on resume only "
            f"{', '.join(k.removeprefix('train.') for k in APPLIED_ON_RESUME)} may change)"
        )
    return changes


def check_steps(steps: int, reached: int, output: Path) -> None:
    if steps < reached:
        raise FersynthError(
            f"{output}: --resume with train.steps = {steps}, but the checkpoint is at step {reached}: "
            f"give at least {reached} steps, or start over with --force"
        )


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load a GradScaler's state saved by any precision: a checkpoint saved without fp16 holds
    an empty state, which torch refuses ("The source state dict is empty"); the scaler then
    starts afresh, as a new fp16 run does. A disabled scaler (fp32, bf16) needs no state."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)
