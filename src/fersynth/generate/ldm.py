"""`gif-ldm`: GIF on an offline, class-conditional latent diffusion model (no external weights).

Stable Diffusion's structure at the scale of two CPU cores: the prior's autoencoder
(`fersynth train-prior`, prior.py) is the VAE, and a small diffusers `UNet2DModel` with class
embeddings is trained on its scaled latents of the training split, predicting the noise
(DDPM, Ho et al. 2020), with classifier-free guidance (Ho & Salimans 2022): the class label
is replaced by a null class for `class_dropout` of the training samples, and sampling mixes

    eps = eps(x_t, null) + scale * (eps(x_t, y) - eps(x_t, null)).

Generation is GIF-SD's with the class label in place of the text prompt: each output's seed
view is encoded, noised for int(strength * steps) of `steps` DDIM steps (as diffusers'
img2img pipelines count them) from its own generator, denoised towards its intended class
(an edit's target), then perturbed, scored, stepped and projected by GIF (gif.py) and decoded.
The denoising moves an output away from its seed far more than GIF's perturbation of a
reconstruction (the `gif-prior` backend) does, so the accepted images vary like real ones.

The prior folder then holds `unet/` and `scheduler/` (save_pretrained) besides `vae/`, and
`prior.json` records the diffusion model's training.

New identities (`generate.identities`) are class-conditional samples from pure noise: all
`steps` DDIM steps towards the prompted class, no seed and no GIF step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fersynth.classes import CLASS_INDEX, CLASSES
from fersynth.errors import FersynthError
from fersynth.generate.backends import Batch, GifBackend, to_uint8
from fersynth.generate.gif import Guide
from fersynth.settings import LatentDiffusionSettings
from fersynth.train.data import SampleStream

NULL_CLASS = len(CLASSES)  # the unconditional label of classifier-free guidance


def build_latent_unet(latent_size: int, latent_channels: int, settings: LatentDiffusionSettings):
    """A class-conditional UNet2DModel on B x C x H x W latents; attention at the lowest
    resolution only (a 12 x 12 latent: 3 x 3 there)."""
    from diffusers import UNet2DModel

    blocks = len(settings.channels)
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(settings.channels),
        layers_per_block=settings.layers_per_block,
        down_block_types=("DownBlock2D",) * (blocks - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (blocks - 1),
        norm_num_groups=math.gcd(32, *settings.channels),
        attention_head_dim=min(settings.channels[-1], 64),
        num_class_embeds=NULL_CLASS + 1,
        num_train_timesteps=settings.train_timesteps,
    )


def build_noise_scheduler(settings: LatentDiffusionSettings):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=settings.train_timesteps,
        beta_schedule=settings.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


def train_latent_diffusion(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: np.ndarray,
    settings: LatentDiffusionSettings,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
):
    """Train the class-conditional UNet on scaled latents (N x C x H x W mean and std of the
    autoencoder's posterior, a fresh sample per draw), class-balanced draws. Returns the EMA
    UNet, its noise scheduler and the last losses' mean."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = build_latent_unet(latent_mean.shape[-1], latent_mean.shape[1], settings).to(device)
    scheduler = build_noise_scheduler(settings)
    ema = EMAModel(unet.parameters(), decay=settings.ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=0.0)
    # The long tail's minor classes are the ones generation is for: draw classes equally often.
    draws = iter(SampleStream(labels, seed, balanced=True))
    label_tensor = torch.as_tensor(labels, dtype=torch.long)
    unet.train()
    recent: list[float] = []
    bar = tqdm(range(settings.steps), desc="train latent diffusion", unit="step", disable=not progress)
    for step in bar:
        index = torch.tensor([next(draws)[0] for _ in range(settings.batch_size)])
        noise_for_sample = torch.randn(latent_mean[index].shape, generator=generator)
        x0 = (latent_mean[index] + latent_std[index] * noise_for_sample).to(device)
        y = label_tensor[index].clone()
        y[torch.rand(len(y), generator=generator) < settings.class_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, settings.train_timesteps, (len(y),), generator=generator).to(device)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y.to(device)).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        recent = (recent + [loss.item()])[-100:]
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
    ema.copy_to(unet.parameters())
    return unet.eval(), scheduler, float(np.mean(recent)) if recent else float("nan")


def load_latent_diffusion(folder: Path):
    """The prior folder's UNet and a DDIM scheduler of its noise schedule, or a clear error."""
    from diffusers import DDIMScheduler, UNet2DModel

    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise FersynthError(
            f"{folder}: the prior has no latent diffusion model (unet/); train it with "
            "prior.diffusion.steps > 0 (fersynth train-prior), or use generate.backend: gif-prior"
        )
    unet = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return unet, scheduler


class GifLatentDiffusion(GifBackend):
    """GIF-SD on the prior's latents: DDIM img2img towards the intended class, then GIF's step."""

    def __init__(
        self,
        vae,
        unet,
        scheduler,
        guide: Guide,
        device: torch.device,
        *,
        steps: int,
        strength: float,
        scale: float,
        step_size: float,
        eps: float,
        half: bool = False,
        seed_rotation: float = 15.0,
        seed_hflip: bool = True,
    ) -> None:
        super().__init__(vae, guide, device, step_size, eps, half, seed_rotation, seed_hflip)
        self.unet = unet.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.steps, self.strength, self.scale = steps, strength, scale

    def timesteps(self, strength: float) -> torch.Tensor:
        """The DDIM timesteps an img2img of this strength runs (diffusers' img2img count:
        the last int(strength * steps) of `steps`)."""
        self.scheduler.set_timesteps(self.steps)
        count = min(int(self.steps * strength), self.steps)
        return self.scheduler.timesteps[self.steps - count :]

    @torch.no_grad()
    def latents(self, batch: Batch) -> torch.Tensor:
        x = self.encode(batch)
        timesteps = self.timesteps(self.strength if batch.strength is None else batch.strength)
        if len(timesteps) == 0:
            return x
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in batch.generators]).to(self.device)
        x = self.scheduler.add_noise(x, noise, timesteps[:1].repeat(len(x)))
        labels = torch.tensor([CLASS_INDEX[batch.labels[i]] for i in batch.seed_index], device=self.device)
        return denoise(self.unet, self.scheduler, x, timesteps, labels, self.scale).float().clone()

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
        """New faces: class-conditional samples from pure noise (all `steps` DDIM steps, guidance
        `scale` towards each label), one per generator, decoded by the prior's autoencoder at
        its own size. `prompts` and `size` are unused (no text; the latent fixes the size)."""
        shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        self.scheduler.set_timesteps(steps)
        x = x * self.scheduler.init_noise_sigma
        classes = torch.tensor([CLASS_INDEX[label] for label in labels], device=self.device)
        x = denoise(self.unet, self.scheduler, x, self.scheduler.timesteps, classes, scale)
        return to_uint8(self.decode(x))


def denoise(unet, scheduler, x: torch.Tensor, timesteps, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """DDIM (eta 0: deterministic) from x at timesteps[0] to a clean latent, towards `labels`
    (B,) with classifier-free guidance `scale` (1: the conditional prediction alone)."""
    null = torch.full_like(labels, NULL_CLASS)
    for t in timesteps:
        if scale == 1.0:
            prediction = unet(x, t, class_labels=labels).sample
        else:
            both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + scale * (conditional - unconditional)
        x = scheduler.step(prediction, t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def class_samples(
    vae, unet, scheduler, latent_shape, *, seed: int, device, count: int = 8, scale: float = 2.0
):
    """A contact sheet of samples from pure noise (50 DDIM steps), one captioned row per class:
    what the diffusion model learnt of each class, before GIF or a seed is involved."""
    from fersynth.figures import contact_sheet

    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(50)
    rows = []
    for index, name in enumerate(CLASSES):
        x = torch.randn((count, *latent_shape), generator=generator).to(device)
        labels = torch.full((count,), index, device=device)
        x = denoise(unet, scheduler, x, scheduler.timesteps, labels, scale)
        decoded = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        rows.append((f"{name}: samples from noise (scale {scale:g})", to_uint8(decoded.cpu())))
    return contact_sheet(rows)
