"""params.yaml -> typed, validated settings.

Every stage reads its parameters from one `params.yaml`. Unknown keys are refused and a bad
value is reported as `params.yaml: <key> = <value>: <what was expected>`. Stages save the
resolved settings next to their output with `save_resolved`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text

DEFAULT_PARAMS = Path("params.yaml")

SplitName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    """Base of every settings block: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoSettings(Strict):
    """`fersynth demo-data`: procedurally drawn faces written in RAF-DB's layout."""

    output: Path = Path("data/demo/raw")
    seed: int = 2048
    train_size: Annotated[int, Field(ge=7)] = 900
    test_size: Annotated[int, Field(ge=7)] = 300
    image_size: Annotated[int, Field(ge=32, le=512)] = 100
    label_noise: Fraction = 0.03
    blurred_fraction: Fraction = 0.05
    tiny_fraction: Fraction = 0.05
    tiny_size: Annotated[int, Field(ge=8, le=64)] = 28


class Fer2013Settings(Strict):
    split_map: dict[str, SplitName] = {
        "Training": "train",
        "PublicTest": "test",
        "PrivateTest": "private_test",
    }


class FerPlusSettings(Strict):
    # Microsoft's fer2013new.csv; the pixels come from the fer2013.csv given as input.
    labels_csv: Path | None = None


class AffectNetSettings(Strict):
    images_dir: str = "Manually_Annotated_Images"
    train_csv: str = "training.csv"
    test_csv: str = "validation.csv"
    test_per_class: Annotated[int, Field(ge=1)] = 500


Source = Literal["rafdb", "affectnet", "fer2013", "ferplus", "folder"]


class IngestSettings(Strict):
    """`fersynth ingest`: one source layout -> the canonical dataset folder."""

    source: Source = "rafdb"
    input: Path = Path("data/demo/raw")
    output: Path = Path("data/demo/ingested")
    workers: Annotated[int, Field(ge=0)] = 0  # 0 = every CPU core
    drop_train_test_duplicates: bool = True
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 95
    fer2013: Fer2013Settings = Fer2013Settings()
    ferplus: FerPlusSettings = FerPlusSettings()
    affectnet: AffectNetSettings = AffectNetSettings()


Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")]
QUALITY_SCORES = ("sharpness", "detail", "contrast", "texture", "size")


class SuperResolutionSettings(Strict):
    """SwinIR (or any spandrel model) for the images the quality check flags."""

    # Weights file(s) or s3:// URIs, e.g. an x2 and an x4 model; "none" skips enhancement.
    model: str | list[str] = "none"
    device: Device = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 16
    tile: Annotated[int, Field(ge=32)] = 256  # larger images go through in overlapping tiles
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA when supported

    def uris(self) -> list[str]:
        models = [self.model] if isinstance(self.model, str) else list(self.model)
        return [] if models == ["none"] or not models else models


class QualitySettings(Strict):
    """`fersynth quality`: score training images, enhance the poor ones (thesis Alg. 2, 3)."""

    data: Path = Path("data/demo/ingested")
    output: Path = Path("data/demo/quality")
    workers: Annotated[int, Field(ge=0)] = 0  # 0 = every CPU core
    detail_cutoff: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25  # fraction of Nyquist
    # Scores are ranked within the dataset (0..1), then combined by these weights.
    weights: dict[str, Annotated[float, Field(ge=0.0)]] = {name: 1.0 for name in QUALITY_SCORES}
    threshold_mode: Literal["percentile", "absolute"] = "percentile"
    threshold: Annotated[float, Field(ge=0.0, le=100.0)] = 10.0  # percentile, or score in 0..1
    min_size: Annotated[int, Field(ge=1)] = 40  # shorter side below this: always enhanced
    working_size: Annotated[int, Field(ge=8)] | None = None  # null: median training image size
    sr: SuperResolutionSettings = SuperResolutionSettings()

    @field_validator("weights")
    @classmethod
    def _known_scores(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(QUALITY_SCORES))
        if unknown:
            raise ValueError(f"unknown scores {unknown}; expected {', '.join(QUALITY_SCORES)}")
        if sum(value.values()) <= 0:
            raise ValueError("at least one weight must be positive")
        return value


# The thesis' normalisation statistics (RAF-DB).
THESIS_MEAN = (0.5863, 0.4595, 0.4030)
THESIS_STD = (0.2715, 0.2424, 0.2366)
Positive = Annotated[int, Field(ge=1)]


class MekSettings(Strict):
    """MEK (Leave No Stone Unturned, NeurIPS 2023), as its official code."""

    smoothing: Fraction = 0.3  # eps of the re-balanced smooth labels
    attention_weight: Annotated[float, Field(ge=0.0)] = 0.1  # weight of L_rac
    class_weights: list[Annotated[float, Field(gt=0.0)]] | None = None  # pins w_c (7 values)

    @field_validator("class_weights")
    @classmethod
    def _seven(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) != 7:
            raise ValueError("expected 7 class weights, in the canonical class order")
        return value


class TrainSettings(Strict):
    """`fersynth train`: the thesis defaults (Swin-T, AdamW, cosine, 100k steps, fp16)."""

    data: Path = Path("data/demo/guarded")
    output: Path = Path("runs/models/original_sl")
    arch: str = "swin_tiny_patch4_window7_224"  # any timm model name
    pretrained: str | None = None  # local file or s3:// URI; none = random initialisation
    image_size: Annotated[int, Field(ge=16, le=1024)] = 224
    resize: Annotated[int, Field(ge=16, le=2048)] | None = None  # default image_size * 256/224
    window_size: Positive | None = None  # Swin: 4 at 128 px keeps MEK's maps flip-aligned
    method: Literal["sl", "mek"] = "sl"
    steps: Positive = 100_000
    batch_size: Positive = 32
    lr: Annotated[float, Field(gt=0.0)] = 5e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.05
    warmup_steps: Annotated[int, Field(ge=0)] = 5_000
    warmup_lr: Annotated[float, Field(ge=0.0)] = 5e-7
    min_lr: Annotated[float, Field(ge=0.0)] = 5e-6
    label_smoothing: Fraction = 0.1
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, else fp32
    grad_clip: Annotated[float, Field(gt=0.0)] | None = 5.0
    balanced_sampler: bool = False  # class-balanced sampling (the cheapest competitor)
    hflip: bool = True
    rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 5.0
    mean: tuple[float, float, float] = THESIS_MEAN
    std: tuple[float, float, float] = THESIS_STD
    workers: Annotated[int, Field(ge=0)] = 4
    # Decode the training images once and augment whole batches (auto: when they fit in 1 GiB).
    in_memory: Literal["auto", "always", "never"] = "auto"
    device: Device = "auto"
    channels_last: bool = True
    log_every: Positive = 100
    checkpoint_every: Positive = 2_000
    eval_every: Positive = 2_000
    val_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.1  # when the data has no val split
    select_metric: Literal["mean_accuracy", "accuracy"] = "mean_accuracy"
    mek: MekSettings = MekSettings()


class EvaluateSettings(Strict):
    """`fersynth evaluate`: one model on one or more test sets."""

    model: Path = Path("runs/models/original_sl")
    data: list[Path] = [Path("data/demo/guarded"), Path("data/demo/cross")]
    split: SplitName = "test"
    output: Path = Path("runs/eval/original_sl")
    batch_size: Positive = 128
    workers: Annotated[int, Field(ge=0)] = 2
    device: Device = "auto"
    tta_flip: bool = True  # average the predictions of the image and its mirror


class PriorSettings(Strict):
    """`fersynth train-prior`: the offline autoencoder prior of the gif-prior backend."""

    data: Path = Path("data/demo/guarded")
    output: Path = Path("runs/demo/prior")
    image_size: Annotated[int, Field(ge=16, le=512)] = 64
    channels: list[Annotated[int, Field(ge=8)]] = [16, 32, 64]  # 3 blocks: 64 px -> 16x16x4 latent
    steps: Positive = 1500
    batch_size: Positive = 32
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    kl_weight: Annotated[float, Field(ge=0.0)] = 1e-6
    workers: Annotated[int, Field(ge=0)] = 1
    device: Device = "auto"


class GenerateSettings(Strict):
    """`fersynth generate`: GIF guided imagination, K outputs per training image, in shards."""

    data: Path = Path("data/demo/guarded")
    output: Path = Path("data/demo/generated")  # shards/ inside; `fersynth merge` writes dataset/
    backend: Literal["gif-prior", "gif-sd"] = "gif-prior"
    k: Positive = 5  # outputs per seed image (thesis K=5)
    classes: list[str] | None = None  # seed classes to expand; null = every class
    max_seeds_per_class: Positive | None = None
    seeds_per_batch: Positive = 1  # seed images per forward batch (x K outputs)
    guide: Literal["fer", "clip"] = "fer"
    guide_model: str = "runs/demo/models/original_sl"  # fersynth model (fer) or CLIP folder (clip)
    prior: Path = Path("runs/demo/prior")  # gif-prior: the trained prior folder
    sd_model: str | None = None  # gif-sd: diffusers Stable Diffusion folder or s3:// prefix
    image_size: Annotated[int, Field(ge=32, le=1024)] = 512  # gif-sd working resolution
    steps: Positive = 50  # DDIM steps (thesis: 50)
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1  # noised for int(strength * steps) steps
    scale: Annotated[float, Field(ge=1.0)] = 50.0  # classifier-free guidance scale (thesis: 50)
    step_size: Annotated[float, Field(gt=0.0)] = 0.1  # GIF's signed-gradient step on z and b
    eps: Annotated[float, Field(gt=0.0)] = 0.1  # L-inf radius around the denoised latent
    prompt_variants: bool = True  # GIF-style domain and adjective variants of the class prompt
    device: Device = "auto"
    half: bool = True  # on CUDA: fp16 UNet and text encoder, bf16 autocast VAE decode

    @field_validator("classes")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        from fersynth.classes import CLASSES

        unknown = sorted(set(value or []) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown classes {unknown}; expected {', '.join(CLASSES)}")
        return value


class GuardSettings(Strict):
    """`fersynth guard`: remove training images that copy a test image (exactly or nearly)."""

    data: Path = Path("data/demo/quality")
    output: Path = Path("data/demo/guarded")
    # Other datasets whose evaluation splits must not leak either (cross-dataset test sets).
    test_sets: list[Path] = [Path("data/demo/cross")]  # other datasets whose test split must not leak
    # A near-copy: perceptual-hash Hamming distance (of 64 bits) at most this, confirmed by a
    # correlation of the two images' grey 32x32 thumbnails of at least min_correlation.
    max_distance: Annotated[int, Field(ge=0, le=32)] = 6
    min_correlation: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.95
    workers: Annotated[int, Field(ge=0)] = 0  # 0 = every CPU core


class VerifySettings(Strict):
    """`fersynth verify`: multi-model voting on synthetic images, the leakage guard, and the
    fidelity and diversity report (thesis 3.3.2)."""

    data: Path = Path("data/demo/generated/dataset")  # the merged synthetic dataset
    reference: Path = Path("data/demo/guarded")  # the original data: its test split, real features
    output: Path = Path("data/demo/verified")
    # fersynth models trained on the original data (different backbones or seeds).
    voters: list[str] = [
        "runs/demo/models/original_sl",
        "runs/demo/models/original_sl_balanced",
        "runs/demo/models/original_mek",
    ]
    mode: Literal["intended", "relabel"] = "intended"  # relabel: label = the voters' majority
    min_votes: Positive = 2  # m of N voters must predict the label
    min_probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # tau: mean probability of it
    tta_flip: bool = True
    batch_size: Positive = 128
    device: Device = "auto"
    workers: Annotated[int, Field(ge=0)] = 1  # data-loading processes
    fidelity_images_per_class: Positive = 500  # real and synthetic images sampled per class
    kid_subset_size: Positive = 50


AugmentVariant = Literal["original", "synthetic", "expanded", "balanced", "rho"]


class AugmentSettings(Strict):
    """`fersynth augment`: thesis Algorithm 4, accepted synthetic images into the minor classes."""

    original: Path = Path("data/demo/guarded")
    synthetic: Path = Path("data/demo/verified")
    output: Path = Path("data/demo/augmented")
    variant: AugmentVariant = "rho"
    rho: Annotated[float, Field(ge=1.0)] = 2.0  # largest / smallest class count to reach


class ReportSettings(Strict):
    """`fersynth report`: one page per run with the tables, pictures and stage summaries."""

    output: Path = Path("runs/demo/report")
    comparisons: list[Path] = [Path("runs/demo/compare/guarded"), Path("runs/demo/compare/cross")]
    evaluations: Path = Path("runs/demo/eval")  # <run name lower-case>/<test set>/confusion.png
    quality: Path = Path("data/demo/quality")
    verify: Path = Path("data/demo/verified")
    augment: Path = Path("data/demo/augmented/rho")
    generated: Path = Path("data/demo/generated/dataset")
    # Each synthetic row against the original row it should beat.
    changes: dict[str, str] = {
        "Expanded_SL": "Original_SL",
        "Synthetic_MEK": "Original_MEK",
        "Expanded_MEK": "Original_MEK",
    }


class GpuPoolSettings(Strict):
    """How a GPU step is scheduled on the cluster's GPU node pool (one helper applies it)."""

    accelerator: str = "nvidia.com/gpu"  # the extended resource the device plugin exposes
    count: Positive = 1
    node_selector: dict[str, str] = {"fersynth.io/node-pool": "gpu"}
    toleration_key: str = "nvidia.com/gpu"  # the GPU pool's taint (effect NoSchedule)
    shm_size: str = "16Gi"  # memory-backed /dev/shm for DataLoader workers
    cpu: str = "8"
    memory: str = "64G"


class KfpSettings(Strict):
    """The Kubeflow Pipelines deployment: images, data source, secrets, GPU pool, schedule."""

    image: str = "ghcr.io/fersynth/fersynth"  # CPU steps; tag = git commit
    gpu_image: str = "ghcr.io/fersynth/fersynth-cuda"  # GPU steps; same tag
    image_tag: str | None = None  # null: the git commit of the checkout that compiles
    data_repo: str = "https://github.com/fersynth/fersynth.git"  # the DVC project (git URL)
    data_rev: str = "main"  # git revision whose dvc.lock names the data (a commit hash pins it)
    data_path: str = "data/demo/raw"  # raw data, DVC-tracked in data_repo
    cross_path: str = "data/demo/cross"  # an ingested cross-dataset test set, DVC-tracked
    generate_shards: Positive = 4  # generation shards (pipeline parameter)
    max_parallel_shards: Positive = 4  # GPU pods generating at once
    s3_secret: str = "fersynth-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
    mlflow_secret: str = "fersynth-mlflow"  # key MLFLOW_TRACKING_URI
    gpu: GpuPoolSettings = GpuPoolSettings()
    pipeline_name: str = "fersynth"
    schedule_name: str = "fersynth-retrain"
    schedule_cron: str = "0 0 3 * * 1"  # 6 fields (seconds first): Mondays 03:00


class Settings(Strict):
    seed: int = 2048
    demo: DemoSettings = DemoSettings()
    ingest: IngestSettings = IngestSettings()
    quality: QualitySettings = QualitySettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    prior: PriorSettings = PriorSettings()
    generate: GenerateSettings = GenerateSettings()
    guard: GuardSettings = GuardSettings()
    verify: VerifySettings = VerifySettings()
    augment: AugmentSettings = AugmentSettings()
    report: ReportSettings = ReportSettings()
    kfp: KfpSettings = KfpSettings()

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int) -> int:
        if not 0 <= value < 2**32:
            raise ValueError("expected an integer in [0, 2**32)")
        return value


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key!r}")
        else:
            lines.append(f"{source}: {key} = {item.get('input')!r}: {item['msg']}")
    return "; ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FersynthError(f"override {dotted}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) -> a nested dict."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise FersynthError(f"override {pair!r}: expected KEY=VALUE, e.g. ingest.workers=2")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Settings:
    """Read and validate params.yaml (defaults when `path` is None) plus KEY=VALUE overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise FersynthError(f"{path}: parameter file not found")
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise FersynthError(f"{path}:{where} is not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise FersynthError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise FersynthError(_format_errors(source, exc)) from None


def resolved_dict(settings: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """JSON-ready settings; a dict may mix plain values and settings blocks."""
    if isinstance(settings, BaseModel):
        return json.loads(settings.model_dump_json())
    return {k: resolved_dict(v) if isinstance(v, BaseModel | dict) else v for k, v in settings.items()}


def save_resolved(settings: BaseModel | dict[str, Any], folder: Path, name: str = "settings.json") -> Path:
    """Write the resolved settings (every default filled in) next to a stage's output."""
    target = Path(folder) / name
    text = json.dumps(resolved_dict(settings), indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_text(target, text)
    return target
