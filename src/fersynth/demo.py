"""`fersynth demo-data`: a small, deterministic dataset of procedurally drawn faces.

Seven expressions are told apart by mouth, brows and eyes; each face has its own identity
(face shape, skin tone, hair, feature spacing), a small pose change, a lighting gradient and
sensor noise. A share of images is blurred or tiny (for the quality stage to find), a few
labels are flipped (as real annotations are noisy), and the class counts follow RAF-DB's long
tail. The output uses RAF-DB's basic layout, so it goes through the real RAF-DB reader; a
`demo_truth.csv` beside it records what was drawn, for checking later stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from fersynth.classes import CLASSES, RAFDB_LABELS
from fersynth.figures import contact_sheet, save_png
from fersynth.files import atomic_write_text, staged_folder
from fersynth.ingest.rafdb import ALIGNED_DIR, LABEL_FILE
from fersynth.settings import DemoSettings, save_resolved

TRUTH_FILE = "demo_truth.csv"
PREVIEW_FILE = "preview.png"
# RAF-DB basic class counts (train, test): the long tail the demo imitates.
RAFDB_TRAIN_COUNTS = {
    "surprise": 1290,
    "fear": 281,
    "disgust": 717,
    "happy": 4772,
    "sad": 1982,
    "angry": 705,
    "neutral": 2524,
}
RAFDB_TEST_COUNTS = {
    "surprise": 329,
    "fear": 74,
    "disgust": 160,
    "happy": 1185,
    "sad": 478,
    "angry": 162,
    "neutral": 680,
}
_SUPERSAMPLE = 4  # draw large, then shrink with area averaging: smooth edges


@dataclass(frozen=True)
class Expression:
    mouth_curve: float  # + smile, - frown (fraction of the face height)
    mouth_open: float  # lip gap
    mouth_width: float  # factor on the identity's mouth width
    brow_raise: float  # + up
    brow_slant: float  # + inner ends up (sad, fear), - inner ends down (angry)
    eye_open: float  # factor on the identity's eye height
    mouth_tilt: float = 0.0  # one corner raised (disgust)
    wrinkles: bool = False  # nose wrinkles (disgust)


EXPRESSIONS: dict[str, Expression] = {
    "surprise": Expression(0.0, 0.13, 0.60, 0.07, 0.0, 1.45),
    "fear": Expression(-0.015, 0.05, 1.15, 0.045, 0.55, 1.35),
    "disgust": Expression(-0.025, 0.015, 0.95, -0.025, -0.35, 0.55, 0.035, True),
    "happy": Expression(0.075, 0.03, 1.15, 0.005, 0.0, 0.80),
    "sad": Expression(-0.06, 0.0, 0.90, 0.01, 0.65, 0.80),
    "angry": Expression(-0.01, 0.0, 0.80, -0.04, -0.75, 0.70),
    "neutral": Expression(0.0, 0.0, 1.0, 0.0, 0.0, 1.0),
}


def allocate(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split `total` over classes in proportion to `weights` (largest remainder, at least 1)."""
    scale = total / sum(weights.values())
    raw = {name: weights[name] * scale for name in CLASSES}
    counts = {name: max(1, math.floor(value)) for name, value in raw.items()}
    by_remainder = sorted(CLASSES, key=lambda n: raw[n] - math.floor(raw[n]), reverse=True)
    i = 0
    while sum(counts.values()) < total:
        counts[by_remainder[i % len(CLASSES)]] += 1
        i += 1
    while sum(counts.values()) > total:
        largest = max(CLASSES, key=lambda n: counts[n])
        counts[largest] -= 1
    return counts


def _jitter(rng: np.random.Generator, value: float, spread: float) -> float:
    return value + rng.normal(0.0, spread)


def _curve(p0, p1, p2, n: int = 24) -> np.ndarray:
    """Quadratic Bezier points from p0 to p2 with control point p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)


def draw_face(expression: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One RGB face (uint8, size x size) showing `expression`, with a random identity."""
    e = EXPRESSIONS[expression]
    s = size * _SUPERSAMPLE
    thick = max(1, round(s * 0.018))

    def pt(x: float, y: float) -> tuple[int, int]:
        return int(round(x * s)), int(round(y * s))

    background = rng.uniform(40, 220, size=3)
    canvas = np.empty((s, s, 3), np.uint8)
    canvas[:] = background.astype(np.uint8)
    light, dark = np.array([236, 203, 178]), np.array([105, 72, 52])
    skin = light + (dark - light) * rng.uniform(0, 1)
    skin_color = tuple(int(c) for c in skin)
    feature = tuple(int(c) for c in skin * 0.35)
    hair = tuple(int(c) for c in rng.uniform(10, 120) * np.array([1.0, 0.8, 0.6]))

    cx, cy = _jitter(rng, 0.5, 0.01), _jitter(rng, 0.53, 0.01)
    ax, ay = rng.uniform(0.31, 0.38), rng.uniform(0.40, 0.46)
    cv2.ellipse(canvas, pt(cx, cy - ay * 0.25), pt(ax * 1.08, ay * 0.9), 0, 180, 360, hair, -1)
    cv2.ellipse(canvas, pt(cx, cy), pt(ax, ay), 0, 0, 360, skin_color, -1, cv2.LINE_AA)

    eye_dx, eye_y = rng.uniform(0.13, 0.17), cy - rng.uniform(0.07, 0.11)
    eye_w, eye_h = rng.uniform(0.045, 0.06), rng.uniform(0.022, 0.03) * e.eye_open
    brow_gap = rng.uniform(0.055, 0.075) - e.brow_raise
    for side in (-1, 1):
        ex = cx + side * eye_dx
        cv2.ellipse(canvas, pt(ex, eye_y), pt(eye_w, eye_h), 0, 0, 360, (245, 245, 240), -1, cv2.LINE_AA)
        iris = max(0.4, min(1.0, e.eye_open)) * eye_h * 0.95
        cv2.circle(canvas, pt(ex, eye_y), int(iris * s), (40, 30, 25), -1, cv2.LINE_AA)
        cv2.ellipse(canvas, pt(ex, eye_y), pt(eye_w, eye_h), 0, 0, 360, feature, thick // 2 + 1, cv2.LINE_AA)
        inner_x, outer_x = ex - side * eye_w * 1.1, ex + side * eye_w * 1.2
        by = eye_y - brow_gap
        inner_y = by - e.brow_slant * 0.03 + rng.normal(0, 0.003)
        outer_y = by + e.brow_slant * 0.012
        brow = _curve((inner_x, inner_y), ((inner_x + outer_x) / 2, by - 0.012), (outer_x, outer_y))
        cv2.polylines(canvas, [(brow * s).astype(np.int32)], False, hair, thick * 2, cv2.LINE_AA)

    nose_y = cy + rng.uniform(0.06, 0.09)
    cv2.line(canvas, pt(cx, eye_y + 0.02), pt(cx - 0.015, nose_y), feature, thick, cv2.LINE_AA)
    cv2.line(canvas, pt(cx - 0.015, nose_y), pt(cx + 0.02, nose_y), feature, thick, cv2.LINE_AA)
    if e.wrinkles:
        for side in (-1, 1):
            x = cx + side * 0.035
            cv2.line(
                canvas,
                pt(x, eye_y + 0.03),
                pt(x + side * 0.02, eye_y + 0.06),
                feature,
                thick,
                cv2.LINE_AA,
            )

    mouth_y = cy + rng.uniform(0.19, 0.24)
    half = rng.uniform(0.07, 0.10) * e.mouth_width
    curve = _jitter(rng, e.mouth_curve, 0.006)
    left = (cx - half, mouth_y - curve * 0.5 - e.mouth_tilt)
    right = (cx + half, mouth_y - curve * 0.5 + e.mouth_tilt * 0.3)
    upper = _curve(left, (cx, mouth_y + curve - e.mouth_open * 0.5), right)
    lower = _curve(left, (cx, mouth_y + curve + e.mouth_open * 1.5), right)
    lips = (120, 40, 45)
    if e.mouth_open > 0.01:
        polygon = np.concatenate([upper, lower[::-1]]) * s
        cv2.fillPoly(canvas, [polygon.astype(np.int32)], (35, 15, 20), cv2.LINE_AA)
        cv2.polylines(canvas, [polygon.astype(np.int32)], True, lips, thick, cv2.LINE_AA)
    else:
        cv2.polylines(canvas, [(upper * s).astype(np.int32)], False, lips, thick + 1, cv2.LINE_AA)

    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    # Pose: small rotation, scale and shift.
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-8, 8), rng.uniform(0.93, 1.07))
    matrix[:, 2] += rng.uniform(-0.04, 0.04, size=2) * size
    image = cv2.warpAffine(image, matrix, (size, size), borderMode=cv2.BORDER_REPLICATE)
    # Lighting: a linear gradient in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    gradient = 1.0 + rng.uniform(0.0, 0.7) * (np.cos(angle) * xs + np.sin(angle) * ys)
    image *= gradient[..., None]
    image += rng.normal(0.0, rng.uniform(2.0, 6.0), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator, tiny_size: int) -> np.ndarray:
    if kind == "blurred":
        return cv2.GaussianBlur(image, (0, 0), rng.uniform(2.0, 3.5))
    if kind == "tiny":
        return cv2.resize(image, (tiny_size, tiny_size), interpolation=cv2.INTER_AREA)
    return image


def plan(settings: DemoSettings) -> pd.DataFrame:
    """Which image shows what: name, split, drawn class, written label, degradation."""
    rows = []
    master = np.random.default_rng(settings.seed)
    for split, total, weights in (
        ("train", settings.train_size, RAFDB_TRAIN_COUNTS),
        ("test", settings.test_size, RAFDB_TEST_COUNTS),
    ):
        counts = allocate(total, weights)
        drawn = np.array([name for name in CLASSES for _ in range(counts[name])])
        master.shuffle(drawn)
        for i, expression in enumerate(drawn, start=1):
            label = expression
            if master.random() < settings.label_noise:
                label = str(master.choice([c for c in CLASSES if c != expression]))
            u = master.random()
            degradation = (
                "blurred"
                if u < settings.blurred_fraction
                else "tiny"
                if u < settings.blurred_fraction + settings.tiny_fraction
                else ""
            )
            rows.append(
                {
                    "name": f"{split}_{i:05d}",
                    "split": split,
                    "drawn": expression,
                    "label": label,
                    "degradation": degradation,
                }
            )
    return pd.DataFrame(rows)


def write_demo_data(settings: DemoSettings, *, force: bool = False, progress: bool = True) -> Path:
    """Draw the demo dataset into `settings.output` (RAF-DB basic layout)."""
    table = plan(settings)
    raf_number = {name: number for number, name in RAFDB_LABELS.items()}
    with staged_folder(settings.output, force=force) as staging:
        (staging / ALIGNED_DIR).mkdir(parents=True)
        rows = table.itertuples(index=False)
        for index, row in enumerate(tqdm(rows, total=len(table), desc="demo faces", disable=not progress)):
            rng = np.random.default_rng([settings.seed, index])
            image = degrade(
                draw_face(row.drawn, rng, settings.image_size),
                row.degradation,
                rng,
                settings.tiny_size,
            )
            path = staging / ALIGNED_DIR / f"{row.name}_aligned.jpg"
            ok = cv2.imwrite(
                str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
            )
            if not ok:
                raise OSError(f"could not write {path}")
        save_png(staging / PREVIEW_FILE, preview(staging, table))
        lines = [f"{row.name}.jpg {raf_number[row.label]}" for row in table.itertuples()]
        atomic_write_text(staging / LABEL_FILE, "\n".join(lines) + "\n")
        atomic_write_text(staging / TRUTH_FILE, table.to_csv(index=False, lineterminator="\n"))
        save_resolved({"demo": settings}, staging)
    return Path(settings.output)


def preview(folder: Path, table: pd.DataFrame, per_row: int = 8) -> np.ndarray:
    """A contact sheet: clean training faces per drawn class, then degraded and relabelled ones."""

    def images(names) -> list[np.ndarray]:
        paths = [folder / ALIGNED_DIR / f"{name}_aligned.jpg" for name in list(names)[:per_row]]
        return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]

    train = table[table["split"] == "train"]
    clean = train[train["degradation"] == ""]
    rows = [(name, images(clean.loc[clean["drawn"] == name, "name"])) for name in CLASSES]
    rows.append(("blurred or tiny", images(train.loc[train["degradation"] != "", "name"])))
    flipped = train[train["label"] != train["drawn"]]
    rows.append(("flipped labels", images(flipped["name"])))
    return contact_sheet(rows, columns=per_row)
