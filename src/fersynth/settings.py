"""params.yaml -> typed, validated settings.

Every stage reads its parameters from one `params.yaml`. Unknown keys are refused and a bad
value is reported as `params.yaml: <key> = <value>: <what was expected>`. Stages save the
resolved settings next to their output with `save_resolved`.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.image_limit import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

DEFAULT_PARAMS = Path("params.yaml")

SplitName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Strict(BaseModel):
    """Base of every settings block: unknown keys are errors, values are not coerced loosely."""

    # A number given for a text setting is that text (`-S kfp.data_rev=12345678`, a commit).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: Any) -> Any:
        # Lax mode reads true as 1 (`batch_size: true` would train at batch 1): a boolean is a
        # number only where the setting takes booleans too.
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        misfit = _bool_misfit(field.annotation, value) if field is not None else None
        if misfit is not None:
            place, found, expected = misfit
            where = f"{place} = {found!r}: " if place else ""
            raise ValueError(f"{where}expected {expected}, not true/false")
        return value


def _members(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may take: Annotated and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _number_kind(annotation: Any) -> str | None:
    """What a number of `annotation` is ("an integer", "a number") when it reads true/false as
    one (int, float, a Literal of numbers) and admits no boolean itself; else None."""
    kinds: list[type] = []
    for member in _members(annotation):
        if member is bool or member is Any or member is object:
            return None
        if get_origin(member) is Literal:
            values = get_args(member)
            if any(isinstance(v, bool) for v in values):
                return None
            kinds += [type(v) for v in values if isinstance(v, int | float)]
        elif member in (int, float):
            kinds.append(member)
    if float in kinds:
        return "a number"
    return "an integer" if int in kinds else None


def _bool_misfit(annotation: Any, value: Any) -> tuple[str, bool, str] | None:
    """(where inside `value`, the boolean, what was expected) for a true/false that `annotation`
    would read as a number, at any depth of lists, tuples and mappings; None when there is none."""
    if isinstance(value, bool):
        kind = _number_kind(annotation)
        return None if kind is None else ("", value, kind)
    for member in _members(annotation):
        origin, args = get_origin(member), get_args(member)
        if isinstance(value, dict) and origin is dict and len(args) == 2:
            items = [(f".{key}", args[1], item) for key, item in value.items()]
        elif isinstance(value, list | tuple) and origin in (list, tuple) and args:
            fixed = origin is tuple and Ellipsis not in args and len(args) == len(value)
            kinds = args if fixed else [args[0]] * len(value)
            items = [(f"[{i}]", kind, item) for i, (kind, item) in enumerate(zip(kinds, value, strict=True))]
        else:
            continue
        for place, kind, item in items:
            found = _bool_misfit(kind, item)
            if found is not None:
                return (place + found[0]).removeprefix("."), found[1], found[2]
    return None


class DemoSettings(Strict):
    """`fersynth demo-data`: procedurally drawn faces written in RAF-DB's layout."""

    output: Path | None = None  # null: data/<experiment>/raw
    # Named demo data sets, each written to data/<experiment>/<name> with these overrides of
    # the settings below (e.g. a cross-dataset test set drawn with another seed); {} for none.
    sets: dict[SplitName, dict[str, Any]] = {}
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
    # The split of every row of a file without a Usage column (the challenge's train.csv);
    # null: the file's Usage column decides, through split_map.
    split: SplitName | None = None


class RafdbSettings(Strict):
    # 1: RAF-DB's own labels 1..7; 0: a re-numbered file with labels 0..6 (same class order).
    # A file that looks 0-based while this says 1 is an error, never shifted silently.
    label_base: Literal[0, 1] = 1
    # Image/aligned/<name>_aligned.jpg, or Image/original/<name> (auto: aligned when present).
    images: Literal["auto", "aligned", "original"] = "auto"


class FolderSettings(Strict):
    # What numbered class folders mean: a preset (the names of fersynth.classes.CLASS_MAP_PRESETS),
    # or folder=class pairs, e.g.
    # {0: neutral, 1: happy, 7: exclude} or "0=neutral,1=happy,7=exclude". Numbers are never
    # guessed: a numbered class folder without a map is an error.
    class_map: str | dict[str, str] | None = None

    @field_validator("class_map", mode="before")
    @classmethod
    def _class_map(cls, value: Any) -> str | dict[str, str] | None:
        from fersynth.classes import CLASS_MAP_PRESETS, EXCLUDE, folder_class

        if value is None or (isinstance(value, str) and "=" not in value):
            if value is not None and value not in CLASS_MAP_PRESETS:
                raise ValueError(
                    f"not a preset ({', '.join(CLASS_MAP_PRESETS)}) nor FOLDER=CLASS pairs "
                    "such as 0=neutral,1=happy"
                )
            return value
        if isinstance(value, str):
            pairs = [part.partition("=") for part in value.split(",") if part.strip()]
            if any(not sep or not key.strip() for key, sep, _ in pairs):
                raise ValueError("expected FOLDER=CLASS pairs separated by commas, e.g. 0=neutral,1=happy")
            value = {key.strip(): name.strip() for key, _, name in pairs}
        if not isinstance(value, dict) or not value:
            raise ValueError("expected a preset name or a non-empty mapping of folder to class")
        mapping = {}
        for key, name in value.items():
            canonical = EXCLUDE if str(name).strip().lower() == EXCLUDE else folder_class(str(name))
            if canonical is None:
                raise ValueError(f"folder {key}: {name!r} is not a class (or {EXCLUDE})")
            mapping[str(key).strip()] = canonical
        return mapping

    def mapping(self) -> dict[str, str] | None:
        """Folder name -> canonical class or EXCLUDE; None when no map is given."""
        from fersynth.classes import CLASS_MAP_PRESETS

        if isinstance(self.class_map, str):
            return CLASS_MAP_PRESETS[self.class_map]
        return self.class_map


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
    input: Path | None = None  # folder or CSV; null: data/<experiment>/raw (the demo's)
    output: Path | None = None  # null: data/<experiment>/ingested
    workers: Annotated[int, Field(ge=0)] = 0  # 0 = every CPU core
    drop_train_test_duplicates: bool = True
    # The validation split every row selects on, drawn from the training images (stratified,
    # seeded, exact copies kept together) when the source has no val split; 0: none.
    val_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.1
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 95
    fer2013: Fer2013Settings = Fer2013Settings()
    ferplus: FerPlusSettings = FerPlusSettings()
    affectnet: AffectNetSettings = AffectNetSettings()
    rafdb: RafdbSettings = RafdbSettings()
    folder: FolderSettings = FolderSettings()


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

    data: Path | None = None  # null: data/<experiment>/ingested
    output: Path | None = None  # null: data/<experiment>/quality
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


# Why MEK and the class-balanced sampler are never combined (settings, grid rows and voters).
MEK_WITH_BALANCED = (
    "MEK with the balanced sampler weights minor classes twice (the sampler equalises classes, MEK's "
    "w_c = N / (10 n_c) weights them again): use MEK with sampler plain, or SL with balanced"
)


class MekSettings(Strict):
    """MEK (Leave No Stone Unturned, NeurIPS 2023), as its official code."""

    smoothing: Fraction = 0.3  # eps of the re-balanced smooth labels
    attention_weight: Annotated[float, Field(ge=0.0)] = 0.1  # weight of L_rac
    class_weights: list[Annotated[float, Field(gt=0.0)]] | None = None  # pins w_c (7 values)
    # The counts w_c comes from (a pinned class_weights wins over both). "original": the original
    # training counts, for every row alike (DESIGN "Evaluation protocol"): a dataset written by
    # `fersynth augment` has them in augment_report.json (per_class.<class>.original; the
    # synthetic-only variants have no real training image to count); any other dataset is the
    # original, its training split counted. "own": the training split's counts, whatever it is.
    class_weights_from: Literal["original", "own"] = "original"
    # The official code scales every rate by batch/512 (code/train_exp.py: lr, warmup_lr and
    # min_lr times total_batch_size / 512): null keeps train.lr, train.warmup_lr and
    # train.min_lr as given; 512 multiplies them by train.batch_size / 512 (MEK runs only).
    lr_scale_batch: Positive | None = None
    warmup_steps: Annotated[int, Field(ge=0)] | None = None  # null: train.warmup_steps

    @field_validator("class_weights")
    @classmethod
    def _seven(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) != 7:
            raise ValueError("expected 7 class weights, in the canonical class order")
        return value


class TrainSettings(Strict):
    """`fersynth train`: the thesis defaults (Swin-T, AdamW, cosine, 100k steps, fp16)."""

    data: Path | None = None  # null: data/<experiment>/guarded
    output: Path | None = None  # null: runs/<experiment>/models/train (a grid row: its folder)
    arch: str = "swin_tiny_patch4_window7_224"  # any timm model name
    pretrained: str | None = None  # local file or s3:// URI; none = random initialisation
    image_size: Annotated[int, Field(ge=16, le=1024)] = 224
    resize: Annotated[int, Field(ge=16, le=2048)] | None = None  # default image_size * 256/224
    window_size: Positive | None = None  # Swin: 4 at 128 px keeps MEK's maps flip-aligned
    # 1: the model's first layer takes one grey channel (grey data such as FER2013: a third of
    # the stem's work); 3: RGB.
    in_chans: Literal[1, 3] = 3
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
    # DataLoader processes (the in-memory path needs none); auto: 4 on a CPU, on CUDA the
    # machine's cores less two, at most 16 (fersynth.train.device_settings).
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # Decode the training images once and augment whole batches on the training device (auto:
    # when they fit in 1 GiB).
    in_memory: Literal["auto", "always", "never"] = "auto"
    device: Device = "auto"
    # torch's CPU threads: part of the result on a CPU, which splits float sums by thread
    # (docs/testing.md#reproducibility); 0: torch's choice (OMP_NUM_THREADS, else every core);
    # auto: 2 on a CPU (reproducible tables), 0 on CUDA (every core feeds the GPU).
    cpu_threads: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # torch.compile the training step (auto: on CUDA where a C compiler is on PATH; a CPU run
    # compiles for minutes).
    compile: bool | Literal["auto"] = "auto"
    channels_last: bool = True
    log_every: Positive = 100
    checkpoint_every: Positive = 2_000
    eval_every: Positive = 2_000
    select_metric: Literal["mean_accuracy", "accuracy"] = "mean_accuracy"
    # [f, folds]: train without the training images of fold f (fersynth.folds; set per fold for
    # the cross-fitted voters of experiment.voter_folds); null: the whole training split.
    fold: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=2)]] | None = None
    mek: MekSettings = MekSettings()

    @model_validator(mode="after")
    def _mek_not_balanced(self) -> TrainSettings:
        if self.method == "mek" and self.balanced_sampler:
            raise ValueError(f"method = 'mek' and balanced_sampler = true: {MEK_WITH_BALANCED}")
        return self


class EvaluateSettings(Strict):
    """`fersynth evaluate`: one model on one or more test sets."""

    model: Path | None = None  # null: the first grid row's model
    # Test set folders, in-domain first; each result is named by its folder's name.
    # null: every test set of the experiment (data/<experiment>/test_sets/<name>).
    data: list[Path] | None = None
    split: SplitName = "test"
    output: Path | None = None  # null: runs/<experiment>/eval/<row>
    batch_size: Positive = 128
    workers: Annotated[int, Field(ge=0)] = 2
    device: Device = "auto"
    cpu_threads: Annotated[int, Field(ge=0)] = 2  # as train.cpu_threads
    tta_flip: bool = True  # average the predictions of the image and its mirror


class LatentDiffusionSettings(Strict):
    """The class-conditional latent diffusion model of the gif-ldm backend (generate/ldm.py),
    trained by `fersynth train-prior` on the autoencoder's latents of the training split."""

    # 0: none (gif-prior needs only the autoencoder); gif-ldm needs one (the demo's measurement
    # used 1500 steps: docs/benchmarks.md#offline-generation).
    steps: Annotated[int, Field(ge=0)] = 0
    channels: list[Annotated[int, Field(ge=8)]] = [32, 64, 64]  # UNet blocks, attention in the last
    layers_per_block: Positive = 1
    batch_size: Positive = 32
    lr: Annotated[float, Field(gt=0.0)] = 5e-4
    # The saved UNet is the EMA of its weights (diffusers EMAModel with warm-up: the decay is
    # 1 - (1 + step)^(-2/3), about 0.992 after 1,500 steps, capped at ema_decay).
    ema_decay: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.999
    # Share of training labels replaced by the null class, for classifier-free guidance.
    class_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    train_timesteps: Positive = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"


class PriorSettings(Strict):
    """`fersynth train-prior`: the offline autoencoder prior of the gif-prior backend and, on
    its latents, the class-conditional latent diffusion model of gif-ldm."""

    data: Path | None = None  # null: data/<experiment>/guarded
    output: Path | None = None  # null: runs/<experiment>/prior
    image_size: Annotated[int, Field(ge=16, le=512)] = 64
    channels: list[Annotated[int, Field(ge=8)]] = [16, 32, 64]  # 3 blocks: 64 px -> 16x16 latent
    # Channels of the latent (Stable Diffusion 1.x: 4; SD3: 16). More keep more detail through
    # the autoencoder, which bounds how varied any generated image can be.
    latent_channels: Positive = 8
    steps: Positive = 1500
    batch_size: Positive = 32
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    kl_weight: Annotated[float, Field(ge=0.0)] = 1e-6
    workers: Annotated[int, Field(ge=0)] = 1
    device: Device = "auto"
    cpu_threads: Annotated[int, Field(ge=0)] = 2  # as train.cpu_threads
    diffusion: LatentDiffusionSettings = LatentDiffusionSettings()

    @model_validator(mode="after")
    def _latent_fits_the_unet(self) -> PriorSettings:
        """The diffusion UNet halves its input len(channels) - 1 times: refused before any
        training, not after the autoencoder has trained."""
        if self.diffusion.steps:
            side = self.image_size / 2 ** (len(self.channels) - 1)
            halvings = 2 ** (len(self.diffusion.channels) - 1)
            if side != int(side) or int(side) % halvings:
                raise ValueError(
                    f"diffusion: the {side:g} px latent (image_size {self.image_size}, "
                    f"{len(self.channels)} autoencoder blocks) must divide by {halvings} "
                    f"for {len(self.diffusion.channels)} UNet blocks"
                )
        return self


Backend = Literal["gif-ldm", "gif-prior", "gif-sd", "gif-unclip", "seed-copy"]
# seed-copy: the null generator, each output its seed view unchanged (the copy twins' pool).
# The backends that also draw new identities from noise (an autoencoder and unCLIP img2img cannot).
IDENTITY_BACKENDS = ("gif-sd", "gif-ldm")
# Per backend, the img2img strength and classifier-free guidance scale that `generate.strength`
# and `generate.scale` default to: gif-sd's are the thesis' (K=5, scale 50, strength 0.1);
# gif-ldm's were measured on the demo by benchmarks/ldm_strength.py (docs/benchmarks.md).
BACKEND_DEFAULTS: dict[str, dict[str, float]] = {
    "gif-sd": {"steps": 50, "strength": 0.1, "scale": 50.0},
    "gif-unclip": {"steps": 50, "strength": 0.1, "scale": 50.0},  # unCLIP img2img has no strength
    "gif-prior": {"steps": 50, "strength": 0.1, "scale": 50.0},  # no noise schedule, no conditioning
    "gif-ldm": {"steps": 20, "strength": 0.5, "scale": 2.0},
}


class EditSettings(Strict):
    """Cross-class expression editing towards one target class (as SDAFE and SynFER do for the
    long tail): seed images of abundant classes are edited towards the target's expression;
    the target is the intended label and the vote decides. Within-class expansion alone
    cannot give a class many more faces than it has seed images."""

    sources: list[str] = ["neutral", "happy"]  # seed classes whose training images are edited
    max_seeds: Positive | None = 100  # source images drawn (seeded, shared over sources); null: all
    # gif-sd, gif-ldm: noised for int(strength * steps) of the DDIM steps before the target's
    # prompt (class) denoises; within-class expansion's 0.1 keeps the expression, editing needs more.
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        from fersynth.classes import CLASSES

        unknown = sorted(set(value) - set(CLASSES))
        if unknown or not value:
            raise ValueError(f"expected one or more of {', '.join(CLASSES)}; got {value}")
        return value


def _known_classes(value: list[str]) -> list[str]:
    from fersynth.classes import CLASSES

    unknown = sorted(set(value) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; expected {', '.join(CLASSES)}")
    return value


ClassNames = Annotated[list[str], AfterValidator(_known_classes)]  # canonical class names only


# gif-sd's text-to-image guidance scale for new identities: diffusers' default (img2img's 50
# would oversaturate a face drawn from pure noise).
IDENTITY_SD_SCALE = 7.5


class IdentitySettings(Strict):
    """New identities (the thesis' Syn-FER; SynFace / SynFER style): text-to-image from random
    latents, no seed image. gif-sd prompts Stable Diffusion with an expression and a face
    varied over age, gender, ethnicity, lighting, pose and accessories; gif-ldm samples its
    class-conditional latent diffusion model from noise. The prompted class is only a wish:
    `fersynth verify` labels every identity image by the voters' majority (as `--relabel`)."""

    # New faces prompted per class, drawn K (generate.k) per job: rounded up to a multiple of K.
    per_class: Annotated[int, Field(ge=0)] = 0  # 0: no new identities
    classes: ClassNames | None = None  # prompted classes; null: every class
    # Classifier-free guidance of the text-to-image; null: IDENTITY_SD_SCALE for gif-sd,
    # generate.scale for gif-ldm.
    scale: Annotated[float, Field(ge=1.0)] | None = None
    steps: Positive | None = None  # denoising steps from pure noise; null: generate.steps

    @model_validator(mode="after")
    def _some_class(self) -> IdentitySettings:
        if self.per_class and self.classes == []:
            raise ValueError("classes: empty, so no new identity would be drawn; list some, or null for all")
        return self


class GenerateSettings(Strict):
    """`fersynth generate`: GIF guided imagination, K outputs per training image, in shards."""

    data: Path | None = None  # null: data/<experiment>/guarded
    output: Path | None = None  # null: data/<experiment>/generated (shards/, then dataset/)
    # gif-prior and gif-ldm need no external weights (docs/stages.md#generation-gif-guided-imagination).
    backend: Backend = "gif-prior"
    k: Positive = 5  # outputs per seed image (thesis K=5)
    classes: ClassNames | None = None  # seed classes to expand; null = every class, [] = none (edits only)
    max_seeds_per_class: Positive | None = None
    seeds_per_batch: Positive = 1  # seed images per forward batch (x K outputs)
    guide: Literal["fer", "clip"] = "fer"
    # fer: a grid row on the original data (its model) or a fersynth model; clip: a CLIP folder.
    # Default: the class-balanced row, which recognises the minor classes GIF's class term rewards.
    guide_model: str = "original_sl_balanced"
    prior: Path | None = None  # gif-prior, gif-ldm: the trained prior folder; null: prior.output
    sd_model: str | None = None  # gif-sd: diffusers Stable Diffusion folder or s3:// prefix
    # gif-unclip: a diffusers Stable unCLIP folder or s3:// prefix (GIF's DALL-E 2 setting); its
    # guide is `clip`, a CLIP folder whose image embeddings are the unCLIP image encoder's.
    unclip_model: str | None = None
    image_size: Annotated[int, Field(ge=32, le=1024)] = 512  # gif-sd working resolution
    steps: Positive | None = None  # DDIM steps; null: the backend's (gif-sd: the thesis' 50)
    # Noised for int(strength * steps) of the steps; null: the backend's (BACKEND_DEFAULTS).
    strength: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # Classifier-free guidance scale; null: the backend's (gif-sd: the thesis' 50).
    scale: Annotated[float, Field(ge=1.0)] | None = None
    step_size: Annotated[float, Field(gt=0.0)] = 0.1  # GIF's signed-gradient step on z and b
    # L-inf radius around the denoised latent. GIF's noise moves unit-variance latents by about
    # 1, so at 0.1 the projection clips 93% of the entries and the guided step barely acts; at
    # 0.8 (what most of the official README's runs use) about half (benchmarks/results/gif_eps.json).
    eps: Annotated[float, Field(gt=0.0)] = 0.8
    # Each output starts from its seed rotated by up to this many degrees and flipped at random
    # (the official GIF code's augmentation: RandomRotation(15), RandomHorizontalFlip).
    seed_rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 15.0
    seed_hflip: bool = True
    # gif-prior: add the seed view's reconstruction error back to each output, so that the small
    # prior's blur does not make the outputs near-copies of a class average (backends.GifPrior).
    keep_detail: bool = True
    prompt_variants: bool = True  # GIF-style domain and adjective variants of the class prompt
    device: Device = "auto"
    cpu_threads: Annotated[int, Field(ge=0)] = 2  # as train.cpu_threads
    # On CUDA: fp16 UNet and text encoder; gif-sd's VAE in bf16, gif-prior's and gif-ldm's decoder
    # under bf16 autocast (float32 weights and encoder); gif-unclip all in fp16.
    half: bool = True
    # Cross-class editing, per target class: {fear: {sources: [neutral, happy], strength: 0.6}};
    # K outputs per edited seed image, besides the within-class expansion of `classes`.
    edit: dict[str, EditSettings] = {}
    # New identities, besides the seed images' expansion and edits (gif-sd and gif-ldm).
    identities: IdentitySettings = IdentitySettings()
    # Generation sized to the need (fersynth.generate.sizing). "need": per class, the outputs
    # that the grid's variants need (their rho or balance target minus the real count) divided
    # by `acceptance`, at most `max_per_class`; as many seed images as that takes at K (at most
    # max_seeds_per_class), and K raised up to `max_k` where the class has too few seed images.
    # "fixed" (also when `variants` is null outside a whole profile): max_seeds_per_class seed
    # images x K in every class.
    sizing: Literal["need", "fixed"] = "need"
    # The share of a class' generated images the vote is expected to accept: one value, or per
    # class (the verify report's acceptance column of a previous run is the measurement).
    acceptance: (
        Annotated[float, Field(gt=0.0, le=1.0)] | dict[str, Annotated[float, Field(gt=0.0, le=1.0)]]
    ) = 0.5
    max_k: Positive = 20  # outputs per seed image at most when a class is short of seeds
    max_per_class: Positive | None = None  # generated outputs per class at most; null: no cap
    # Derived from the grid unless set: the variants generation is sized for and their rho
    # (null: experiment.grid's variants and augment.rho), and whether each output gets a copy
    # twin from the null generator (null: when a grid row is a copy twin, `twin_of`).
    variants: list[str] | None = None
    rho: Annotated[float, Field(ge=1.0)] | None = None
    copy_twins: bool | None = None

    @field_validator("acceptance")
    @classmethod
    def _acceptance_classes(cls, value: Any) -> Any:
        from fersynth.classes import CLASSES

        if isinstance(value, dict):
            unknown = sorted(set(value) - set(CLASSES))
            if unknown:
                raise ValueError(f"{unknown[0]!r} is not a class; expected {', '.join(CLASSES)}")
        return value

    @model_validator(mode="after")
    def _max_k_not_below_k(self) -> GenerateSettings:
        if self.max_k < self.k:
            raise ValueError(f"max_k = {self.max_k}: below k = {self.k} (K is only ever raised)")
        return self

    def acceptance_of(self, name: str) -> float:
        """The expected acceptance of class `name` (`acceptance`; 0.5 for a class a mapping omits)."""
        if isinstance(self.acceptance, dict):
            return float(self.acceptance.get(name, 0.5))
        return float(self.acceptance)

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults(cls, data: Any) -> Any:
        """Resolve a null steps, strength or scale to the backend's, so that every saved
        settings file holds the value that ran."""
        if not isinstance(data, dict):
            return data
        backend = data.get("backend") or cls.model_fields["backend"].default
        defaults = BACKEND_DEFAULTS.get(backend, {})
        return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}

    @model_validator(mode="after")
    def _unclip_needs(self) -> GenerateSettings:
        """gif-unclip's mistakes, before anything is downloaded or loaded."""
        if self.backend == "gif-unclip":
            if self.guide != "clip":
                raise ValueError(
                    "guide: gif-unclip scores CLIP image embeddings; set guide: clip and guide_model "
                    "to the CLIP folder of the unCLIP image encoder"
                )
            if self.image_size % 8:
                raise ValueError(f"image_size: gif-unclip needs a multiple of 8, not {self.image_size}")
        return self

    @model_validator(mode="after")
    def _identities_need_a_generator(self) -> GenerateSettings:
        if self.identities.per_class and self.backend not in IDENTITY_BACKENDS:
            raise ValueError(
                f"identities: {self.backend} cannot draw a face from noise; use "
                f"{' or '.join(IDENTITY_BACKENDS)}, or set identities.per_class: 0"
            )
        return self

    @field_validator("edit")
    @classmethod
    def _edit_targets(cls, value: dict[str, EditSettings]) -> dict[str, EditSettings]:
        from fersynth.classes import CLASSES

        for target, edit in value.items():
            if target not in CLASSES:
                raise ValueError(f"target {target!r} is not a class; expected {', '.join(CLASSES)}")
            if target in edit.sources:
                raise ValueError(f"{target}: a class is not edited towards itself (that is expansion)")
        return value


class GuardSettings(Strict):
    """`fersynth guard`: remove training images that copy a test image (exactly or nearly)."""

    data: Path | None = None  # null: data/<experiment>/quality
    output: Path | None = None  # null: data/<experiment>/guarded
    # Other datasets whose evaluation splits must not leak either; null: the experiment's
    # cross-dataset test sets.
    test_sets: list[Path] | None = None
    # A near-copy: perceptual-hash Hamming distance (of 64 bits) at most this, confirmed by a
    # correlation of the two images' grey 32x32 thumbnails of at least min_correlation.
    max_distance: Annotated[int, Field(ge=0, le=32)] = 6
    min_correlation: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.95
    workers: Annotated[int, Field(ge=0)] = 0  # 0 = every CPU core


class VerifySettings(Strict):
    """`fersynth verify`: multi-model voting on synthetic images, the leakage guard, and the
    fidelity and diversity report (thesis 3.3.2)."""

    data: Path | None = None  # the merged synthetic dataset; null: generate.output/dataset
    reference: Path | None = None  # the original data (test split, real features); null: guarded
    output: Path | None = None  # null: data/<experiment>/verified
    # experiment.voters, grid rows on the original data (their models) or fersynth model folders;
    # null: every experiment voter. The generation guide may vote only with allow_guide_voter.
    voters: list[str] | None = None
    allow_guide_voter: bool = False
    mode: Literal["intended", "relabel"] = "intended"  # relabel: label = the voters' majority
    min_votes: Positive = 2  # m of N voters must predict the label
    min_probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # tau: mean probability of it
    # A class is verifiable when at least min_votes voters recall this much of it on the real
    # validation split (chance is 1/7); its images are rejected as unrecognised otherwise.
    min_recall: Fraction = 0.3
    # Per class, tau is lowered to this quantile of the voters' mean probability on the real
    # validation images of the class that they vote right (never raised); null: tau for all.
    probability_quantile: Fraction | None = 0.1
    tta_flip: bool = True
    batch_size: Positive = 128
    device: Device = "auto"
    cpu_threads: Annotated[int, Field(ge=0)] = 2  # as train.cpu_threads
    workers: Annotated[int, Field(ge=0)] = 1  # data-loading processes
    fidelity_images_per_class: Positive = 500  # real and synthetic images sampled per class
    kid_subset_size: Positive = 50
    # An expansion or edit closer to its own seed image (first voter's pre-logit features) than
    # this percentile of the real training images' nearest-neighbour distances within its
    # class (up to fidelity_images_per_class of them) is rejected as a near copy; null: no check.
    near_copy_percentile: Annotated[float, Field(ge=0.0, le=100.0)] | None = 5.0


AugmentVariant = Literal[
    "original",
    "synthetic",
    "synthetic_matched",
    "expanded",
    "expanded_balanced",
    "balanced",
    "rho",
    "identities",
]


class AugmentSettings(Strict):
    """`fersynth augment`: thesis Algorithm 4, accepted synthetic images into the minor classes."""

    original: Path | None = None  # null: data/<experiment>/guarded
    synthetic: Path | None = None  # null: verify.output
    output: Path | None = None  # null: data/<experiment>/augmented/<variant>
    variant: AugmentVariant = "rho"
    # generated: the generator's accepted images; copies: the copy twins' (the null generator's
    # seed views), as many per class as the same variant takes from the generated pool.
    pool: Literal["generated", "copies"] = "generated"
    rho: Annotated[float, Field(ge=1.0)] = 2.0  # largest / smallest class count to reach


class ReportSettings(Strict):
    """`fersynth report`: one page per run with the tables, pictures and stage summaries."""

    # Every null below is the experiment's own folder (runs/<experiment>/..., data/<experiment>/...).
    output: Path | None = None
    comparisons: list[Path] | None = None  # `fersynth compare` outputs, in-domain first
    evaluations: Path | None = None  # <row key>/<test set>/confusion.png
    quality: Path | None = None
    verify: Path | None = None
    augment: Path | None = None  # the augmented set of the first row on synthetic data
    generated: Path | None = None
    # Each row on synthetic data against the rows it must beat (labels); null: the grid's `beats`.
    changes: list[tuple[str, str]] | None = None
    # The results page for the repository (tables only); null: docs/results/<experiment>.md.
    results_page: Path | None = None
    # The folder holding stage_times.jsonl (fersynth.stage_times); null: runs/<experiment>.
    stage_times: Path | None = None
    # Table label -> row key (the folder of its results); null: the grid's rows.
    row_keys: dict[str, str] | None = None
    # (row, its copy twin) labels, for "what the generator added"; null: the grid's twin_of.
    twins: list[tuple[str, str]] | None = None
    # Table label -> (its training set: a folder beside `augment`, "" for the original data;
    # its sampler), for the per-class counts and shares of draws; null: the grid's rows.
    training_sets: dict[str, tuple[str, str]] | None = None


Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")]
RowKey = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class GridRow(Strict):
    """One row of the experiment grid: how a model is trained and what it must beat."""

    method: Literal["sl", "mek"] = "sl"
    sampler: Literal["plain", "balanced"] = "plain"  # balanced: the cheapest competitor's sampler
    # The training set: rows on the original data leave it null; rows on synthetic data name
    # the variant of Algorithm 4 (`fersynth augment`) they train on.
    variant: AugmentVariant | None = None
    beats: list[RowKey] = []  # rows this row must beat (the report's per-class changes)
    label: str | None = None  # the table's name; null: from the key (expanded_sl -> Expanded_SL)
    # A row on synthetic data whose copy twin this row is: the same method, sampler and variant
    # on the null generator's seed copies, with the same count per class ("what the generator
    # added" = that row minus this one).
    twin_of: RowKey | None = None

    @model_validator(mode="after")
    def _mek_not_balanced(self) -> GridRow:
        if self.method == "mek" and self.sampler == "balanced":
            raise ValueError(f"method mek with sampler balanced: {MEK_WITH_BALANCED}")
        return self


class GridSettings(Strict):
    """The experiment grid, each row trained once per seed. A row on the original data guides
    generation (generate.guide_model); the voters are models of their own (experiment.voters)."""

    original: dict[RowKey, GridRow] = {
        "original_sl": GridRow(method="sl"),
        "original_sl_balanced": GridRow(method="sl", sampler="balanced"),
        "original_mek": GridRow(method="mek"),
    }
    synthetic: dict[RowKey, GridRow] = {
        "expanded_sl": GridRow(method="sl", variant="rho", beats=["original_sl", "original_sl_balanced"]),
        "synthetic_mek": GridRow(  # the thesis' Synthetic set: Syn-FER-Expand
            method="mek", variant="synthetic_matched", beats=["original_mek", "original_sl_balanced"]
        ),
        "expanded_mek": GridRow(method="mek", variant="rho", beats=["original_mek", "original_sl_balanced"]),
    }

    # Training seeds: every row trains once per seed, and the tables show the mean and the spread
    # over them (differences count only beyond it). null: the experiment's one `seed`.
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GridSettings:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds = {self.seeds}: give one or more different seeds")
        if self.seeds is not None:  # in order: the first seed (the guide's model) is the smallest
            object.__setattr__(self, "seeds", sorted(self.seeds))
        both = set(self.original) & set(self.synthetic)
        if both:
            raise ValueError(f"row names used twice: {sorted(both)}")
        if not self.original:
            raise ValueError("at least one row on the original data is needed (voters, guide)")
        for key, row in self.original.items():
            if row.variant not in (None, "original"):
                raise ValueError(f"original.{key}: a row on the original data has no variant")
        for key, row in self.synthetic.items():
            if row.variant is None:
                raise ValueError(f"synthetic.{key}: name the variant it trains on (rho, synthetic, ...)")
        rows = {**self.original, **self.synthetic}
        for key, row in rows.items():
            unknown = sorted(set(row.beats) - set(rows))
            if unknown:
                raise ValueError(f"{key}.beats: unknown rows {unknown}")
            if key in row.beats:
                raise ValueError(f"{key}.beats: a row cannot beat itself")
        for key, row in self.original.items():
            if row.beats:
                raise ValueError(f"original.{key}.beats: only rows on synthetic data are compared")
            if row.twin_of:
                raise ValueError(f"original.{key}.twin_of: only rows on synthetic data have copy twins")
        for key, row in self.synthetic.items():
            if row.twin_of is None:
                continue
            real = self.synthetic.get(row.twin_of)
            if real is None:
                raise ValueError(f"synthetic.{key}.twin_of: {row.twin_of!r} is no row on synthetic data")
            if real.twin_of is not None:
                raise ValueError(f"synthetic.{key}.twin_of: {row.twin_of!r} is itself a copy twin")
            for field in ("method", "sampler", "variant"):
                mine, theirs = getattr(row, field), getattr(real, field)
                if mine != theirs:
                    raise ValueError(
                        f"synthetic.{key}.{field} = {mine!r}: a copy twin differs from its row "
                        f"{row.twin_of!r} ({field} {theirs!r}) only in the generator"
                    )
            if row.variant == "identities":
                raise ValueError(f"synthetic.{key}: new identities have no seed image to copy")
        labels = [row_label(key, row) for key, row in rows.items()]
        doubled = sorted({label for label in labels if labels.count(label) > 1})
        if doubled:
            raise ValueError(f"two rows share the label {doubled[0]!r}: each row needs its own")
        return self

    def rows(self) -> dict[str, GridRow]:
        """Every row, those on the original data first."""
        return {**self.original, **self.synthetic}

    def variants(self) -> list[str]:
        """The augmented sets the rows on the generated images train on, in grid order."""
        return list(dict.fromkeys(str(row.variant) for row in self.synthetic.values() if not row.twin_of))

    def twin_variants(self) -> list[str]:
        """The augmented sets of seed copies the copy twins train on, in grid order."""
        return list(dict.fromkeys(str(row.variant) for row in self.synthetic.values() if row.twin_of))

    def twins(self) -> dict[str, str]:
        """{row: its copy twin} for every row on synthetic data that has one."""
        return {str(row.twin_of): key for key, row in self.synthetic.items() if row.twin_of}


def row_label(key: str, row: GridRow | None = None) -> str:
    """`expanded_sl` -> `Expanded_SL`: the thesis' row names (or the row's own label)."""
    if row is not None and row.label:
        return row.label
    head, _, tail = key.partition("_")
    parts = [part.upper() if part in ("sl", "mek") else part for part in tail.split("_") if part]
    return "_".join([head.capitalize(), *parts])


class VoterSpec(Strict):
    """A model trained on the original data only to vote on synthetic images (thesis 3.3.2).

    Voters are not the guide that steered generation, differ from each other (seed and/or
    backbone), and use the class-balanced sampler by default, so that they recognise the minor
    classes they vote on."""

    method: Literal["sl", "mek"] = "sl"
    sampler: Literal["plain", "balanced"] = "balanced"
    arch: str | None = None  # a timm model name; null: train.arch
    seed: Annotated[int, Field(ge=0, lt=2**32)]

    @model_validator(mode="after")
    def _mek_not_balanced(self) -> VoterSpec:
        if self.method == "mek" and self.sampler == "balanced":
            raise ValueError(f"method mek with sampler balanced (voters' default): {MEK_WITH_BALANCED}")
        return self


class CrossTestSet(Strict):
    """A cross-dataset test set, ingested from its own source into data/<experiment>/test_sets."""

    source: Source
    input: Path
    options: dict[str, Any] = {}  # other ingest.* settings for this source, e.g. fer2013.split_map


class ExperimentSettings(Strict):
    """What is compared, on which data: the grid, the test sets, and where outputs go."""

    name: Name = "demo"  # outputs under data/<name>/ and runs/<name>/; MLflow tag `profile`
    in_domain: SplitName = "in_domain"  # the name of the data's own test split as a test set
    cross_sets: dict[SplitName, CrossTestSet] = {}  # other datasets' test sets, by name
    grid: GridSettings = GridSettings()
    # Models trained only to vote (verify.voters names them): three class-balanced SL models
    # that differ by seed.
    voters: dict[RowKey, VoterSpec] = {
        "voter_1": VoterSpec(seed=1),
        "voter_2": VoterSpec(seed=2),
        "voter_3": VoterSpec(seed=3),
    }
    # Cross-fitting (fersynth.folds): each voter is trained once per fold of the training split,
    # without that fold, and votes only on images whose seed is in it, so that no voter judges
    # a copy of an image it trained on. 0: each voter trains once on the whole training split.
    voter_folds: Annotated[int, Field(ge=0)] = 2

    @field_validator("voter_folds")
    @classmethod
    def _not_one_fold(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one fold would leave a voter nothing to train on: use 0 (off) or 2 or more")
        return value

    @model_validator(mode="after")
    def _names(self) -> ExperimentSettings:
        if self.in_domain in self.cross_sets:
            raise ValueError(f"cross_sets: {self.in_domain!r} is the in-domain test set's name")
        rows = set(self.grid.rows())
        labels = {row_label(key, row) for key, row in self.grid.rows().items()}
        for key in self.voters:
            if key in rows or key in labels:
                raise ValueError(f"voters.{key}: also a row of the grid; give the voter its own name")
        specs = [(v.method, v.sampler, v.arch, v.seed) for v in self.voters.values()]
        if len(set(specs)) != len(specs):
            raise ValueError(
                "voters: two voters are the same model (method, sampler, arch, seed); make them differ"
            )
        return self

    def test_sets(self) -> list[str]:
        """Every test set's name, the in-domain one first."""
        return [self.in_domain, *self.cross_sets]

    def seeds(self, seed: int) -> list[int]:
        """The training seeds of every grid row (`grid.seeds`, else the experiment's `seed`)."""
        return list(self.grid.seeds) if self.grid.seeds else [seed]


# Folders under data/<experiment>/ that stages write: a demo set cannot take these names.
RESERVED_FOLDERS = ("ingested", "quality", "guarded", "generated", "verified", "augmented", "test_sets")


class Layout:
    """Where each stage's output lives: data/<experiment>/... and runs/<experiment>/... (relative
    to the project root). DVC's dvc.yaml and the tests follow the same layout."""

    def __init__(self, name: str) -> None:
        self.data = Path("data") / name
        self.runs = Path("runs") / name

    def demo_set(self, key: str) -> Path:
        return self.data / key

    def test_set(self, name: str) -> Path:
        return self.data / "test_sets" / name

    def model(self, key: str, on_original: bool) -> Path:
        # Models of rows on the original data sit apart: verify and generate depend on them,
        # and the rows on synthetic data depend on verify.
        return self.runs / "models" / ("original" if on_original else "synthetic") / key

    def voters(self) -> Path:
        # Apart from the rows' models: generation depends on those (the guide), not on voters.
        return self.runs / "voters"

    def voter(self, key: str) -> Path:
        return self.voters() / key

    def evaluation(self, key: str) -> Path:
        return self.runs / "eval" / key

    def comparison(self, test_set: str) -> Path:
        return self.runs / "compare" / test_set

    def row_metrics(self, key: str) -> Path:
        # A row's DVC metrics file and plots (fersynth.dvc_metrics), apart from its results
        # folder: DVC refuses a metrics output inside another output.
        return self.runs / "metrics" / f"{key}.json"

    def row_plots(self, key: str) -> Path:
        return self.runs / "plots" / key

    def augmented(self, variant: str, pool: str = "generated") -> Path:
        # The copy twins' sets sit beside the variants (a variant is never called copies_*).
        return self.data / "augmented" / (variant if pool == "generated" else f"copies_{variant}")


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
    data_path: str | None = None  # raw data, DVC-tracked in data_repo; null: ingest.input
    # The experiment's ingested test sets, DVC-tracked; null: data/<experiment>/test_sets.
    test_sets_path: str | None = None
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
    # Images with more pixels are refused wherever they are decoded (ingest rejects and names
    # them; predict reports them; train stops on them): decompression bombs and scans far
    # larger than a face needs. Default: Pillow's own limit, 89,478,485 pixels (about 9459^2).
    max_image_pixels: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_IMAGE_PIXELS
    experiment: ExperimentSettings = ExperimentSettings()
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

    @model_validator(mode="after")
    def _fill_layout(self) -> Settings:
        """Every path left null becomes the experiment's own folder (see `Layout`)."""
        grid = self.experiment.grid
        if self.verify.voters is None:
            object.__setattr__(self.verify, "voters", list(self.experiment.voters))
        models = [("verify.voters", key) for key in self.verify.voters]
        if self.generate.guide == "fer":
            models.append(("generate.guide_model", self.generate.guide_model))
        for where, key in models:
            if key in grid.synthetic:
                raise ValueError(f"{where}: {key!r} trains on synthetic data; use a row on the original data")
            known = (*grid.original, *self.experiment.voters)
            if key not in known and "/" not in key and not Path(key).suffix:
                raise ValueError(
                    f"{where}: {key!r} is no row of experiment.grid.original nor of experiment.voters "
                    f"({', '.join(known)}) nor a path"
                )
        guide = self.generate.guide_model if self.generate.guide == "fer" else None
        if guide is not None and guide in self.experiment.voters:
            raise ValueError(
                f"generate.guide_model: {guide!r} is a voter (experiment.voters); guide with a row of "
                "experiment.grid.original"
            )
        if guide is not None and not self.verify.allow_guide_voter:
            for key in self.verify.voters:
                same = self._same_model_as_guide(key, guide)
                if same:
                    raise ValueError(
                        f"verify.voters: {key!r} {same}, so the vote is not independent of the "
                        "generation guide (generate.guide_model); pick other voters "
                        "(experiment.voters) or set verify.allow_guide_voter: true"
                    )
        for key, row in grid.synthetic.items():
            if row.variant == "identities" and not self.generate.identities.per_class:
                raise ValueError(
                    f"experiment.grid.synthetic.{key}: trains on new identities, but "
                    "generate.identities.per_class is 0 (none are drawn)"
                )
        for name, values in self.demo.sets.items():
            if name in RESERVED_FOLDERS:
                raise ValueError(
                    f"demo.sets.{name}: data/<experiment>/{name} is a stage's output; pick another name"
                )
            try:
                DemoSettings.model_validate({**self.demo.model_dump(exclude={"sets"}), **values})
            except ValidationError as exc:
                problem = _format_errors("", exc).removeprefix(": ")
                raise ValueError(f"demo.sets.{name}: {problem}") from None
        for name, cross in self.experiment.cross_sets.items():
            try:
                IngestSettings.model_validate({**cross.options, "source": cross.source})
            except ValidationError as exc:
                problem = _format_errors("", exc).removeprefix(": ")
                raise ValueError(f"experiment.cross_sets.{name}.options: {problem}") from None
        at = self.layout
        first = next(iter(grid.original))
        variants = grid.variants()
        fill: list[tuple[BaseModel, dict[str, Any]]] = [
            (self.demo, {"output": at.demo_set("raw")}),
            (self.ingest, {"input": at.demo_set("raw"), "output": at.data / "ingested"}),
            (self.quality, {"data": at.data / "ingested", "output": at.data / "quality"}),
            (
                self.guard,
                {
                    "data": at.data / "quality",
                    "output": at.data / "guarded",
                    "test_sets": [at.test_set(n) for n in self.experiment.cross_sets],
                },
            ),
            (self.train, {"data": at.data / "guarded", "output": at.runs / "models" / "train"}),
            (
                self.evaluate,
                {
                    "model": self.model_folder(first),
                    "data": [at.test_set(n) for n in self.experiment.test_sets()],
                    "output": at.evaluation(first) / seed_folder(self.seeds[0]),
                },
            ),
            (self.prior, {"data": at.data / "guarded", "output": at.runs / "prior"}),
            (self.generate, {"data": at.data / "guarded", "output": at.data / "generated"}),
            (self.verify, {"reference": at.data / "guarded", "output": at.data / "verified"}),
            (self.augment, {"original": at.data / "guarded"}),
            (
                self.report,
                {
                    "output": at.runs / "report",
                    "comparisons": [at.comparison(n) for n in self.experiment.test_sets()],
                    "evaluations": at.runs / "eval",
                    "quality": at.data / "quality",
                    "verify": at.data / "verified",
                    "augment": at.augmented(variants[0] if variants else "rho"),
                    "generated": at.data / "generated" / "dataset",
                    "results_page": Path("docs") / "results" / f"{self.experiment.name}.md",
                    "stage_times": at.runs,
                    "row_keys": {row_label(key, row): key for key, row in grid.rows().items()},
                    "twins": [
                        (row_label(real, grid.synthetic[real]), row_label(twin, grid.synthetic[twin]))
                        for real, twin in grid.twins().items()
                    ],
                    "training_sets": {
                        row_label(key, row): (
                            at.augmented(str(row.variant), "copies" if row.twin_of else "generated").name
                            if key in grid.synthetic
                            else "",
                            row.sampler,
                        )
                        for key, row in grid.rows().items()
                    },
                    "changes": [
                        (row_label(key, row), row_label(base, grid.rows()[base]))
                        for key, row in grid.synthetic.items()
                        for base in row.beats
                    ],
                },
            ),
        ]
        # Voters and the guide named by grid row are that row's model folder.
        object.__setattr__(self.verify, "voters", [str(self.model_folder(v)) for v in self.verify.voters])
        if self.generate.guide == "fer":
            object.__setattr__(
                self.generate, "guide_model", str(self.model_folder(self.generate.guide_model))
            )
        for block, values in fill:
            for field, value in values.items():
                if getattr(block, field) is None:
                    object.__setattr__(block, field, value)  # no re-validation of the whole block
        for block, field, value in (
            (self.generate, "prior", self.prior.output),
            (self.verify, "data", Path(self.generate.output) / "dataset"),
            (self.augment, "synthetic", self.verify.output),
            (self.augment, "output", at.augmented(self.augment.variant, self.augment.pool)),
            (self.generate, "variants", [*variants, *grid.twin_variants()]),
            (self.generate, "rho", self.augment.rho),
            (self.generate, "copy_twins", bool(grid.twins())),
            (self.kfp, "data_path", str(self.ingest.input)),
            (self.kfp, "test_sets_path", str(at.data / "test_sets")),
        ):
            if getattr(block, field) is None:
                object.__setattr__(block, field, value)
        return self

    @property
    def layout(self) -> Layout:
        return Layout(self.experiment.name)

    def _same_model_as_guide(self, voter: str, guide: str) -> str | None:
        """Why `voter` is (a copy of) the guide's model, or None: the same row or folder (any
        seed, a path to it, its model file), or a voter trained by the guide row's recipe at one
        of the grid's seeds (a bit-identical model)."""

        def folder(key: str) -> Path:
            grid = self.experiment.grid
            if key in grid.original or key in grid.synthetic:
                return self.row_folder(key).resolve()
            path = self.model_folder(key)
            return (path.parent if path.suffix else path).resolve()

        guide_folder = folder(guide)
        voter_folder = folder(voter)
        if voter_folder == guide_folder or voter_folder.is_relative_to(guide_folder):
            return "is the guide's model"
        row = self.experiment.grid.original.get(guide)
        spec = self.experiment.voters.get(voter)
        if self.experiment.voter_folds:  # cross-fitted voters train without a fold: never the guide
            return None
        recipe = (row.method, row.sampler, self.train.arch) if row is not None else None
        if (
            spec is not None
            and spec.seed in self.seeds
            and recipe
            == (
                spec.method,
                spec.sampler,
                spec.arch or self.train.arch,
            )
        ):
            return f"trains as the guide row {guide!r} does, at its seed {spec.seed}"
        return None

    @property
    def seeds(self) -> list[int]:
        """The training seeds of every grid row (experiment.grid.seeds, else `seed`)."""
        return self.experiment.seeds(self.seed)

    def row_folder(self, key: str) -> Path:
        """A grid row's folder: one model folder per seed inside (`seed_folder`)."""
        return self.layout.model(key, on_original=key in self.experiment.grid.original)

    def cross_set_ingest(self, name: str) -> IngestSettings:
        """The ingest settings of cross-dataset test set `name`: this run's ingest settings with
        the set's source, input and options (merged as `-S ingest.KEY=...` would be), written to
        its test-set folder. Raises FersynthError for a bad option, naming the set."""
        cross = self.experiment.cross_sets[name]
        values = merge_mappings(self.ingest.model_dump(), cross.options)
        values.update(source=cross.source, input=cross.input, output=self.layout.test_set(name))
        try:
            return IngestSettings.model_validate(values)
        except ValidationError as exc:
            problem = _format_errors("", exc).removeprefix(": ")
            raise FersynthError(f"experiment.cross_sets.{name}: {problem}") from None

    def first_seed_folder(self, folder: Path) -> Path:
        """A row's folder (models or results) -> its first seed's; any other folder itself."""
        candidate = Path(folder) / seed_folder(self.seeds[0])
        return candidate if candidate.is_dir() else Path(folder)

    def model_folder(self, key_or_path: str, seed: int | None = None) -> Path:
        """A model folder: a grid row's (its first seed's unless `seed` is given), a voter's
        (experiment.voters), or the path itself (any fersynth model)."""
        grid = self.experiment.grid
        if key_or_path in grid.original or key_or_path in grid.synthetic:
            return self.row_folder(key_or_path) / seed_folder(self.seeds[0] if seed is None else seed)
        if key_or_path in self.experiment.voters:
            return self.layout.voter(key_or_path)
        return Path(key_or_path)

    def evaluation_folder(self, key: str, seed: int | None = None) -> Path:
        """A grid row's results for one seed (its first unless `seed` is given)."""
        return self.layout.evaluation(key) / seed_folder(self.seeds[0] if seed is None else seed)

    def row(self, key: str) -> GridRow:
        rows = self.experiment.grid.rows()
        if key not in rows:
            raise FersynthError(f"experiment.grid: no row {key!r} (rows: {', '.join(rows)})")
        return rows[key]


SEED_PREFIX = "seed_"


def seed_folder(seed: int) -> str:
    """The sub-folder of a grid row's models and results for one training seed."""
    return f"{SEED_PREFIX}{seed}"


def _format_errors(source: str, error: ValidationError, overrides: list[str] | None = None) -> str:
    """One `<where>: <key> = <value>: <problem>` per error; <where> is the -S override that set
    the key (or a section above or inside it), else `source`."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        # A check of the whole settings names its key in the message (`verify.voters: ...`).
        named = re.match(r"([A-Za-z_][\w-]*(?:\.[\w-]+)*): ", message)
        where = _override_of(key or (named.group(1) if named else ""), overrides) or source
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {key!r}")
        else:
            value = item.get("input")
            if isinstance(value, dict | list) or not key:  # a whole section: the message names the key
                lines.append(f"{where}: {key + ': ' if key else ''}{message}")
            else:
                lines.append(f"{where}: {key} = {value!r}: {message}")
    return "; ".join(lines)


def _override_of(key: str, overrides: list[str] | None) -> str | None:
    """`override K=V` for the overrides that set `key`, a section above it or a key inside it
    (the value the error is about came from them, not from the file); None when none did."""
    if not key:
        return None
    hits = []
    for pair in overrides or []:
        given = pair.partition("=")[0].strip()
        if given == key or key.startswith(f"{given}.") or given.startswith(f"{key}."):
            hits.append(pair.strip())
    return f"override {', '.join(hits)}" if hits else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"section.key": value} (mappings walked, other values kept)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


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
        _set_dotted(tree, key.strip(), read_yaml(raw, f"override {pair.strip()}", key.strip()))
    return tree


def merge_mappings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into `base` key by key, as an override is (an empty mapping replaces)."""
    merged = dict(base)
    for key, value in extra.items():
        # `-S section.map={}` empties a mapping; a non-empty one is merged key by key.
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def _duplicate_key(node: yaml.Node, path: str = "") -> str | None:
    """The first mapping key written twice under `node` (a composed YAML tree), as
    "<dotted key>: line <first> and line <second>"; None when every key is unique. PyYAML keeps
    the last value silently (a second `train:` section drops the first), YAML 1.2 forbids it."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, by design
                continue
            key = str(key_node.value)
            dotted = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                return f"key {dotted!r} written twice: line {seen[key]} and line {line}"
            seen[key] = line
            found = _duplicate_key(value_node, dotted)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, f"{path}[{index}]")
            if found:
                return found
    return None


def read_yaml(text: str, source: str, key: str = "") -> Any:
    """YAML text -> Python values, refusing a mapping key written twice (naming the key and
    both lines) and naming the line of a syntax error. Every params file, profile and `-S`
    value goes through here; `key`: the dotted key the text is the value of (an override's)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        found = _duplicate_key(node, key) if node is not None else None
        if found:
            raise FersynthError(f"{source}: {found}; keep one (the first would be dropped silently)")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or "unreadable"
        raise FersynthError(f"{source}:{where} not valid YAML ({problem})") from None


def load_settings(path: Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Settings:
    """Read and validate params.yaml (defaults when `path` is None) plus KEY=VALUE overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise FersynthError(f"{path}: parameter file not found")
        loaded = read_yaml(Path(path).read_text(encoding="utf-8"), str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise FersynthError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded
    return settings_from_mapping(raw, overrides, source)


def _backend_switch(raw: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """When an override changes generate.backend, the base's steps, strength and scale that hold
    the old backend's defaults (a resolved mapping, as a compiled pipeline carries, has them
    filled in) give way to the new backend's, unless the override sets them too."""
    generate, changes = raw.get("generate") or {}, extra.get("generate") or {}
    if not isinstance(generate, dict) or not isinstance(changes, dict):
        return raw
    old = generate.get("backend") or GenerateSettings.model_fields["backend"].default
    new = changes.get("backend")
    if not new or new == old:
        return raw
    defaults = BACKEND_DEFAULTS.get(old, {})
    kept = {k: v for k, v in generate.items() if k in changes or k not in defaults or v != defaults[k]}
    return {**raw, "generate": kept}


def settings_from_mapping(
    raw: dict[str, Any], overrides: list[str] | None = None, source: str = "defaults"
) -> Settings:
    """Validate a parameter mapping (a profile already read, e.g. the one a compiled pipeline
    carries) plus KEY=VALUE overrides; errors name `source`. The process decodes images under
    the settings' `max_image_pixels` from now on (fersynth.image_limit)."""
    if overrides:
        extra = parse_overrides(overrides)
        raw = merge_mappings(_backend_switch(raw, extra), extra)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise FersynthError(_format_errors(source, exc, overrides)) from None
    set_max_image_pixels(settings.max_image_pixels)
    return settings


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
