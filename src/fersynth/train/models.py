"""timm backbones for FER: building, pretrained weights, feature maps and the model file.

A trained model is one file, `model.pt`: the weights and everything needed to use them
(architecture, input size, normalisation, class order, training counts). It holds only
tensors and plain values, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_bytes
from fersynth.storage import fetch, is_s3

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
FORMAT = "fersynth-model/1"


@dataclass
class ModelSpec:
    """What is needed to rebuild a model and feed it images."""

    arch: str
    image_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    window_size: int | None = None
    classes: tuple[str, ...] = CLASSES
    in_chans: int = 3  # 1: grey input (see `grey_stem`); model files before it hold RGB models
    train_counts: dict[str, int] = field(default_factory=dict)


def default_resize(image_size: int) -> int:
    """The thesis resizes to 256 before a 224 crop; keep that ratio at other sizes."""
    return round(image_size * 256 / 224)


def _timm_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": len(spec.classes), "in_chans": spec.in_chans}
    if spec.window_size is not None:
        kwargs["window_size"] = spec.window_size
    return kwargs


def create_model(spec: ModelSpec, pretrained: str | None = None) -> nn.Module:
    """A timm model for `spec`; backbone weights from a local file or s3:// URI when given.

    Never downloads from a hub: with no `pretrained`, the weights are random.
    """
    # timm's full names carry a pretrained tag (`resnet18.a1_in1k`): the tag names weights,
    # which come from `pretrained` here; the architecture is the part before the dot.
    if not timm.is_model(spec.arch):
        raise FersynthError(f"train.arch = {spec.arch!r}: not a timm model name (timm.list_models())")
    kwargs = _timm_kwargs(spec)
    if pretrained:
        # timm's own file loader: weights_only loading, checkpoint filters (e.g. Swin's
        # relative-position tables at other sizes), classifier dropped when classes differ.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(fetch(pretrained))})
        log.info("loading pretrained backbone weights from %s", pretrained)
    else:
        log.info("no pretrained weights given: %s starts from random initialisation", spec.arch)
    with _load_report() as report:
        try:
            try:
                model = timm.create_model(spec.arch, img_size=spec.image_size, **kwargs)
            except TypeError:  # CNNs take any input size and have no img_size argument
                model = timm.create_model(spec.arch, **kwargs)
        except RuntimeError as exc:
            if pretrained and "loading state_dict" in str(exc):
                raise FersynthError(f"{pretrained}: {weights_mismatch(exc, spec.arch)}") from None
            raise
    if pretrained:
        _check_loaded(model, report, pretrained, spec.arch)
    if spec.in_chans == 1:
        grey_stem(model)
    return model


_TIMM_LOADER = "timm.models._builder"
_KEYS = re.compile(r"^(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = _KEYS.match(record.getMessage())
        if found:
            self.keys[found.group(1).lower()] = [k.strip() for k in found.group(2).split(",") if k.strip()]


@contextlib.contextmanager
def _load_report():
    """timm loads pretrained weights non-strictly once the classifier is dropped (7 classes, not
    1000), and only logs the keys it missed: collect them (kept out of the user's log)."""
    logger = logging.getLogger(_TIMM_LOADER)
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _check_loaded(model: nn.Module, report: _Collect, source: str, arch: str) -> None:
    """Refuse weights of another architecture: every tensor but the classifier's must load
    (timm would start such a model from random weights with a warning)."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def real(keys: list[str]) -> list[str]:
        return [k for k in keys if not any(k.startswith(f"{h}.") for h in heads)]

    missing, unexpected = real(report.keys.get("missing", [])), real(report.keys.get("unexpected", []))
    if missing or unexpected:
        what = (
            f"the file has no tensor {missing[0]} ({len(missing)} of the model's tensors missing)"
            if missing
            else f"the file's tensor {unexpected[0]} is not in the model ({len(unexpected)} such)"
        )
        raise FersynthError(f"{source}: weights do not fit {arch} ({what}); weights of another architecture?")


def weights_mismatch(exc: RuntimeError, arch: str) -> str:
    """One line from torch's `load_state_dict` error (which lists every tensor, often dozens of
    lines): the first tensor that does not fit `arch`."""
    text = str(exc)
    size = re.search(
        r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
        r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        text,
    )
    missing = re.search(r'Missing key\(s\) in state_dict: "([^"]+)"', text)
    unexpected = re.search(r'Unexpected key\(s\) in state_dict: "([^"]+)"', text)
    if size:
        what = f"tensor {size.group(1)} is {size.group(2)} in the file, {size.group(3)} in the model"
    elif missing:
        what = f"the file has no tensor {missing.group(1)}"
    elif unexpected:
        what = f"the file's tensor {unexpected.group(1)} is not in the model"
    else:
        what = text.strip().splitlines()[0][:200]
    return f"weights do not fit {arch} ({what}); weights of another architecture?"


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """`model.load_state_dict(state_dict)` (strict), a mismatch as one line naming `source`."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise FersynthError(f"{source}: {weights_mismatch(exc, arch)}") from None


def grey_to_one_channel(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W normalised RGB -> B x 1 x H x W: the mean of the three normalised channels
    (for a grey image, R = G = B = g, an affine map of g: `g * mean(1/std) - mean(mean/std)`)."""
    return x.mean(dim=1, keepdim=True)


def _to_one_channel(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a one-channel stem: 3-channel input -> its channel mean."""
    if args[0].shape[1] == 3:
        return (grey_to_one_channel(args[0]), *args[1:])
    return None


def grey_stem(model: nn.Module) -> nn.Module:
    """Let a one-channel model take the 3-channel tensors every input path makes (evaluate,
    predict, the GIF guide, the vote): a pre-hook on its first convolution (timm's
    `pretrained_cfg["first_conv"]`) averages them to one channel; one-channel input passes
    unchanged. The hook covers `forward` and `forward_features` alike; weights are untouched.

    Raises FersynthError when timm names no first convolution, or the layer it names does not
    take the image (a space-to-depth stem): such a model cannot use in_chans=1."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    stem = model.get_submodule(name) if name else None
    if getattr(stem, "in_channels", None) != 1:
        raise FersynthError(
            f"{type(model).__name__}: train.in_chans=1 needs a first convolution that takes the "
            "image (timm's pretrained_cfg first_conv); use in_chans: 3 for this architecture"
        )
    stem.register_forward_pre_hook(_to_one_channel)
    return model


def feature_map(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """forward_features output as NCHW (Swin gives NHWC, CNNs NCHW)."""
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return features.permute(0, 3, 1, 2)
    return features


def classifier(model: nn.Module) -> nn.Linear:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise FersynthError(f"{type(model).__name__}: MEK needs a linear classifier head")
    return head


def class_activation_maps(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """CAM[b,k,h,w] = sum_c F[b,c,h,w] W[k,c], with the head weights detached (MEK)."""
    weight = classifier(model).weight.detach()
    return torch.einsum("bchw,kc->bkhw", feature_map(model, features), weight.to(features.dtype))


def save_model(path: Path, model: nn.Module, spec: ModelSpec, extra: dict | None = None) -> Path:
    """Write the model file atomically (weights on the CPU, plain metadata)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "spec": asdict(spec), "state_dict": state, **(extra or {})}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    extra: dict[str, Any]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file (or a training output folder holding one) for inference."""
    text = str(path)
    if not is_s3(text) and Path(text).is_dir():
        text = str(Path(text) / MODEL_FILE)
    local = fetch(text)
    try:
        payload = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of many kinds: all mean "not our file"
        raise FersynthError(f"{local}: not a loadable model file ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FersynthError(f"{local}: not a fersynth model file (expected format {FORMAT})")
    raw = payload["spec"]
    spec = ModelSpec(
        **{
            **raw,
            "mean": tuple(raw["mean"]),
            "std": tuple(raw["std"]),
            "classes": tuple(raw["classes"]),
        }
    )
    if spec.classes != CLASSES:
        raise FersynthError(f"{local}: class order {spec.classes} differs from {CLASSES}")
    model = create_model(spec)
    load_weights(model, payload["state_dict"], str(local), spec.arch)
    model.to(device).eval()
    extra = {k: v for k, v in payload.items() if k not in ("format", "spec", "state_dict")}
    return LoadedModel(model, spec, extra)
