"""Pictures a person would rather look at than read: contact sheets and class-count charts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from fersynth.classes import CLASSES
from fersynth.files import atomic_write_bytes

_CAPTION_HEIGHT = 18


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]], tile: int = 64, columns: int = 8
) -> np.ndarray:
    """An RGB grid: one captioned row per (caption, images); missing tiles stay grey."""
    width = columns * tile
    bands = []
    for caption, images in rows:
        band = np.full((_CAPTION_HEIGHT + tile, width, 3), 235, np.uint8)
        cv2.putText(
            band,
            caption,
            (4, _CAPTION_HEIGHT - 5),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (20, 20, 20),
            1,
            cv2.LINE_AA,
        )
        for i, image in enumerate(list(images)[:columns]):
            band[_CAPTION_HEIGHT:, i * tile : (i + 1) * tile] = _tile(image, tile)
        bands.append(band)
    return np.vstack(bands) if bands else np.full((tile, width, 3), 235, np.uint8)


def save_png(path: Path, rgb: np.ndarray) -> Path:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write_bytes(Path(path), buffer.tobytes())
    return Path(path)


def class_count_chart(counts: Mapping[str, Mapping[str, int]], title: str, path: Path) -> Path:
    """Grouped bars: images per class for each split, classes in canonical order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(counts)
    x = np.arange(len(CLASSES))
    width = 0.8 / max(1, len(splits))
    figure, axis = plt.subplots(figsize=(7, 3.2), dpi=110)
    for i, split in enumerate(splits):
        values = [counts[split].get(name, 0) for name in CLASSES]
        bars = axis.bar(x + (i - (len(splits) - 1) / 2) * width, values, width, label=split)
        axis.bar_label(bars, fontsize=7)
    axis.set_xticks(x, CLASSES)
    axis.set_ylabel("images")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return path
