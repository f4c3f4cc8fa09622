"""Image files of every kind real datasets contain, written by the tests themselves."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]  # the repository: tests/ lies at its top


def face_like(seed: int, size: int = 48, color: bool = True) -> np.ndarray:
    """A random but smooth uint8 image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3) if color else (6, 6), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    return np.asarray(image)


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text`, stripped (alignment rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|:- "):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])  # an escaped pipe stays in its cell
            rows.append([cell.strip() for cell in cells])
    return rows


def write_jpeg(path: Path, pixels: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def write_truncated_jpeg(path: Path, seed: int = 0) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(face_like(seed, 64)).save(buffer, format="JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_rgba_png(path: Path, seed: int = 0) -> Path:
    rgb = face_like(seed, 40)
    alpha = np.full(rgb.shape[:2] + (1,), 128, np.uint8)
    return write_png(path, np.concatenate([rgb, alpha], axis=2))


def write_png16(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A 16-bit grey PNG; returns the 8-bit values it should decode to."""
    grey8 = face_like(seed, 40, color=False)
    grey16 = grey8.astype(np.uint16) * 257  # full 16-bit range
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey16).save(path, format="PNG")
    return path, grey8


def write_cmyk_jpeg(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A CMYK JPEG; returns the RGB image it was made from."""
    rgb = face_like(seed, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG", quality=100)
    return path, rgb


def make_demo_dataset(root: Path, train_size: int, test_size: int) -> Path:
    """Demo faces ingested into a dataset folder at root/ds."""
    from fersynth.demo import write_demo_data
    from fersynth.ingest import run_ingest
    from fersynth.settings import DemoSettings, IngestSettings

    demo = DemoSettings(output=root / "raw", train_size=train_size, test_size=test_size)
    write_demo_data(demo, progress=False)
    ingest = IngestSettings(source="rafdb", input=root / "raw", output=root / "ds")
    run_ingest(ingest, progress=False)
    return root / "ds"


def write_tiny_swinir(path: Path, scale: int = 2) -> Path:
    """A randomly initialised SwinIR saved in the official checkpoint layout {"params": ...}."""
    import torch
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(scale)
    model = SwinIR(
        img_size=16,
        patch_size=1,
        in_chans=3,
        embed_dim=12,
        depths=[2],
        num_heads=[2],
        window_size=4,
        mlp_ratio=2.0,
        upscale=scale,
        img_range=1.0,
        upsampler="pixelshuffle",
        resi_connection="1conv",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": model.state_dict()}, path)
    return path


def tiny_train_settings(data: Path, output: Path, **changes):
    """A few CPU steps of ResNet-18 at 32 px: the smallest real training run."""
    from fersynth.settings import TrainSettings

    values = dict(
        data=data,
        output=output,
        arch="resnet18",
        image_size=32,
        batch_size=8,
        steps=6,
        warmup_steps=2,
        workers=0,
        log_every=2,
        eval_every=3,
        checkpoint_every=3,
        lr=1e-3,
    )
    values.update(changes)
    return TrainSettings(**values)


# Colours that tiny models tell apart in a few dozen steps: class k is colour k.
CLASS_COLOURS = np.array(
    [
        [230, 30, 30],
        [30, 200, 30],
        [30, 30, 230],
        [230, 230, 30],
        [230, 30, 230],
        [30, 230, 230],
        [128, 128, 128],
    ],
    dtype=np.int16,
)


def colour_image(class_index: int, seed: int, size: int = 32) -> np.ndarray:
    """A noisy solid image in the colour of `class_index`."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-25, 26, size=(size, size, 3))
    return np.clip(CLASS_COLOURS[class_index] + noise, 0, 255).astype(np.uint8)


def write_dataset(root: Path, rows: list[dict], images: list[np.ndarray]) -> Path:
    """A dataset folder from rows (id, label, split, and optional origin/seed_id/extra columns)
    and their pixels, through the real manifest writer."""
    import pandas as pd

    from fersynth.dataset import COLUMNS, pixel_hash, write_manifest

    records = []
    for row, pixels in zip(rows, images, strict=True):
        relative = f"images/{row['split']}/{row['id']}.png"
        write_png(root / relative, pixels)
        record = {
            "path": relative,
            "origin": "real",
            "source": "test",
            "source_id": row["id"],
            "seed_id": "",
            "width": pixels.shape[1],
            "height": pixels.shape[0],
            "channels": 3,
            "pixel_hash": pixel_hash(pixels),
        }
        record.update(row)
        records.append(record)
    frame = pd.DataFrame(records)
    frame = frame[list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]].astype(str)
    write_manifest(root, frame)
    return root


def colour_dataset(
    root: Path, per_class: int, test_per_class: int, seed: int = 0, val_per_class: int = 0
) -> Path:
    """Every class in its own colour: train and test splits (and val, when asked)."""
    from fersynth.classes import CLASSES

    rows, images = [], []
    for split, count in (("train", per_class), ("val", val_per_class), ("test", test_per_class)):
        for k, name in enumerate(CLASSES):
            for i in range(count):
                rows.append({"id": f"{split}_{name}_{i}", "label": name, "split": split})
                images.append(colour_image(k, seed * 100_000 + len(rows)))
    return write_dataset(root, rows, images)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600):
    """`fersynth ARGS...` in a subprocess, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "fersynth.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A 68-byte PNG whose header claims width x height pixels (a decompression bomb's shape:
    the decoder would allocate width * height bytes before finding the data missing)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )
    return path
