"""Import candidates into a dataset folder: decode, crop, hash and write, in worker processes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fersynth.dataset import ImageDecodeError, decode_image_info, encode_image, pixel_hash
from fersynth.errors import FersynthError
from fersynth.ingest.items import Candidate, Rejection

IMAGES_DIR = "images"
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class WriteOptions:
    folder: Path
    source: str
    image_format: str
    jpeg_quality: int


def parse_pixels(text: str, shape: tuple[int, int]) -> np.ndarray:
    """FER2013's space-separated grey values -> uint8 H x W."""
    try:
        values = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):  # a word, or a number past int64
        raise ImageDecodeError("pixels are not all integers in 0..255", "bad_pixels") from None
    expected = shape[0] * shape[1]
    if values.size != expected:
        raise ImageDecodeError(f"expected {expected} pixel values, got {values.size}", "bad_pixels")
    if values.min() < 0 or values.max() > 255:
        raise ImageDecodeError("pixel values outside 0..255", "bad_pixels")
    return values.astype(np.uint8).reshape(shape)


def crop_box(pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Crop (x, y, width, height), clamped to the image; empty after clamping is an error."""
    x, y, w, h = box
    height, width = pixels.shape[:2]
    left, top = max(0, int(round(x))), max(0, int(round(y)))
    right, bottom = min(width, int(round(x + w))), min(height, int(round(y + h)))
    if right - left < 2 or bottom - top < 2:
        raise ImageDecodeError(f"face box {box} lies outside the {width}x{height} image", "bad_face_box")
    return pixels[top:bottom, left:right]


def _is_plain_jpeg(data: bytes) -> bool:
    """A JPEG whose bytes can be kept as they are: 8-bit grey or RGB, not rotated by EXIF."""
    if not data.startswith(b"\xff\xd8"):
        return False
    with Image.open(io.BytesIO(data)) as image:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        return image.format == "JPEG" and image.mode in ("L", "RGB") and orientation == 1


def import_one(item: Candidate | Rejection, options: WriteOptions) -> dict[str, Any] | Rejection:
    """A manifest row for a candidate written into the folder, or the reason it was not."""
    if isinstance(item, Rejection):
        return item
    data: bytes | None = None
    composited = False
    try:
        if item.pixels is not None:
            assert item.pixel_shape is not None
            pixels = parse_pixels(item.pixels, item.pixel_shape)
        else:
            assert item.file is not None
            if item.within is not None:
                _check_within(Path(item.file), Path(item.within))
            try:
                data = Path(item.file).read_bytes()
            except FileNotFoundError:
                raise ImageDecodeError("file not found", "missing_file") from None
            except OSError as exc:
                raise ImageDecodeError(f"cannot read ({exc.strerror or exc})", "unreadable") from None
            pixels, composited = decode_image_info(data)
            if item.crop is not None:
                pixels = crop_box(pixels, item.crop)
        if data is not None and item.crop is None and _is_plain_jpeg(data):
            extension, payload = "jpg", data  # keep the original bytes: no second JPEG loss
        else:
            extension = options.image_format
            payload = encode_image(pixels, options.image_format, options.jpeg_quality)
    except ImageDecodeError as exc:
        return Rejection(item.source_id, exc.kind, str(exc), item.split, item.label)
    relative = f"{IMAGES_DIR}/{item.split}/{item.id}.{extension}"
    target = options.folder / relative
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)  # the whole folder is staged and renamed at the end
    except OSError as exc:  # a full disk, say: the user's problem, not one image's
        raise FersynthError(f"{target}: could not write ({exc.strerror or exc})") from None
    return {
        "id": item.id,
        "path": relative,
        "label": item.label,
        "split": item.split,
        "origin": "real",
        "source": options.source,
        "source_id": item.source_id,
        "seed_id": "",
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "channels": 1 if pixels.ndim == 2 else int(pixels.shape[2]),
        "pixel_hash": pixel_hash(pixels),
        COMPOSITED: composited,  # counted by the report, not a manifest column
    }


COMPOSITED = "_composited"


def _check_within(path: Path, root: Path) -> None:
    """Refuse a file that is, or lies under, a link leading out of `root`, or a link loop."""
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        raise ImageDecodeError("a link loop", "unsafe_path") from None
    if not inside:
        raise ImageDecodeError("a link that leads outside the input folder", "unsafe_path")
