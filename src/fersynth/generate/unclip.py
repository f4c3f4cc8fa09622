"""GIF's DALL-E 2 setting on Stable unCLIP (`generate.backend: gif-unclip`).

GIF (Zhang et al., NeurIPS 2023) expands with DALL-E 2 by imagining in CLIP's image-embedding
space: the seed's CLIP image embedding e is perturbed with the same residual multiplicative
noise and bias as the latents of gif-sd, scored with the same S = S_inf + S_div, moved by one
signed-gradient step and projected onto an L-inf ball, then decoded. Here the decoder is
Stable unCLIP (diffusers `StableUnCLIPImg2ImgPipeline`), given one perturbed embedding per
output (its `num_images_per_prompt` would reuse one embedding):

    n  = normalise(e)                      (unCLIP's own image normaliser: zero mean, unit std)
    n' = n * (1 + z) + b,  z ~ U[0,1), b ~ N(0,1), of shape [B, D]
    S  = S_inf + S_div on CLIP zero-shot logits 100 * unit(e') . text and features unit(e')
    n* = clip(n' after the step, n - eps, n + eps);  decode(unscale(n*), prompt)

The score needs no decoding: the guide is a CLIP model whose image embeddings live in the
unCLIP image encoder's space (`generate.guide: clip`, `guide_model` its folder), so the
step's gradients never pass through the diffusion model. The folder is what
`StableUnCLIPImg2ImgPipeline.save_pretrained` writes, local or s3://, read with
`local_files_only`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fersynth.errors import FersynthError
from fersynth.generate.backends import Batch, Generated, rewarded_classes, seed_views, to_tensor, to_uint8
from fersynth.generate.gif import guided_latents
from fersynth.storage import fetch_folder

SAME_ENCODER = 0.98  # least cosine similarity of guide and encoder embeddings (encoder_agreement)

PARTS = (
    "feature_extractor",
    "image_encoder",
    "image_normalizer",
    "image_noising_scheduler",
    "tokenizer",
    "text_encoder",
    "unet",
    "scheduler",
    "vae",
)


def load_unclip(uri: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A Stable unCLIP img2img pipeline from a local folder or s3:// prefix (no hub), its weights
    in `dtype` (float16 on CUDA with generate.half, as diffusers runs Stable unCLIP)."""
    from diffusers import DDIMScheduler, StableUnCLIPImg2ImgPipeline

    from fersynth.generate.components import quiet_diffusers

    quiet_diffusers()
    folder = fetch_folder(uri)
    missing = [name for name in PARTS if not (Path(folder) / name).is_dir()]
    if missing:
        raise FersynthError(f"{uri}: not a Stable unCLIP folder (missing {', '.join(missing)})")
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # GIF samples with DDIM
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_random_unclip(
    folder: Path,
    *,
    sample_size: int = 64,
    embedding: int = 16,
    text_hidden: int = 32,
    seed: int = 0,
    image_encoder: Path | None = None,
) -> Path:
    """Randomly initialised Stable-unCLIP-shaped components saved to `folder` (tests, CPU runs);
    its image embeddings have `embedding` dimensions. With `image_encoder` (a CLIP folder, as
    `build_random_clip` writes), the image encoder is that CLIP's vision tower and projection,
    as Stable unCLIP's is OpenCLIP ViT-H's: a guide from that folder scores its embeddings."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from fersynth.generate.components import build_random

    base = build_random(sample_size=sample_size, text_hidden=text_hidden, seed=seed)
    torch.manual_seed(seed)
    if image_encoder is not None:
        from transformers import CLIPConfig

        whole = CLIPConfig.from_pretrained(image_encoder, local_files_only=True)
        vision = whole.vision_config  # the projection's width is the whole model's setting
        vision.projection_dim = whole.projection_dim
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            image_encoder, config=vision, local_files_only=True
        )
        embedding = encoder.config.projection_dim
    else:
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                projection_dim=embedding,
            )
        )
    size = encoder.config.image_size
    config = dict(base.unet.config)  # the UNet takes the noised embedding and its noise-level embedding
    config.update(class_embed_type="projection", projection_class_embeddings_input_dim=2 * embedding)
    unet = type(base.unet).from_config(config)
    normaliser = StableUnCLIPImageNormalizer(embedding_dim=embedding)
    with torch.no_grad():  # not the identity, so that a swapped scale/unscale shows in tests
        normaliser.mean.copy_(torch.randn(1, embedding) * 0.1)
        normaliser.std.copy_(torch.rand(1, embedding) * 0.5 + 0.5)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=size, size=size),
        image_encoder=encoder,
        image_normalizer=normaliser,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        unet=unet,
        scheduler=base.scheduler,
        vae=base.vae,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


class GifUnclip:
    """The gif-unclip backend: GIF's step on the CLIP image embedding, Stable unCLIP decodes."""

    text_conditioned = True

    def __init__(
        self,
        pipe,
        guide,
        device: torch.device,
        *,
        size: int,
        steps: int,
        scale: float,
        step_size: float,
        eps: float,
        seed_rotation: float = 15.0,
        seed_hflip: bool = True,
    ) -> None:
        text = getattr(guide, "text", None)
        width = int(pipe.image_normalizer.mean.shape[-1])
        if text is None or text.shape[1] != width:
            have = "a FER model" if text is None else f"a CLIP of {text.shape[1]} dimensions"
            raise FersynthError(
                f"gif-unclip scores CLIP image embeddings of {width} dimensions: set generate.guide: clip "
                f"and generate.guide_model to the CLIP folder of the unCLIP image encoder (got {have})"
            )
        self.pipe, self.guide, self.device = pipe, guide, device
        self.size, self.steps, self.scale, self.step_size, self.eps = size, steps, scale, step_size, eps
        self.seed_rotation, self.seed_hflip = seed_rotation, seed_hflip
        # GIF's step runs in float32 on its own copy of the normaliser; the pipeline keeps its
        # own in the weights' dtype (float16 on CUDA), since its UNet takes what it returns.
        self.normaliser = copy.deepcopy(pipe.image_normalizer).float()
        agreement = self.encoder_agreement()
        if agreement < SAME_ENCODER:
            raise FersynthError(
                "generate.guide_model: this CLIP is not the unCLIP image encoder's own (their embeddings "
                f"of one probe image have cosine similarity {agreement:.2f}, need {SAME_ENCODER}); GIF's "
                "score must read the embedding space it perturbs"
            )
        # From here the score needs only the guide's text embeddings (7 x D): its CLIP leaves
        # the device, which then holds one image encoder (the pipeline's), not two.
        if getattr(guide, "model", None) is not None:
            guide.model.to("cpu")

    @torch.no_grad()
    def encoder_agreement(self) -> float:
        """Cosine similarity of the guide's and the unCLIP image encoder's embeddings of one
        smooth probe image at the guide's size (the same encoder gives 1 up to rounding; a CLIP
        of the same width but other weights gives about 0)."""
        size = int(getattr(self.guide, "size", 224))
        ramp = torch.linspace(0, 1, size, device=self.device)
        probe = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                             (ramp[None, :] + ramp[:, None]).expand(size, size) / 2])[None]  # fmt: skip
        probe = (probe * 255).round() / 255  # what a uint8 image holds, as the encoder's processor sees it
        guide = torch.nn.functional.normalize(self.guide(probe)[1].float(), dim=1)
        encoder = torch.nn.functional.normalize(self.embed(probe), dim=1)
        return float((guide * encoder).sum())

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B x D) of images in [0, 1] (B x 3 x H x W)."""
        inputs = self.pipe.feature_extractor(images=to_uint8(images), return_tensors="pt").pixel_values
        encoder = self.pipe.image_encoder
        return encoder(inputs.to(self.device, encoder.dtype)).image_embeds.float()

    def score_inputs(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's zero-shot (logits, features) for embeddings, as ClipGuide does for images."""
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        return 100.0 * unit @ self.guide.text.T, unit

    def generate(self, batch: Batch) -> Generated:
        seeds = to_tensor(batch.seeds, self.device)
        views = seed_views(batch, seeds, self.seed_rotation, self.seed_hflip)
        index = torch.tensor(batch.seed_index, device=self.device)
        normaliser = self.normaliser
        with torch.no_grad():
            per_seed = self.score_inputs(self.embed(seeds))[0].softmax(dim=1)
            base = normaliser.scale(self.embed(views))
        # GIF's step in the normaliser's space; the guide scores the unscaled embedding.
        step = guided_latents(
            base,
            normaliser.unscale,
            self.score_inputs,
            per_seed[index],
            index,
            batch.generators,
            self.step_size,
            self.eps,
            classes=rewarded_classes(batch, self.device),
        )
        embeddings = normaliser.unscale(step.latents).detach()
        with torch.inference_mode():
            images = self.pipe(
                prompt=batch.prompts,
                image_embeds=embeddings.to(self.pipe.unet.dtype),
                num_inference_steps=self.steps,
                guidance_scale=self.scale,
                generator=batch.generators,
                noise_level=0,
                height=self.size,
                width=self.size,
                output_type="pt",
            ).images
        return Generated(to_uint8(images.float()), step.scores.tolist(), step.clipped.tolist())
