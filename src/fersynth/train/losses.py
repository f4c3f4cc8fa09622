"""MEK losses ("Leave No Stone Unturned", NeurIPS 2023), as its official code computes them.

- class weights w_c = N / (10 n_c) from the training counts;
- re-balanced smooth labels: 1 - eps on the true class, eps spread over the other classes in
  proportion to their weights; cross-entropy against these soft targets;
- re-balanced attention consistency: the class activation maps of an image and of its mirror
  (flipped back) should agree, each class weighted by w_k.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fersynth.errors import FersynthError

log = logging.getLogger(__name__)


def mek_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """w_c = N / (10 * n_c). A class with no training images (a synthetic-only set whose pool
    missed it) gets weight 0: no smoothing mass goes to it and it adds no consistency term."""
    counts_t = torch.as_tensor(list(counts), dtype=torch.float64)
    if counts_t.sum() <= 0:
        raise FersynthError("MEK class weights: no training images at all")
    empty = [i for i, n in enumerate(counts) if n <= 0]
    if empty:
        log.warning("MEK: classes %s have no training images; their class weight is 0", empty)
    weights = counts_t.sum() / (10.0 * counts_t.clamp_min(1))
    weights[counts_t <= 0] = 0.0
    return weights.float()


def rebalanced_targets(labels: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Soft targets: 1 - eps on the label, eps * w_j / sum_{k != y} w_k on every other j.

    Where every other class weighs 0 (a training set holding a single class), eps is spread
    evenly over the other classes instead of dividing by zero."""
    others = weights.to(labels.device).unsqueeze(0).repeat(labels.shape[0], 1)
    others.scatter_(1, labels.unsqueeze(1), 0.0)
    total = others.sum(dim=1, keepdim=True)
    even = torch.ones_like(others).scatter_(1, labels.unsqueeze(1), 0.0)
    others = torch.where(total > 0, others, even)
    targets = eps * others / others.sum(dim=1, keepdim=True)
    return targets.scatter(1, labels.unsqueeze(1), 1.0 - eps)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def attention_consistency(
    maps: torch.Tensor, maps_of_flipped: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """mean_b sum_k w_k mean_hw (CAM - flip(CAM of the flipped image))^2, on B x K x H x W."""
    difference = (maps.float() - maps_of_flipped.float().flip(dims=(3,))) ** 2
    per_class = difference.mean(dim=(2, 3))  # B x K
    return (per_class * weights.to(per_class.device).unsqueeze(0)).sum(dim=1).mean()
