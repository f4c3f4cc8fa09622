"""`fersynth train-prior`: the offline generative prior of the `gif-prior` and `gif-ldm` backends.

A small diffusers `AutoencoderKL` trained on the training split (reconstruction L1 + a small
KL term, as Stable Diffusion's autoencoder). Its latent is scaled to unit variance, like SD's
(`scaling_factor`), so GIF's perturbation has the same meaning on every backend. Then, unless
`prior.diffusion.steps` is 0, a class-conditional latent diffusion model is trained on those
latents (generate/ldm.py). The output folder holds `vae/` (save_pretrained), `unet/` and
`scheduler/`, `prior.json` (sizes, steps, the autoencoder's reconstruction error on held-out
training images, the diffusion model's final loss), `reconstructions.png` (originals above
their reconstructions) and `samples.png` (the diffusion model's samples from noise, per class).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.figures import contact_sheet, save_png
from fersynth.files import atomic_write_text, staged_folder
from fersynth.generate.backends import to_uint8
from fersynth.memory import batch_fits
from fersynth.parallel import pins_torch_threads
from fersynth.settings import PriorSettings, save_resolved
from fersynth.splits import draw_validation
from fersynth.train.data import InMemoryBatches, ManifestImages, SampleStream, use_in_memory
from fersynth.train.inference import pick_device
from fersynth.train.loop import split_validation

PRIOR_JSON = "prior.json"


@dataclass
class PriorResult:
    output: Path
    mae: float  # mean absolute error in grey levels (0..255) on held-out training images
    psnr: float


def build_autoencoder(image_size: int, channels: tuple[int, ...], latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=min(32, channels[0]),
        mid_block_add_attention=False,  # attention at the bottleneck costs more than it buys here
    )


def _transform(size: int, train: bool):
    steps = [v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])


def load_prior(folder: Path):
    """The trained autoencoder and its image size."""
    from diffusers import AutoencoderKL

    from fersynth.generate.components import quiet_diffusers

    quiet_diffusers()
    folder = Path(folder)
    if not (folder / PRIOR_JSON).is_file():
        raise FersynthError(f"{folder}: no trained prior here (run `fersynth train-prior`)")
    info = json.loads((folder / PRIOR_JSON).read_text())
    return AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True), int(info["image_size"])


@pins_torch_threads
def run_train_prior(
    settings: PriorSettings, *, seed: int = 2048, force: bool = False, progress: bool = True
) -> PriorResult:
    """Train the autoencoder prior (and the latent diffusion model when asked)."""
    batch = f"a batch of {settings.batch_size} images at {settings.image_size} px"
    lower = [f"prior.batch_size (now {settings.batch_size})", f"prior.image_size (now {settings.image_size})"]
    with batch_fits("train-prior", batch, settings.device, lower):
        return _train_prior(settings, seed=seed, force=force, progress=progress)


def _train_prior(
    settings: PriorSettings, *, seed: int = 2048, force: bool = False, progress: bool = True
) -> PriorResult:
    dataset = read_manifest(settings.data)
    train, held = split_validation(dataset.manifest)
    if held.empty:  # data without a val split: the prior holds out 5% for its own error
        drawn = draw_validation(dataset.manifest, 0.05, seed)
        train, held = train.drop(index=drawn), dataset.manifest.loc[drawn]
    if train.empty or held.empty:
        raise FersynthError(f"{settings.data}: too few training images to train a prior")
    device = pick_device(settings.device)
    torch.manual_seed(seed)
    vae = build_autoencoder(settings.image_size, tuple(settings.channels), settings.latent_channels).to(
        device
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    images = ManifestImages(dataset.root, train, _transform(settings.image_size, True), seed=seed)
    stream = SampleStream(images.labels, seed)
    if use_in_memory("auto", len(images), settings.image_size):
        # Decoded once, flipped per batch: no worker process taking a core from the model.
        batches = InMemoryBatches(
            images, stream, settings.batch_size, settings.image_size, settings.image_size,
            hflip=True, rotation=0.0, mean=[0.5] * 3, std=[0.5] * 3, device=device,
        )  # fmt: skip
    else:
        loader = DataLoader(
            images,
            batch_size=settings.batch_size,
            num_workers=settings.workers,
            sampler=stream,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        batches = iter(loader)
    vae.train()
    bar = tqdm(range(settings.steps), desc="train prior", unit="step", disable=not progress)
    for step in bar:
        x, _ = next(batches)
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, x) + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()

    held_images = ManifestImages(dataset.root, held, _transform(settings.image_size, False))
    originals, reconstructions, latents = [], [], []
    with torch.no_grad():
        for x, _ in DataLoader(held_images, batch_size=64):
            x = x.to(device)
            distribution = vae.encode(x).latent_dist
            latents.append(distribution.mean.cpu())
            originals.append(x.cpu())
            reconstructions.append(vae.decode(distribution.mean).sample.clamp(-1, 1).cpu())
    original, reconstructed = torch.cat(originals), torch.cat(reconstructions)
    error = ((original - reconstructed).abs() * 127.5).mean().item()
    mse = (((original - reconstructed) / 2) ** 2).mean().item()
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    # Unit-variance latents, like Stable Diffusion's scaling_factor 0.18215.
    vae.register_to_config(scaling_factor=float(1.0 / torch.cat(latents).std().clamp_min(1e-6)))
    info = {
        "image_size": settings.image_size,
        "steps": settings.steps,
        "held_out_images": len(held),
        "reconstruction_mae_grey_levels": round(error, 3),
        "reconstruction_psnr_db": round(psnr, 2),
        "scaling_factor": vae.config.scaling_factor,
    }
    diffusion = None
    if settings.diffusion.steps:
        diffusion = _train_diffusion(vae, dataset.root, train, settings, seed, device, progress)
        info["diffusion"] = diffusion["info"]

    with staged_folder(settings.output, force=force) as staging:
        vae.save_pretrained(staging / "vae")
        if diffusion is not None:
            diffusion["unet"].save_pretrained(staging / "unet")
            diffusion["scheduler"].save_pretrained(staging / "scheduler")
            save_png(staging / "samples.png", diffusion["sheet"])
        atomic_write_text(staging / PRIOR_JSON, json.dumps(info, indent=2) + "\n")
        sheet = contact_sheet(
            [
                ("held-out originals", to_uint8((original[:8] + 1) / 2)),
                (f"reconstructions (MAE {error:.1f} grey levels)", to_uint8((reconstructed[:8] + 1) / 2)),
            ]
        )
        save_png(staging / "reconstructions.png", sheet)
        save_resolved({"seed": seed, "prior": settings}, staging)
    return PriorResult(Path(settings.output), error, psnr)


def _encode_training_split(vae, root: Path, frame, size: int, device: torch.device):
    """Scaled posterior mean and std of every training image and of its mirror image (the
    diffusion model learns both, as the autoencoder did), N x C x h x w each, and labels."""
    images = ManifestImages(root, frame, _transform(size, False))
    means, stds, labels = [], [], []
    with torch.no_grad():
        for x, y in DataLoader(images, batch_size=128):
            for view in (x, x.flip(-1)):
                distribution = vae.encode(view.to(device)).latent_dist
                means.append(distribution.mean.cpu() * vae.config.scaling_factor)
                stds.append(distribution.std.cpu() * vae.config.scaling_factor)
                labels.append(y.numpy())
    return torch.cat(means), torch.cat(stds), np.concatenate(labels)


def _train_diffusion(vae, root: Path, frame, settings: PriorSettings, seed: int, device, progress: bool):
    from diffusers import DDIMScheduler

    from fersynth.generate.ldm import class_samples, train_latent_diffusion

    mean, std, labels = _encode_training_split(vae, root, frame, settings.image_size, device)
    unet, noise_scheduler, loss = train_latent_diffusion(
        mean, std, labels, settings.diffusion, seed=seed, device=device, progress=progress
    )
    scheduler = DDIMScheduler.from_config(noise_scheduler.config)  # generation samples with DDIM
    sheet = class_samples(vae, unet, scheduler, mean.shape[1:], seed=seed, device=device)
    info = {
        "steps": settings.diffusion.steps,
        "latent_shape": list(mean.shape[1:]),
        "training_latents": len(mean),
        "final_loss": round(loss, 5),
    }
    return {"unet": unet, "scheduler": scheduler, "sheet": sheet, "info": info}
