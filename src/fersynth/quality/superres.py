"""Super-resolution with SwinIR (or any spandrel-supported model) loaded from a weights file.

Official SwinIR checkpoints (`{"params": state_dict}` or `params_ema`) load through spandrel,
which detects the architecture, scale and variant from the weights. Files are read with
`torch.load(weights_only=True)` (safetensors as they are) and may be local or s3:// URIs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from fersynth.errors import FersynthError
from fersynth.storage import fetch

log = logging.getLogger(__name__)


def load_sr_model(uri: str, device: torch.device):
    """A spandrel ImageModelDescriptor for the weights at `uri` (local path or s3://)."""
    from spandrel import ModelLoader, UnsupportedModelError, canonicalize_state_dict

    path = fetch(uri)
    try:
        if path.suffix == ".safetensors":
            descriptor = ModelLoader().load_from_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            descriptor = ModelLoader().load_from_state_dict(canonicalize_state_dict(state))
    except UnsupportedModelError:
        raise FersynthError(f"{uri}: spandrel does not recognise this model's weights") from None
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise FersynthError(f"{uri}: not a loadable weights file ({exc.__class__.__name__})") from None
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise FersynthError(f"{uri}: expected an RGB model, got {descriptor.input_channels} channels")
    return descriptor.to(device).eval()


@dataclass
class SuperResolver:
    """Upscale RGB images with one or more models (by scale), batched and tiled."""

    models: dict[int, object]  # scale -> spandrel descriptor
    device: torch.device
    batch_size: int = 16
    tile: int = 256  # images larger than this are processed in overlapping tiles
    overlap: int = 16
    use_bf16: bool = False

    @classmethod
    def from_uris(
        cls, uris: Sequence[str], device: torch.device, batch_size: int, tile: int, precision: str
    ) -> SuperResolver:
        models: dict[int, object] = {}
        for uri in uris:
            descriptor = load_sr_model(uri, device)
            models[int(descriptor.scale)] = descriptor
            log.info(
                "super-resolution model %s: %s x%d",
                uri,
                descriptor.architecture.name,
                descriptor.scale,
            )
        use_bf16 = (
            device.type == "cuda"
            and precision in ("auto", "bf16")
            and all(m.supports_bfloat16 for m in models.values())
        )
        return cls(models, device, batch_size, tile, use_bf16=use_bf16)

    def scale_for(self, factor_needed: float) -> int:
        """The smallest available scale that reaches `factor_needed`, else the largest."""
        scales = sorted(self.models)
        return next((s for s in scales if s >= factor_needed), scales[-1])

    @torch.inference_mode()
    def _run(self, scale: int, batch: torch.Tensor) -> torch.Tensor:
        model = self.models[scale]
        dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.use_bf16):
            return model(batch.to(self.device)).float().clamp_(0, 1).cpu()

    def _tiled(self, scale: int, image: torch.Tensor) -> torch.Tensor:
        """One 3 x H x W image through the model in overlapping tiles, stitched by centre crops."""
        _, height, width = image.shape
        overlap = min(self.overlap, self.tile // 4)
        step = self.tile - 2 * overlap
        out = torch.zeros(3, height * scale, width * scale)
        for top in range(0, height, step):
            for left in range(0, width, step):
                y0, x0 = max(0, top - overlap), max(0, left - overlap)
                y1, x1 = min(height, top + step + overlap), min(width, left + step + overlap)
                result = self._run(scale, image[None, :, y0:y1, x0:x1])[0]
                keep_h, keep_w = min(step, height - top), min(step, width - left)
                oy, ox = (top - y0) * scale, (left - x0) * scale
                out[:, top * scale : (top + keep_h) * scale, left * scale : (left + keep_w) * scale] = result[
                    :, oy : oy + keep_h * scale, ox : ox + keep_w * scale
                ]
        return out

    def upscale(self, images: Sequence[np.ndarray], scales: Sequence[int]) -> list[np.ndarray]:
        """uint8 RGB images -> uint8 RGB images upscaled by their scale; same-size images batch."""
        results: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (image, scale) in enumerate(zip(images, scales, strict=True)):
            groups[(image.shape, scale)].append(index)
        for (shape, scale), indices in groups.items():
            large = max(shape[:2]) > self.tile
            for start in range(0, len(indices), 1 if large else self.batch_size):
                chunk = indices[start : start + (1 if large else self.batch_size)]
                batch = (
                    torch.stack(
                        [torch.from_numpy(np.array(images[i])).permute(2, 0, 1) for i in chunk]
                    ).float()
                    / 255.0
                )
                output = self._tiled(scale, batch[0])[None] if large else self._run(scale, batch)
                pixels = (output * 255.0).round().byte().permute(0, 2, 3, 1).numpy()
                for i, image in zip(chunk, pixels, strict=True):
                    results[i] = image
        return results  # type: ignore[return-value]


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area averaging when shrinking, bicubic when growing."""
    width, height = size
    shrinking = width < image.shape[1] or height < image.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interpolation)


def check_weights_exist(uris: Sequence[str]) -> None:
    """Fail before any work when a configured local weights file is missing."""
    for uri in uris:
        if not str(uri).startswith("s3://") and not Path(uri).expanduser().is_file():
            raise FersynthError(f"quality.sr.models: {uri}: weights file not found")
