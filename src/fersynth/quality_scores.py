"""Image-quality scores on the grey image (thesis Algorithm 2): what the quality stage
(`fersynth.quality`) and the augment report's origin check (`fersynth.origin_check`) measure,
in a module of their own below both.

Each score is larger for a better image:
- sharpness: variance of the Laplacian;
- detail: share of spectral energy above a radial frequency cut-off (FFT);
- contrast: RMS contrast (standard deviation of intensities in [0, 1]);
- texture: entropy (bits) of the local-binary-pattern histogram;
- size: shorter side in pixels.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np

from fersynth.dataset import ImageDecodeError, check_pixel_limit
from fersynth.settings import QUALITY_SCORES as SCORE_NAMES  # noqa: F401  (one list of names)

# Grey-level differences at or below this are treated as sensor/JPEG noise, not image content.
NOISE_LEVEL = 2
# The 8 neighbours at radius 1, clockwise from the top-left, as (row, column) offsets.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def sharpness(grey: np.ndarray) -> float:
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


@cache
def _radius(height: int, width: int) -> np.ndarray:
    """Radial frequency of each rfft2 bin, as a fraction of the Nyquist frequency."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx**2 + fy**2) / 0.5


def detail(grey: np.ndarray, cutoff: float, noise_level: float = NOISE_LEVEL) -> float:
    """Share of the (mean-removed) spectral energy above `cutoff` x Nyquist.

    Each frequency bin first loses the energy that white noise of `noise_level` grey levels
    puts there (N x sigma^2), so a flat frame with JPEG noise has no "detail" at all.
    """
    spectrum = np.fft.rfft2(grey.astype(np.float32) - grey.mean())
    power = spectrum.real**2 + spectrum.imag**2
    excess = np.maximum(power - grey.size * noise_level**2, 0.0)
    total = float(excess.sum())
    if total <= 0:
        return 0.0
    return float(excess[_radius(*grey.shape) > cutoff].sum() / total)


def contrast(grey: np.ndarray) -> float:
    return float(grey.std() / 255.0)


def texture(grey: np.ndarray, noise_level: int = NOISE_LEVEL) -> float:
    """Entropy of the 8-neighbour, radius-1 LBP code histogram.

    A neighbour sets its bit only when it exceeds the centre by more than `noise_level` grey
    levels, so sensor or JPEG noise on a flat frame does not count as texture.

    Written with array slices because scikit-image's local_binary_pattern costs about ten
    times more per 100x100 image, which would miss the stage's throughput target.
    """
    if min(grey.shape) < 3:
        return 0.0
    centre = grey[1:-1, 1:-1].astype(np.int16) + noise_level
    height, width = grey.shape
    codes = np.zeros(centre.shape, np.uint8)
    for bit, (dy, dx) in enumerate(_NEIGHBOURS):
        neighbour = grey[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx]
        codes |= (neighbour > centre).astype(np.uint8) << bit
    counts = np.bincount(codes.ravel(), minlength=256)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum())


def score_grey(grey: np.ndarray, detail_cutoff: float) -> dict[str, float]:
    return {
        "sharpness": sharpness(grey),
        "detail": detail(grey, detail_cutoff),
        "contrast": contrast(grey),
        "texture": texture(grey),
        "size": float(min(grey.shape)),
    }


def score_file(path: str | Path, detail_cutoff: float) -> dict[str, float] | str:
    """Scores of one image file, or the reason it could not be read."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if data.size == 0:
        return "empty file (0 bytes)"
    try:
        check_pixel_limit(data.tobytes())  # OpenCV's own limit is 12 times Pillow's default
    except ImageDecodeError as exc:
        return str(exc)
    grey = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        return "not a decodable image"
    return score_grey(grey, detail_cutoff)
