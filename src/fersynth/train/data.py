"""Images from a manifest as tensors, the thesis transforms, and a resumable sample stream.

Randomness is a function of (seed, sample position): the sampler's order and every image's
augmentation are drawn from generators seeded by it. A run resumed at step k therefore sees
exactly the batches that an uninterrupted run sees, whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from fersynth.classes import CLASS_INDEX
from fersynth.dataset import ImageDecodeError, load_image, safe_join
from fersynth.errors import FersynthError


def _mix(*numbers: int) -> int:
    """One 63-bit seed from several integers (independent streams per sample and epoch)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def train_transform(image_size: int, resize: int, hflip: bool, rotation: float, mean, std):
    """Thesis: resize 256, random crop 224, horizontal flip, rotation 5 degrees, normalise."""
    steps = [
        v2.Resize((resize, resize), interpolation=InterpolationMode.BILINEAR, antialias=True),
        v2.RandomCrop(image_size),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation, interpolation=InterpolationMode.BILINEAR))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def test_transform(image_size: int, resize: int, mean, std):
    """Thesis: resize 256, centre crop 224, normalise."""
    return v2.Compose(
        [
            v2.Resize((resize, resize), interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class ManifestImages(Dataset):
    """Rows of a manifest as (image tensor, class index).

    Indexed either by a row number (evaluation) or by (row, sample position) from
    `SampleStream` (training), in which case the augmentation is seeded by the position.
    """

    def __init__(self, root: Path, frame: pd.DataFrame, transform, seed: int = 0) -> None:
        self.root = Path(root)
        # Checked once here (no path may leave the dataset folder), joined cheaply per item.
        self.paths = [str(safe_join(self.root, path)) for path in frame["path"]]
        unknown = sorted(set(frame["label"]) - set(CLASS_INDEX))
        if unknown:
            raise FersynthError(f"{root}: unknown labels {unknown}")
        self.labels = np.array([CLASS_INDEX[label] for label in frame["label"]], dtype=np.int64)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, position = item if isinstance(item, tuple) else (item, None)
        path = self.paths[index]
        try:
            pixels = load_image(path)
        except ImageDecodeError as exc:
            raise FersynthError(f"{path}: {exc}") from None
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # writable copy
        if position is not None:
            # This worker's CPU RNG, this sample only (torch.manual_seed would also seed every
            # accelerator: 0.3 ms a sample).
            torch.random.default_generator.manual_seed(_mix(self.seed, position))
        return self.transform(image), int(self.labels[index])


class SampleStream(Sampler):
    """An endless, resumable stream of (row, position): epoch-wise shuffles, or class-balanced
    draws (each class equally likely) when `balanced`. Starts at `start` samples in."""

    def __init__(self, labels: np.ndarray, seed: int, balanced: bool = False, start: int = 0):
        self.labels = np.asarray(labels)
        self.seed = seed
        self.balanced = balanced
        self.start = start
        counts = np.bincount(self.labels, minlength=int(self.labels.max()) + 1)
        weights = 1.0 / counts[self.labels]
        self.probabilities = weights / weights.sum()

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(_mix(self.seed, 7919, epoch))
        n = len(self.labels)
        if self.balanced:
            return rng.choice(n, size=n, replace=True, p=self.probabilities)
        return rng.permutation(n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.labels)
        position = self.start
        epoch, offset = divmod(position, n)
        while True:
            order = self.epoch_order(epoch)
            for index in order[offset:]:
                yield int(index), position
                position += 1
            epoch, offset = epoch + 1, 0


IN_MEMORY_LIMIT = 1 << 30  # bytes of decoded images up to which `in_memory: auto` holds them


def use_in_memory(choice: str, count: int, resize: int) -> bool:
    """Whether `InMemoryBatches` serves the training data (`train.in_memory`)."""
    if choice == "auto":
        return count * 3 * resize * resize <= IN_MEMORY_LIMIT
    return choice == "always"


class InMemoryBatches:
    """The training stream for data that fits in memory (FER2013's 48 px faces, the demo).

    Every image is decoded and resized once and kept, as uint8, on the training device; each
    batch is then gathered, cropped, flipped, rotated and normalised there by one
    `grid_sample` call on the whole batch, with no per-image work in worker processes and no
    host-to-device copy of pixels per step (on two CPU cores the per-image path costs about as
    much as ResNet-18's step at 48 px; on a GPU it starves the chip). Same distribution as
    `train_transform` (integer crop offsets, flip with p=0.5, angle uniform in [-rotation,
    rotation], zeros outside, bilinear), not the same pixels. Each batch's draws come from a CPU
    generator seeded by (seed, its first sample position), so resuming is exact and a CPU run
    gives the same bits wherever the pixels live.

    Yields (images float32 [B, 3, image_size, image_size] normalised, labels int64 [B]), both on
    `device`.
    """

    def __init__(
        self,
        images: ManifestImages,
        sampler: SampleStream,
        batch_size: int,
        image_size: int,
        resize: int,
        hflip: bool,
        rotation: float,
        mean,
        std,
        device: torch.device | None = None,
        progress: bool = False,
    ) -> None:
        self.device = device or torch.device("cpu")
        resize_op = v2.Resize((resize, resize), interpolation=InterpolationMode.BILINEAR, antialias=True)
        pixels = torch.empty((len(images), 3, resize, resize), dtype=torch.uint8)
        for index in tqdm(range(len(images)), desc="decode", unit="img", disable=not progress):
            path = images.paths[index]
            try:
                decoded = load_image(path)
            except ImageDecodeError as exc:
                raise FersynthError(f"{path}: {exc}") from None
            pixels[index] = resize_op(torch.from_numpy(np.array(decoded)).permute(2, 0, 1))
        self.pixels = pixels.to(self.device)  # once: at most IN_MEMORY_LIMIT bytes
        self.labels = torch.from_numpy(images.labels).to(self.device)
        self.samples = iter(sampler)
        self.batch_size = batch_size
        self.image_size = image_size
        self.hflip = hflip
        self.rotation = rotation
        self.seed = images.seed
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __iter__(self) -> InMemoryBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = [next(self.samples) for _ in range(self.batch_size)]
        rows = torch.tensor([row for row, _ in drawn]).to(self.device, non_blocking=True)
        generator = torch.Generator().manual_seed(_mix(self.seed, 104729, drawn[0][1]))
        return self.augment(self.pixels[rows], generator), self.labels[rows]

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Crop, flip and rotate `batch` (uint8 [n, 3, side, side]) with draws from `generator`
        (on the CPU: the same draws on every device), then normalise."""
        n, _, side, _ = batch.shape
        size = self.image_size
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else None
        angle = (torch.rand(n, generator=generator) * 2 - 1) * self.rotation
        offsets = torch.randint(0, side - size + 1, (n, 2), generator=generator).float() + size / 2
        angle, offsets = angle.to(batch.device), offsets.to(batch.device)
        # Output pixel centres relative to the crop centre, in input pixels.
        centres = torch.arange(size, dtype=torch.float32, device=batch.device) + 0.5 - size / 2
        v, u = torch.meshgrid(centres, centres, indexing="ij")
        u, v = u.expand(n, size, size), v.expand(n, size, size)
        if flip is not None:
            u = torch.where(flip.to(batch.device).view(n, 1, 1), -u, u)
        cos, sin = (
            torch.cos(torch.deg2rad(angle)).view(n, 1, 1),
            torch.sin(torch.deg2rad(angle)).view(n, 1, 1),
        )
        u, v = cos * u - sin * v, sin * u + cos * v
        x = u + offsets[:, 0].view(n, 1, 1)
        y = v + offsets[:, 1].view(n, 1, 1)
        grid = torch.stack([x / side * 2 - 1, y / side * 2 - 1], dim=-1)  # align_corners=False
        out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (out / 255 - self.mean) / self.std
