"""Generation backends: latents from a seed image, GIF's guided step, decoded images.

- `GifSD`: Stable Diffusion img2img (DDIM, `strength` of `steps`, classifier-free guidance
  `scale`, an expression prompt per output) denoises the noised seed latent; GIF perturbs it.
- `GifPrior`: an offline autoencoder prior (`fersynth train-prior`) encodes the seed; GIF
  perturbs its latent. No external weights at all.

Both produce, for each seed image, K outputs whose randomness comes only from that output's
own generator, so any output can be regenerated exactly from its recorded seed. As in the
official GIF code, each output starts from its seed after a random rotation (up to
`seed_rotation` degrees) and a random horizontal flip, drawn from that output's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fersynth.classes import CLASS_INDEX
from fersynth.generate.checkpointing import available_bytes, saved_activation_bytes, should_checkpoint
from fersynth.generate.gif import Guide, guided_latents
from fersynth.generate.prompts import prompt


@dataclass
class Batch:
    """Seed images (uint8 RGB, each already at the backend's size) and one entry per output."""

    seeds: list[np.ndarray]
    labels: list[str]  # each seed's intended label: its own class, or an edit's target
    seed_index: list[int]  # which seed each output comes from (also its S_div group)
    generators: list[torch.Generator]  # one per output
    prompts: list[str]
    edits: list[bool] | None = None  # per seed: a cross-class edit towards its label
    strength: float | None = None  # gif-sd: this batch's strength (None: the backend's)


def to_tensor(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 H x W x 3 images -> float B x 3 x H x W in [0, 1]."""
    return (
        torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).to(device).float()
        / 255
    )


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return list((images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def augment_seed(
    image: torch.Tensor, generator: torch.Generator, max_rotation: float, hflip: bool
) -> torch.Tensor:
    """One output's view of its seed (3 x H x W in [0, 1]): rotated by U(-max, max) degrees and
    flipped with probability 1/2 (`hflip`), both drawn from `generator` (always two draws, so
    the generator's later use does not depend on the settings).

    The official code (torchvision RandomRotation(15), RandomHorizontalFlip) fills the rotated
    corners with black; a synthetic face with black corners would show its origin, so the
    image is reflect-padded before the rotation and cropped back (a quarter of the side
    covers any angle).
    """
    angle = float(torch.rand((), generator=generator) * 2 - 1) * max_rotation
    flip = bool(torch.rand((), generator=generator) < 0.5) and hflip
    if flip:
        image = image.flip(-1)
    if angle == 0:
        return image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    pad_y, pad_x = height // 4, width // 4
    padded = F.pad(image[None], (pad_x, pad_x, pad_y, pad_y), mode="reflect")[0]
    rotated = TF.rotate(padded, angle, interpolation=InterpolationMode.BILINEAR)
    return rotated[:, pad_y : pad_y + height, pad_x : pad_x + width]


def seed_views(batch: Batch, seeds: torch.Tensor, max_rotation: float, hflip: bool) -> torch.Tensor:
    """Each output's augmented view of its seed (`augment_seed`), B x 3 x H x W in [0, 1];
    `seeds` is the batch's seed images as a tensor, one per seed."""
    return torch.stack(
        [
            augment_seed(seeds[i], g, max_rotation, hflip)
            for i, g in zip(batch.seed_index, batch.generators, strict=True)
        ]
    )


def vae_dtype(half: bool, device: torch.device, bf16_vae: bool) -> torch.dtype:
    """The dtype a backend holds its VAE's weights in: bf16 on CUDA with `generate.half` where the
    backend keeps its VAE in half precision (`GifBackend.bf16_vae`: gif-sd), else float32 (a
    CPU; gif-prior and gif-ldm, whose decoder then runs under bf16 autocast on CUDA)."""
    return torch.bfloat16 if half and device.type == "cuda" and bf16_vae else torch.float32


def rewarded_classes(batch: Batch, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per output (B,), the class S_inf rewards: its intended class `batch.labels[seed]`, the
    seed's own label for an expansion within its class and the target for an edit. Never the
    guide's prediction on the seed (the official GIF code's rule; see gif.py)."""
    return torch.tensor([CLASS_INDEX[batch.labels[i]] for i in batch.seed_index], device=device)


@dataclass
class Generated:
    """A batch's outputs: images (uint8 RGB at the working size), and per output GIF's score S
    and the share of its perturbed latent entries that the eps-ball projection clipped."""

    images: list[np.ndarray]
    scores: list[float]
    clipped: list[float]


class GifBackend:
    """Shared part: seed probabilities, the guided step, decoding."""

    text_conditioned = False  # whether the outputs' prompts reach the model (else not recorded)
    # Seed images whose K outputs the guided step decodes and backpropagates together (the
    # decoder's activations of these are held at once); None: the whole batch.
    guided_seeds_per_pass: int | None = None
    # Whether the VAE itself is held in bf16 on CUDA with generate.half (its weights, encoder and
    # decoder), as diffusers' pipelines hold it in half precision. Off where a model was trained
    # on the float32 encoder's latents (gif-ldm's UNet, the prior's): there the weights stay
    # float32 and only the decoder runs under bf16 autocast, which runs GroupNorm in float32 and
    # so stores the normalised activations of the guided step in float32.
    bf16_vae = False
    # The decoder's gradient checkpointing in the guided step, for the Python API (the
    # throughput benchmark sets it): None decides it per pass from the activations' bytes and
    # the device's available memory (CUDA; generate/checkpointing.py), a bool forces it. Either
    # way the outputs are the same.
    force_checkpointing: bool | None = None

    def __init__(
        self,
        vae,
        guide: Guide,
        device: torch.device,
        step_size: float,
        eps: float,
        half: bool = False,
        seed_rotation: float = 15.0,
        seed_hflip: bool = True,
    ) -> None:
        self.low_precision = half and device.type == "cuda"
        self.vae_dtype = vae_dtype(half, device, self.bf16_vae)
        self.vae = vae.to(device=device, dtype=self.vae_dtype).eval().requires_grad_(False)
        # Per guided pass's (shape, dtype): its stored activations' bytes, counted once; and the
        # passes that ran out of memory with them stored, recomputed from then on.
        self._activation_bytes: dict[tuple, int | None] = {}
        self._recompute: set[tuple] = set()
        self._last_pass: tuple | None = None
        self.last_pass_checkpointed: bool | None = None  # None: no guided pass yet
        self.guide = guide
        self.device = device
        self.step_size = step_size
        self.eps = eps
        self.scaling = float(getattr(vae.config, "scaling_factor", 1.0))
        self.seed_rotation, self.seed_hflip = seed_rotation, seed_hflip

    def views(self, batch: Batch) -> torch.Tensor:
        return seed_views(batch, to_tensor(batch.seeds, self.device), self.seed_rotation, self.seed_hflip)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B x 3 x H x W, float32) of scaled latents (B x C x h x w); with
        gradients where `latents` carry them (the guided step), the decoder's activations stored
        or recomputed (`_choose_checkpointing`)."""
        if latents.requires_grad and torch.is_grad_enabled():
            self._choose_checkpointing(tuple(latents.shape))
        autocast = self.low_precision and self.vae_dtype == torch.float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            images = self.vae.decode((latents / self.scaling).to(self.vae_dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def available_memory(self) -> int | None:
        """Bytes the device can still give this process (CUDA), None on other devices."""
        return available_bytes(self.device) if self.device.type == "cuda" else None

    def _choose_checkpointing(self, shape: tuple[int, ...]) -> None:
        """Store the decoder's activations for this guided pass where they fit, else recompute
        them (generate/checkpointing.py); stored where the device's memory is not known (a CPU),
        recomputed for a pass that ran out of memory stored; `force_checkpointing` overrides."""
        if not hasattr(self.vae, "enable_gradient_checkpointing"):
            return
        key = (shape, self.vae_dtype)
        on = self.force_checkpointing
        if on is None:
            on = key in self._recompute
            available = None if on else self.available_memory()
            if available is not None:
                if key not in self._activation_bytes:
                    # float32 weights under autocast (gif-prior, gif-ldm) count as float32: an
                    # upper bound, which errs towards recomputing.
                    self._activation_bytes[key] = saved_activation_bytes(self.vae, shape, self.vae_dtype)
                on = should_checkpoint(self._activation_bytes[key], available)
        on = bool(on)
        if on != self.last_pass_checkpointed:
            (self.vae.enable_gradient_checkpointing if on else self.vae.disable_gradient_checkpointing)()
        self._last_pass, self.last_pass_checkpointed = key, on

    @torch.no_grad()
    def encode(self, batch: Batch, views: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents of each output's augmented seed (`views`: already drawn, else drawn
        here), one posterior sample per output from that output's generator."""
        views = (self.views(batch) if views is None else views) * 2 - 1
        distribution = self.vae.encode(views.to(self.vae_dtype)).latent_dist
        mean, std = distribution.mean.float(), distribution.std.float()
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in batch.generators]).to(
            self.device
        )
        return (mean + std * noise) * self.scaling

    def latents(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - per backend
        raise NotImplementedError

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """The images that the guide scores and that are written (B x 3 x H x W in [0, 1])."""
        return self.decode(latents)

    def generate(self, batch: Batch) -> Generated:
        """Images (uint8 RGB), the GIF score per output and the clipped share of the batch.

        S_inf's reference is the seed as stored, not an output's rotated view (as the official
        code: its guide sees the original image); its class term rewards each output's intended
        class (`rewarded_classes`)."""
        seeds = to_tensor(batch.seeds, self.device)
        with torch.no_grad():
            seed_probabilities = self.guide(seeds)[0].float().softmax(dim=1)
        index = torch.tensor(batch.seed_index, device=self.device)
        latents = self.latents(batch)
        states = [g.get_state() for g in batch.generators]  # the step's own draws start here
        for attempt in range(2):
            try:
                step = guided_latents(
                    latents,
                    self.render,
                    self.guide,
                    seed_probabilities[index],
                    index,
                    batch.generators,
                    self.step_size,
                    self.eps,
                    classes=rewarded_classes(batch, self.device),
                    chunk_groups=self.guided_seeds_per_pass,
                )
                break
            except torch.OutOfMemoryError:
                # A pass that stored its activations by the memory reading and still ran out
                # (another process took memory since): once more, recomputing them.
                if (
                    attempt
                    or self.force_checkpointing is not None
                    or self.last_pass_checkpointed is not False
                ):
                    raise
                self._recompute.add(self._last_pass)
            # Out of the handler, whose traceback held the failed pass's activations: free them
            # and draw the step's z and b again from where they were (the same outputs).
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for generator, state in zip(batch.generators, states, strict=True):
                generator.set_state(state)
        with torch.no_grad():
            images = self.render(step.latents)
        return Generated(to_uint8(images), step.scores.tolist(), step.clipped.tolist())


class GifSD(GifBackend):
    text_conditioned = True
    # The guided step seed by seed: Stable Diffusion's decoder at 512 px holds GiBs of
    # activations per output, and seeds_per_batch batches the denoising, not this step.
    guided_seeds_per_pass = 1
    bf16_vae = True  # as diffusers' img2img holds its VAE, in half precision

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
        seed_rotation: float = 15.0,
        seed_hflip: bool = True,
    ) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline

        super().__init__(components.vae, guide, device, step_size, eps, half, seed_rotation, seed_hflip)
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
        # The VAE encodes each output's own augmented view of its seed (in bf16 on CUDA), and
        # the pipeline starts from those latents in the UNet's dtype.
        init = self.encode(batch).to(self.pipe.unet.dtype)
        with torch.inference_mode():  # no gradient through the denoising; the GIF step needs its own
            result = self.pipe(
                prompt=batch.prompts,
                image=init,
                strength=self.strength if batch.strength is None else batch.strength,
                num_inference_steps=self.steps,
                guidance_scale=self.scale,
                generator=batch.generators,
                output_type="latent",
            )
        return result.images.float().clone()  # a normal tensor, usable by autograd

    @torch.no_grad()
    def identities(
        self,
        labels: Sequence[str],
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        *,
        size: int,
        steps: int,
        scale: float,
    ) -> list[np.ndarray]:
        """New faces, text-to-image from pure noise (the thesis' Syn-FER, SynFace / SynFER
        style): one image per prompt (uint8 RGB, size x size), its initial latent drawn from its
        own generator so that it can be regenerated alone. `labels` are carried by the prompts."""
        from diffusers import StableDiffusionPipeline

        text_to_image = StableDiffusionPipeline(**self.pipe.components)
        text_to_image.set_progress_bar_config(disable=True)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (self.pipe.unet.config.in_channels, size // factor, size // factor)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        with torch.inference_mode():
            result = text_to_image(
                prompt=list(prompts),
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=scale,
                latents=noise.to(self.device, self.pipe.unet.dtype),
                output_type="latent",
            )
        return to_uint8(self.decode(result.images.float()))


class GifPrior(GifBackend):
    """GIF on the latent of an offline autoencoder (`fersynth train-prior`).

    With `keep_detail`, each output is its seed view plus what GIF's perturbation changes in
    the decoded image, `view + decode(s*) - decode(s)` (s: the view's latent, s*: perturbed),
    instead of `decode(s*)` alone: the small prior's reconstruction error (blur, lost texture:
    about 13 grey levels on the demo) is added back, so that outputs keep their seed's detail
    and do not drift towards a blurred class average. The guide scores the same images."""

    def __init__(self, *args, keep_detail: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_detail = keep_detail
        self._detail: torch.Tensor | None = None  # this batch's view - decode(latent)

    def latents(self, batch: Batch) -> torch.Tensor:
        if not self.keep_detail:
            return self.encode(batch)
        views = self.views(batch)  # drawn once: encode must see the same views
        latents = self.encode(batch, views)
        with torch.no_grad():
            self._detail = views - self.decode(latents)
        return latents

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        if self._detail is None:
            return self.decode(latents)
        # The batch's detail, row for row: this render cannot take a chunk of the batch.
        if len(latents) != len(self._detail):
            raise ValueError(f"gif-prior renders its batch of {len(self._detail)} whole, got {len(latents)}")
        return (self.decode(latents) + self._detail).clamp(0, 1)


class SeedCopy:
    """The null generator (`seed-copy`): each output is its seed view unchanged, the same
    rotation and flip drawn from the output's generator that the GIF backends start from
    (`seed_views`), so that a row on these copies differs from a row on generated images only
    in the generator (DESIGN.md, "Evaluation protocol": copy twins). No model is loaded."""

    text_conditioned = False

    def __init__(self, device: torch.device, seed_rotation: float = 15.0, seed_hflip: bool = True) -> None:
        self.device = device
        self.seed_rotation, self.seed_hflip = seed_rotation, seed_hflip

    def generate(self, batch: Batch) -> Generated:
        views = seed_views(batch, to_tensor(batch.seeds, self.device), self.seed_rotation, self.seed_hflip)
        count = len(batch.seed_index)
        return Generated(to_uint8(views), [float("nan")] * count, [0.0] * count)


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
