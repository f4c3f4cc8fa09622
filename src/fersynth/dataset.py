"""The dataset contract: a folder holding `manifest.csv` and the image files it names.

One row per image. Stages add columns and files; they never edit their input. The manifest's
paths are relative to the folder, and a path that would leave the folder is refused.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text, link_or_copy, staged_folder
from fersynth.image_limit import max_image_pixels, set_max_image_pixels

MANIFEST_NAME = "manifest.csv"
ORIGINS = ("real", "enhanced", "synthetic")
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
TEST_SPLIT = "test"
# Columns every manifest has, in this order; stages append their own after them.
COLUMNS: tuple[str, ...] = (
    "id",  # unique within the dataset; synthetic rows name their seed by it
    "path",  # image file, relative to the dataset folder (POSIX separators)
    "label",  # canonical class name (fersynth.classes.CLASSES)
    "split",  # train, val, test, or another lower-case name such as private_test
    "origin",  # real, enhanced or synthetic
    "source",  # the dataset the row came from (rafdb, fer2013, ...)
    "source_id",  # where in that source: file path or CSV row
    "seed_id",  # for synthetic rows: the id of the training image it was generated from
    "width",
    "height",
    "channels",
    "pixel_hash",  # hash of the decoded pixels, for exact-duplicate and leakage checks
)
_SPLIT_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def is_evaluation_split(split: str) -> bool:
    """Test-like splits: everything that is neither training nor validation."""
    return split not in (TRAIN_SPLIT, VAL_SPLIT)


def check_relative_path(relative: str) -> PurePosixPath:
    """The path as a POSIX path, or FersynthError when it is absolute or climbs out."""
    if not relative or "\\" in relative or relative.startswith("/") or _WINDOWS_DRIVE.match(relative):
        raise FersynthError(f"path {relative!r} is not a relative POSIX path inside the dataset")
    posix = PurePosixPath(relative)
    if ".." in posix.parts:
        raise FersynthError(f"path {relative!r} escapes the dataset folder")
    return posix


def safe_join(root: Path, relative: str) -> Path:
    """`root / relative`, refusing paths (and symbolic links) that leave `root`."""
    full = Path(root) / check_relative_path(relative)
    if not full.resolve().is_relative_to(Path(root).resolve()):
        raise FersynthError(f"path {relative!r} escapes the dataset folder through a link")
    return full


# ---------------------------------------------------------------------------------------
# Images


class ImageDecodeError(ValueError):
    """An input image that cannot be used; the message is the reason for the report, `kind`
    a short code for counting (fersynth.ingest.items.REJECTION_KINDS)."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across processes
        return type(self), (str(self), self.kind)


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to uint8 pixels: H x W for grey, H x W x 3 (RGB) for colour.

    Handles what real datasets contain: EXIF rotation, palette and alpha images (transparent
    pixels composited onto TRANSPARENT_BACKGROUND), CMYK JPEGs, 16-bit PNGs (scaled to 8 bit,
    not clipped). Empty, truncated, non-image and too large inputs (more pixels than
    fersynth.image_limit allows) raise ImageDecodeError with the reason.
    """
    return decode_image_info(data)[0]


def decode_image_info(data: bytes) -> tuple[np.ndarray, bool]:
    """`decode_image`, and whether transparent pixels were composited onto the background."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", "empty_file")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit and raises above twice it: both mean too large.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()  # a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
                image = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageDecodeError(_too_large_reason(data), "too_large") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image format", "not_an_image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({exc})", "corrupt_image") from None
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError("image has no pixels", "corrupt_image")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        # 16-bit data spans 0..65535; 32-bit ints from other decoders are scaled by their max.
        top = 65535 if mode.startswith("I;16") or wide.max() > 255 else 255
        return np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8), False
    if mode == "F":
        return np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8), False
    grey = mode in ("L", "1", "LA", "La") or (mode in ("P", "PA") and _palette_is_grey(image))
    composited = _has_transparency(image)
    if composited:
        image = _composite(image)
    return np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8), composited


# What shows through transparent pixels: white, as a page or viewer without a checkerboard shows
# them. Without compositing, RGBA -> RGB exposes whatever colour the transparent pixels hold.
TRANSPARENT_BACKGROUND = (255, 255, 255)


def _has_transparency(image: Image.Image) -> bool:
    """True when some pixel is not fully opaque (alpha channel or palette/colour-key transparency)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = image.getchannel("A")
    elif "transparency" in image.info and image.mode in ("P", "L", "RGB", "1"):
        alpha = image.convert("RGBA").getchannel("A")
    else:
        return False
    return alpha.getextrema()[0] < 255


def _composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


_HEADER_LOCK = threading.Lock()


def _too_large_reason(data: bytes) -> str:
    """'W x H = N pixels, over max_image_pixels L', from the header alone."""
    with _HEADER_LOCK:  # another thread never sees the limit lifted, nor restores it wrongly
        limit = max_image_pixels()
        try:
            Image.MAX_IMAGE_PIXELS = None  # read the header of an image known to be too large
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
        except Exception:  # noqa: BLE001 - the size is a detail of the message only
            return f"more pixels than max_image_pixels = {limit:,} (a decompression bomb or a huge scan)"
        finally:
            set_max_image_pixels(limit)
    return (
        f"{width} x {height} = {width * height:,} pixels, over max_image_pixels = {limit:,} "
        "(a decompression bomb or a huge scan)"
    )


def check_pixel_limit(data: bytes) -> None:
    """Raise ImageDecodeError (kind too_large) when the image's header claims more pixels than
    the limit; other defects are left to the decoder. For decoders other than Pillow's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data)).close()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageDecodeError(_too_large_reason(data), "too_large") from None
    except Exception:  # noqa: BLE001 - not an image Pillow knows: the decoder will say why
        return


def _palette_is_grey(image: Image.Image) -> bool:
    palette = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.all(palette[..., 0] == palette[..., 1]) and np.all(palette[..., 1] == palette[..., 2]))


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash of shape and pixel values: equal for images with identical decoded pixels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def encode_image(pixels: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """uint8 grey or RGB pixels -> PNG or JPEG bytes."""
    bgr = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpg" else []
    ok, buffer = cv2.imencode(f".{image_format}", bgr, params)
    if not ok:
        raise ImageDecodeError(f"could not encode as {image_format}", "encode_failed")
    return buffer.tobytes()


def load_image(path: Path) -> np.ndarray:
    """Read an image file as uint8 RGB (H x W x 3)."""
    try:
        pixels = decode_image(Path(path).read_bytes())
    except OSError as exc:
        raise ImageDecodeError(f"cannot read ({exc.strerror or exc})", "unreadable") from None
    return to_rgb(pixels)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


# ---------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Dataset:
    """A dataset folder and its validated manifest."""

    root: Path
    manifest: pd.DataFrame

    def image_path(self, relative: str) -> Path:
        return safe_join(self.root, relative)

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name]

    def class_counts(self, split: str) -> dict[str, int]:
        counts = self.split(split)["label"].value_counts()
        return {name: int(counts.get(name, 0)) for name in CLASSES}


def validate_manifest(frame: pd.DataFrame, where: str) -> None:
    """Raise FersynthError naming the rows that break the contract (first few, and a count)."""
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise FersynthError(f"{where}: missing columns {', '.join(missing)}")
    problems: list[str] = []

    def bad(index: int, text: str) -> None:
        problems.append(f"row {index + 2}: {text}")  # +2: header line, 1-based lines

    for column, allowed in (("label", CLASSES), ("origin", ORIGINS)):
        for index in frame.index[~frame[column].isin(allowed)]:
            bad(index, f"{column} {frame.at[index, column]!r} is not one of {', '.join(allowed)}")
    for index in frame.index[~frame["split"].str.match(_SPLIT_PATTERN)]:
        bad(index, f"split {frame.at[index, 'split']!r} is not a lower-case name")
    for index in frame.index[frame["id"].duplicated(keep="first") | (frame["id"] == "")]:
        bad(index, f"id {frame.at[index, 'id']!r} is empty or repeated")
    for index, relative in frame["path"].items():
        try:
            check_relative_path(relative)
        except FersynthError as exc:
            bad(index, str(exc))
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FersynthError(f"{where}: {shown}{more}")


def read_manifest(folder: Path) -> Dataset:
    """Read and validate `folder/manifest.csv`."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FersynthError(f"{path}: no manifest here; is {folder} a fersynth dataset folder?")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FersynthError(f"{path}: not a readable CSV table ({exc})") from None
    validate_manifest(frame, str(path))
    for column in ("width", "height", "channels"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return Dataset(folder, frame)


def write_manifest(folder: Path, frame: pd.DataFrame) -> Path:
    """Validate and write `folder/manifest.csv` atomically, contract columns first."""
    validate_manifest(frame, str(Path(folder) / MANIFEST_NAME))
    ordered = list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]
    target = Path(folder) / MANIFEST_NAME
    atomic_write_text(target, frame[ordered].to_csv(index=False, lineterminator="\n"))
    return target


def write_split_dataset(source: Path, split: str, output: Path, *, force: bool = False) -> Dataset:
    """A dataset folder holding only `split` of `source` (images hard-linked, manifest rows as
    they are): an ingested dataset's own test split as a named test set.

    Raises FersynthError when `source` has no such split.
    """
    dataset = read_manifest(source)
    frame = dataset.split(split).reset_index(drop=True)
    if frame.empty:
        splits = ", ".join(sorted(set(dataset.manifest["split"])))
        raise FersynthError(f"{source}: no {split!r} split to use as a test set (it has {splits})")
    with staged_folder(output, force=force) as staging:
        for relative in frame["path"]:
            link_or_copy(dataset.image_path(relative), safe_join(staging, relative))
        write_manifest(staging, frame)
    return read_manifest(output)
