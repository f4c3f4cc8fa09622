"""The training objective, chosen once before the loop: one call signature for SL and MEK.

`objective(model, x, y) -> (loss, parts)`: the loss to back-propagate and the named parts to
log (detached; MEK's L_rsl and L_rac). The loop never asks which method it trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fersynth.train.losses import attention_consistency, rebalanced_targets, soft_cross_entropy
from fersynth.train.models import class_activation_maps

Parts = dict[str, torch.Tensor]


class Supervised:
    """Cross-entropy with label smoothing (the thesis' SL: smoothing 0.1)."""

    def __init__(self, label_smoothing: float) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Parts]:
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), {}


class Mek:
    """MEK (fersynth.train.losses, the official code): L = L_rsl + attention_weight * L_rac on
    the batch and its mirror, forwarded together (2B images), the class weights fixed for the run."""

    def __init__(self, class_weights: torch.Tensor, smoothing: float, attention_weight: float) -> None:
        self.class_weights = class_weights
        self.smoothing = smoothing
        self.attention_weight = attention_weight

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Parts]:
        batch = x.shape[0]
        features = model.forward_features(torch.cat([x, x.flip(dims=(3,))]))
        logits = model.forward_head(features)[:batch]
        maps = class_activation_maps(model, features)
        targets = rebalanced_targets(y, self.class_weights, self.smoothing)
        rsl = soft_cross_entropy(logits, targets)
        rac = attention_consistency(maps[:batch], maps[batch:], self.class_weights)
        return rsl + self.attention_weight * rac, {"loss_rsl": rsl.detach(), "loss_rac": rac.detach()}
