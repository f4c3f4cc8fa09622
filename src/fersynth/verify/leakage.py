"""Test-leakage guard: no training or synthetic image may copy a test image.

Every candidate image is compared with every test image by an exact hash of its decoded
pixels and by a 64-bit perceptual hash (pHash), so resized and recompressed copies are caught
too. Perceptual hashes are compared as packed integers, XOR and popcount, a block of
candidates against all test images at a time: 300k x 4k comparisons take seconds.

Aligned faces share a layout, so a pHash match alone is not proof of a copy (on the demo
faces, 43% of training images lie within 6 bits of some test face; on FER2013, 2%). A pHash
match is therefore confirmed on the two images themselves: the correlation of their 32x32
grey thumbnails must reach `min_correlation` (resized and recompressed copies score 0.99;
distinct demo faces at most 0.95).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from fersynth.dataset import ImageDecodeError, load_image, pixel_hash, safe_join
from fersynth.parallel import imap

HASH_BITS = 64
LEAK_COLUMNS = [
    "id",
    "path",
    "split",
    "origin",
    "label",
    "kind",  # exact or perceptual
    "distance",  # perceptual-hash Hamming distance (0 for exact copies)
    "correlation",  # of the two images' grey 32x32 thumbnails (1 for exact copies)
    "test_set",
    "test_id",
    "test_path",
    "test_label",
]


def perceptual_hash(pixels: np.ndarray) -> int:
    """imagehash's pHash (grey, 32x32, 2-D DCT, the 8x8 lowest frequencies against their
    median) as one 64-bit integer, so that hashes compare with XOR and popcount."""
    bits = imagehash.phash(Image.fromarray(pixels), hash_size=8).hash
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """Grey 32x32 thumbnail, zero mean and unit variance (for the correlation check)."""
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels
    small = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA).ravel()
    return (small - small.mean()) / (small.std() + 1e-6)


def correlation(first: Path, second: Path) -> float:
    try:
        a, b = thumbnail(load_image(first)), thumbnail(load_image(second))
    except ImageDecodeError:
        return 0.0
    return float(a @ b / a.size)


def _hash_file(path: str) -> tuple[str, int, str]:
    try:
        pixels = load_image(Path(path))
    except ImageDecodeError as exc:
        return "", 0, str(exc)
    return pixel_hash(pixels), perceptual_hash(pixels), ""


def hash_images(
    root: Path, frame: pd.DataFrame, *, workers: int, progress: bool = False, desc: str = "hash"
) -> pd.DataFrame:
    """Exact and perceptual hashes of the manifest rows in `frame` (same index); unreadable
    images get an empty exact hash and their reason in `error`."""
    paths = [str(safe_join(root, relative)) for relative in frame["path"]]
    results = list(
        tqdm(
            imap(_hash_file, paths, workers, chunksize=64),
            total=len(paths),
            desc=desc,
            unit="img",
            disable=not progress,
            leave=False,
        )
    )
    exact, perceptual, errors = zip(*results, strict=True) if results else ((), (), ())
    return pd.DataFrame(
        {
            "exact": list(exact),
            "phash": np.array(perceptual, dtype=np.uint64),
            "error": list(errors),
        },
        index=frame.index,
    )


def nearest(candidates: np.ndarray, tests: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate hash: the index of the nearest test hash and its Hamming distance."""
    candidates = np.asarray(candidates, dtype=np.uint64)
    tests = np.asarray(tests, dtype=np.uint64)
    index = np.zeros(len(candidates), dtype=np.int64)
    distance = np.full(len(candidates), HASH_BITS + 1, dtype=np.int64)
    if len(tests) == 0:
        return index, distance
    for start in range(0, len(candidates), block):
        chunk = candidates[start : start + block]
        distances = np.bitwise_count(chunk[:, None] ^ tests[None, :])
        index[start : start + block] = distances.argmin(axis=1)
        distance[start : start + block] = distances.min(axis=1)
    return index, distance


@dataclass
class TestImages:
    """The images that must not leak: one evaluation split of one dataset, hashed."""

    name: str  # e.g. "fer2013/test"
    root: Path
    frame: pd.DataFrame  # its manifest rows
    hashes: pd.DataFrame


def find_leaks(
    root: Path,
    candidates: pd.DataFrame,
    hashes: pd.DataFrame,
    tests: list[TestImages],
    max_distance: int,
    min_correlation: float,
) -> pd.DataFrame:
    """Candidate rows (images under `root`) that copy a test image exactly, or within
    `max_distance` bits of pHash confirmed by thumbnail correlation; one row per leaked
    candidate (its closest test image), in LEAK_COLUMNS."""
    readable = hashes[hashes["error"] == ""]
    found = []
    for test in tests:
        test_ok = test.hashes[test.hashes["error"] == ""]
        first_by_exact = pd.Series(test_ok.index, index=test_ok["exact"])
        first_by_exact = first_by_exact[~first_by_exact.index.duplicated()]
        exact = readable["exact"].map(first_by_exact)
        index, distance = nearest(readable["phash"].to_numpy(), test_ok["phash"].to_numpy())
        match = pd.Series(test_ok.index.to_numpy()[index] if len(test_ok) else 0, index=readable.index)
        is_exact = exact.notna()
        hit = is_exact | (distance <= max_distance)
        if not hit.any():
            continue
        leaks = candidates.loc[hit[hit].index, ["id", "path", "split", "origin", "label"]].copy()
        leaks["kind"] = np.where(is_exact[hit], "exact", "perceptual")
        leaks["distance"] = np.where(is_exact[hit], 0, distance[hit.to_numpy()])
        test_rows = test.frame.loc[exact[hit].fillna(match[hit]).astype(test.frame.index.dtype)]
        leaks["test_set"] = test.name
        leaks["test_id"] = test_rows["id"].to_numpy()
        leaks["test_path"] = [str(test.root / path) for path in test_rows["path"]]
        leaks["test_label"] = test_rows["label"].to_numpy()
        leaks["correlation"] = [
            1.0 if kind == "exact" else round(correlation(root / path, Path(test_path)), 4)
            for kind, path, test_path in zip(leaks["kind"], leaks["path"], leaks["test_path"], strict=True)
        ]
        found.append(leaks[(leaks["kind"] == "exact") | (leaks["correlation"] >= min_correlation)])
    if not found:
        return pd.DataFrame(columns=LEAK_COLUMNS)
    leaks = pd.concat(found).sort_values("distance", kind="stable")
    leaks = leaks[~leaks.index.duplicated(keep="first")]  # the closest test image per candidate
    return leaks.loc[candidates.index[candidates.index.isin(leaks.index)], LEAK_COLUMNS]
