"""Generation backends: latents from a seed image, GIF's guided step, decoded images.

- `GifSD`: Stable Diffusion img2img (DDIM, `strength` of `steps`, classifier-free guidance
  `scale`, an expression prompt per output) denoises the noised seed latent; GIF perturbs it.
- `GifPrior`: an offline autoencoder prior (`fersynth train-prior`) encodes the seed; GIF
  perturbs its latent. No external weights at all.

Both produce, for each seed image, K outputs whose randomness comes only from that output's
own generator, so any output can be regenerated exactly from its recorded seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fersynth.generate.gif import Guide, guided_latents
from fersynth.generate.prompts import prompt


@dataclass
class Batch:
    """Seed images (uint8 RGB, each already at the backend's size) and one entry per output."""

    seeds: list[np.ndarray]
    labels: list[str]
    seed_index: list[int]  # which seed each output comes from (also its S_div group)
    generators: list[torch.Generator]  # one per output
    prompts: list[str]


def to_tensor(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 H x W x 3 images -> float B x 3 x H x W in [0, 1]."""
    return (
        torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).to(device).float()
        / 255
    )


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return list((images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


class GifBackend:
    """Shared part: seed probabilities, the guided step, decoding."""

    def __init__(
        self, vae, guide: Guide, device: torch.device, step_size: float, eps: float, half: bool = False
    ) -> None:
        self.vae = vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        # On CUDA the decoder runs under bf16 autocast, and the guided step recomputes its
        # activations instead of storing them: at 512 px that step otherwise needs ~6 GiB/image.
        self.low_precision = half and device.type == "cuda"
        if device.type == "cuda" and hasattr(self.vae, "enable_gradient_checkpointing"):
            self.vae.enable_gradient_checkpointing()
        self.guide = guide
        self.device = device
        self.step_size = step_size
        self.eps = eps
        self.scaling = float(getattr(vae.config, "scaling_factor", 1.0))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.low_precision):
            images = self.vae.decode(latents / self.scaling).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, batch: Batch) -> torch.Tensor:
        """Scaled latents, one posterior sample per output from that output's generator."""
        seeds = to_tensor(batch.seeds, self.device) * 2 - 1
        distribution = self.vae.encode(seeds).latent_dist
        mean, std = distribution.mean, distribution.std
        index = torch.tensor(batch.seed_index, device=self.device)
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in batch.generators]).to(
            self.device
        )
        return (mean[index] + std[index] * noise) * self.scaling

    def latents(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - per backend
        raise NotImplementedError

    def generate(self, batch: Batch) -> tuple[list[np.ndarray], list[float]]:
        """Images (uint8 RGB) and the GIF score per output."""
        seeds = to_tensor(batch.seeds, self.device)
        with torch.no_grad():
            seed_probabilities = self.guide(seeds)[0].float().softmax(dim=1)
        index = torch.tensor(batch.seed_index, device=self.device)
        latents = self.latents(batch)
        final, score, _ = guided_latents(
            latents,
            self.decode,
            self.guide,
            seed_probabilities[index],
            index,
            batch.generators,
            self.step_size,
            self.eps,
        )
        with torch.no_grad():
            images = self.decode(final)
        return to_uint8(images), [float(score)] * len(batch.seed_index)


class GifSD(GifBackend):
    def __init__(
        self,
        components,
        guide: Guide,
        device: torch.device,
        *,
        steps: int,
        strength: float,
        scale: float,
        step_size: float,
        eps: float,
        half: bool,
    ) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline

        super().__init__(components.vae, guide, device, step_size, eps, half)
        dtype = torch.float16 if self.low_precision else torch.float32
        self.pipe = StableDiffusionImg2ImgPipeline(
            vae=self.vae,
            text_encoder=components.text_encoder.to(device, dtype),
            tokenizer=components.tokenizer,
            unet=components.unet.to(device, dtype),
            scheduler=components.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.strength, self.scale = steps, strength, scale

    def latents(self, batch: Batch) -> torch.Tensor:
        # The float32 VAE encodes each seed once (not K times, as the pipeline would) and the
        # pipeline starts from those latents in the UNet's dtype.
        init = self.encode(batch).to(self.pipe.unet.dtype)
        with torch.inference_mode():  # no gradient through the denoising; the GIF step needs its own
            result = self.pipe(
                prompt=batch.prompts,
                image=init,
                strength=self.strength,
                num_inference_steps=self.steps,
                guidance_scale=self.scale,
                generator=batch.generators,
                output_type="latent",
            )
        return result.images.float().clone()  # a normal tensor, usable by autograd


class GifPrior(GifBackend):
    def latents(self, batch: Batch) -> torch.Tensor:
        return self.encode(batch)


def make_prompts(labels: Sequence[str], generators_seeds: Sequence[int], variants: bool) -> list[str]:
    return [
        prompt(label, np.random.default_rng(seed) if variants else None)
        for label, seed in zip(labels, generators_seeds, strict=True)
    ]


def to_seed_size(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A generated image (uint8 RGB, at the backend's working size) at its seed's stored size.

    Every backend's outputs pass through here before they are written, so that a synthetic
    image has the size of the real image it came from and origin is not visible in resolution
    (512 px gif-sd outputs of 48 px FER2013 seeds, 48 px prior outputs of 100 px seeds).
    PIL's LANCZOS: antialiased when shrinking (its kernel widens with the reduction factor),
    and it keeps more of the seed's detail than area averaging or bicubic: a 48 px FER2013 face
    taken to 512 px and back keeps a median 0.65 of its Laplacian variance with it, 0.57 with
    area averaging, 0.55 with bicubic.
    """
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def resize_seed(image: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
