"""Guides for GIF's score: a trained FER classifier (default), or CLIP zero-shot (as GIF's code).

A guide maps images in [0, 1] (B x 3 x H x W) to (logits over the seven classes, features).
Its weights are frozen; gradients flow only to the input.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fersynth.classes import CLASSES
from fersynth.errors import FersynthError
from fersynth.generate.prompts import CLASS_WORDS
from fersynth.storage import fetch_folder
from fersynth.train.models import load_model


class FerGuide(torch.nn.Module):
    """A `fersynth train` model: logits, and the pre-logit features for S_div."""

    def __init__(self, model_uri: str | Path, device: torch.device) -> None:
        super().__init__()
        loaded = load_model(model_uri, device)
        self.model, self.spec = loaded.model.eval().requires_grad_(False), loaded.spec
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1).to(device))
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1).to(device))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.spec.image_size
        x = F.interpolate(
            images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        x = (x - self.mean) / self.std
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features


class ClipGuide(torch.nn.Module):
    """CLIP zero-shot over "a photo of a {fearful, happy, ...} face", from a local folder."""

    def __init__(self, uri: str, device: torch.device) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        folder = fetch_folder(uri)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        if len(tokenizer) <= 2:
            raise FersynthError(f"{uri}: the CLIP tokenizer loaded without a vocabulary")
        prompts = [f"a photo of a {CLASS_WORDS[name]} face" for name in CLASSES]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            text = projected(self.model.get_text_features(**tokens))
        self.register_buffer("text", F.normalize(text.float(), dim=1))
        # The class prompts' embeddings are all the text tower was needed for: free its memory.
        self.model.text_model = None
        self.model.text_projection = None
        config = self.model.config.vision_config
        self.size = config.image_size
        self.register_buffer(
            "mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1).to(device)
        )
        self.register_buffer(
            "std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1).to(device)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        features = projected(self.model.get_image_features(pixel_values=(x - self.mean) / self.std))
        features = F.normalize(features.float(), dim=1)
        return 100.0 * features @ self.text.T, features


def projected(output) -> torch.Tensor:
    """The projected CLIP embedding (B x projection_dim) from `get_text_features` /
    `get_image_features`: a tensor in transformers 4, an output object whose `pooler_output`
    holds it in transformers 5."""
    if isinstance(output, torch.Tensor):
        return output
    return output[1] if isinstance(output, tuple) else output.pooler_output  # (last_hidden, pooled)
