"""Stable Diffusion components: loading from a local folder or s3:// prefix (never a hub),
and building randomly initialised ones of a given size (tests, CPU runs, benchmarks).

A model folder is what `save_pretrained` writes: `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/` (the diffusers layout of Stable Diffusion 1.x).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fersynth.errors import FersynthError
from fersynth.storage import fetch_folder


@dataclass
class SDComponents:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler: object

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(self, name).save_pretrained(folder / name)
        return folder


def _word_vocab(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary without merges: every character is a token."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(vocab) + i for i, s in enumerate(symbols)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    if len(vocab) > size:
        raise ValueError(f"vocabulary of {len(vocab)} tokens needs vocab_size >= {len(vocab)}")
    return vocab, []


def build_random(
    *,
    sample_size: int = 64,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (8, 16, 16, 16),
    text_hidden: int = 32,
    text_layers: int = 2,
    attention_heads: int = 2,
    cross_attention_dim: int | None = None,
    seed: int = 0,
) -> SDComponents:
    """Randomly initialised Stable-Diffusion-shaped components; the defaults are tiny (CPU),
    `sd15_sized()` gives Stable Diffusion 1.5's sizes (same cost as the real model)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cross = cross_attention_dim or text_hidden
    depth = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=1 if unet_channels[0] < 128 else 2,
        block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=cross,
        attention_head_dim=attention_heads if unet_channels[0] < 128 else 8,
        norm_num_groups=min(32, unet_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        layers_per_block=1 if vae_channels[0] < 64 else 2,
        latent_channels=4,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=sample_size,
    )
    tokenizer = random_tokenizer()
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(1024, len(tokenizer)),
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 4,
            num_hidden_layers=text_layers,
            num_attention_heads=attention_heads,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            projection_dim=text_hidden,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler)


def random_tokenizer():
    """A CLIP tokenizer with a character-level vocabulary (no hub, no files)."""
    from transformers import CLIPTokenizer

    vocab, merges = _word_vocab(1024)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if len(tokenizer) <= 2:  # transformers 5 trap: a tokenizer that silently ignored its vocab
        raise RuntimeError("the in-memory CLIP tokenizer has no vocabulary")
    return tokenizer


def build_random_clip(
    folder: Path,
    *,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 1,
    projection: int = 16,
    seed: int = 0,
) -> Path:
    """A randomly initialised CLIP (text and vision towers) and its tokenizer saved to `folder`
    as `save_pretrained` writes them: what the CLIP guide loads (tests, offline runs)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = random_tokenizer()
    tower = dict(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=2
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=max(1024, len(tokenizer)),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=max(4, image_size // 4)),
        projection_dim=projection,
    )
    folder = Path(folder)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sd15_sized(seed: int = 0) -> SDComponents:
    """Random weights with Stable Diffusion 1.5's architecture sizes (about 1.07 B parameters)."""
    return build_random(
        sample_size=512,
        unet_channels=(320, 640, 1280, 1280),
        vae_channels=(128, 256, 512, 512),
        text_hidden=768,
        text_layers=12,
        attention_heads=12,
        cross_attention_dim=768,
        seed=seed,
    )


def quiet_diffusers() -> None:
    """diffusers warns on every load that the optional `accelerate` is absent; we know."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def load_components(uri: str) -> SDComponents:
    """Load a diffusers-layout Stable Diffusion folder (local or s3://), local files only."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_diffusers()

    folder = fetch_folder(uri)
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [name for name in parts if not (folder / name).is_dir()]
    if missing:
        raise FersynthError(f"{uri}: not a Stable Diffusion folder (missing {', '.join(missing)})")
    kwargs = {"local_files_only": True}
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **kwargs)
    if len(tokenizer) <= 2:
        raise FersynthError(f"{uri}/tokenizer: the tokenizer loaded without a vocabulary")
    return SDComponents(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", **kwargs),
        vae=AutoencoderKL.from_pretrained(folder / "vae", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **kwargs),
        tokenizer=tokenizer,
        # GIF samples with DDIM, whatever scheduler the folder was saved with.
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler", **kwargs),
    )
