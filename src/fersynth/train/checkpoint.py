"""A run's checkpoints, as timm's CheckpointSaver keeps them: the resume state (everything to
continue bit for bit) every `checkpoint_every` steps, and the best weights by validation.

One resume state is kept (`checkpoint.pt`, replaced atomically: a kill mid-write leaves the
previous one) and one best (`best_weights.pt`); `model.pt` is written from the best at the end.
Files load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fersynth.files import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best_weights.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """The random generators `rng_state` saved: the CPU one always; CUDA's where the checkpoint
    and this machine both have CUDA (a run saved on a GPU resumes on a CPU and back; the data
    order and augmentation come from seeded CPU generators, fersynth.train.data)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) <= torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class Best:
    """The best validation so far: its step, score (train.select_metric) and metrics."""

    step: int = 0
    score: float = -1.0
    metrics: dict[str, Any] | None = None


class CheckpointSaver:
    """Saves and reads the resume state and the best weights of one run folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.best = Best()

    @property
    def resume_file(self) -> Path:
        return self.folder / CHECKPOINT

    def save_resume(self, step: int, model: nn.Module, optimizer, scheduler, scaler) -> None:
        _save(
            self.resume_file,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "best_step": self.best.step,
                "best_score": self.best.score,
                "best_metrics": self.best.metrics or {},
            },
        )

    def load_resume(self) -> dict[str, Any]:
        """The resume state (tensors on the CPU); restores the best-so-far record from it."""
        state = torch.load(self.resume_file, map_location="cpu", weights_only=True)
        self.best = Best(state["best_step"], state["best_score"], state["best_metrics"] or None)
        return state

    def offer(self, step: int, score: float, metrics: dict[str, Any] | None, model: nn.Module) -> bool:
        """Keep the model's weights when `score` beats the best so far; True when it did."""
        if score <= self.best.score:
            return False
        self.best = Best(step, score, metrics)
        _save(self.folder / BEST_WEIGHTS, {"step": step, "model": model.state_dict()})
        return True

    def best_weights(self) -> dict[str, torch.Tensor]:
        return torch.load(self.folder / BEST_WEIGHTS, map_location="cpu", weights_only=True)["model"]
