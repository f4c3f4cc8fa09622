"""Fidelity and diversity of synthetic images, per class.

Inception weights cannot be fetched offline, and a FER model's features say more about faces
anyway: features are the pre-logit layer of a trained FER model (the first voter). torchmetrics
computes the Frechet distance and KID from them (through an identity "feature extractor" fed
with the precomputed features); diversity is the mean pairwise Euclidean feature distance
within a class' synthetic images and within its real ones. Seed distance is the mean feature
distance of each accepted image to its own seed image: a near-copy of its seed scores about 0,
an image as different from its seed as two real faces of the class are from each other scores
about the real diversity.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from fersynth.classes import CLASSES
from fersynth.train.data import ManifestImages, test_transform
from fersynth.train.models import LoadedModel


class _Precomputed(nn.Module):
    """Lets torchmetrics' FID and KID take features we computed once, instead of images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.inference_mode()
def extract_features(
    loaded: LoadedModel,
    root: Path,
    frame: pd.DataFrame,
    *,
    device: torch.device,
    batch_size: int,
    workers: int,
    flip: bool = False,
) -> np.ndarray:
    """Pre-logit features (N x D) of the manifest rows in `frame` (`flip`: of their mirror images)."""
    spec, model = loaded.spec, loaded.model.to(device).eval()
    if frame.empty:
        return np.zeros((0, model.num_features), np.float32)
    images = ManifestImages(root, frame, test_transform(spec.image_size, spec.resize, spec.mean, spec.std))
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers)
    outputs = [
        model.forward_head(
            model.forward_features((batch.flip(-1) if flip else batch).to(device)), pre_logits=True
        )
        .float()
        .cpu()
        for batch, _ in loader
    ]
    return torch.cat(outputs).numpy()


def distance_to_seed(synthetic: np.ndarray, seeds: np.ndarray) -> float:
    """Mean Euclidean distance between rows of two N x D feature arrays (an image and its seed)."""
    if len(synthetic) == 0:
        return float("nan")
    return float(np.linalg.norm(synthetic - seeds, axis=1).mean())


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance  # 6 s to import: only when used

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=True)
    metric.update(torch.from_numpy(real).double(), real=True)
    metric.update(torch.from_numpy(synthetic).double(), real=False)
    return float(metric.compute())


def kernel_distance(
    real: np.ndarray, synthetic: np.ndarray, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID (mean, std over subsets) with subsets no larger than the smaller set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    torch.manual_seed(seed)  # KID draws its subsets from the global generator
    with warnings.catch_warnings():  # "will save all extracted features": we sample per class
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]),
            subset_size=min(subset_size, len(real), len(synthetic)),
            subsets=50,
        )
    metric.update(torch.from_numpy(real).double(), real=True)
    metric.update(torch.from_numpy(synthetic).double(), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def mean_pairwise_distance(features: np.ndarray) -> float:
    if len(features) < 2:
        return float("nan")
    return float(torch.pdist(torch.from_numpy(features).double()).mean())


def fidelity_table(
    real: dict[str, np.ndarray],
    synthetic: dict[str, np.ndarray],
    generated: dict[str, int],
    accepted: dict[str, int],
    *,
    kid_subset_size: int,
    seed: int,
    seed_distance: dict[str, float] | None = None,
) -> pd.DataFrame:
    """One row per class: counts, acceptance rate, Frechet distance, KID, diversity and the
    synthetic images' distance to their seeds (`seed_distance`, per class; NaN where absent)."""
    rows = []
    for name in CLASSES:
        r, s = real.get(name), synthetic.get(name)
        comparable = r is not None and s is not None and len(r) >= 2 and len(s) >= 2
        kid = kernel_distance(r, s, kid_subset_size, seed) if comparable else (np.nan, np.nan)
        rows.append(
            {
                "class": name,
                "generated": generated.get(name, 0),
                "accepted": accepted.get(name, 0),
                "acceptance_rate": accepted.get(name, 0) / generated[name] if generated.get(name) else np.nan,
                "real_sampled": 0 if r is None else len(r),
                "synthetic_sampled": 0 if s is None else len(s),
                "frechet_distance": frechet_distance(r, s) if comparable else np.nan,
                "kid_mean": kid[0],
                "kid_std": kid[1],
                "diversity_real": mean_pairwise_distance(r) if r is not None else np.nan,
                "diversity_synthetic": mean_pairwise_distance(s) if s is not None else np.nan,
                "seed_distance": (seed_distance or {}).get(name, np.nan),
            }
        )
    return pd.DataFrame(rows).set_index("class")
