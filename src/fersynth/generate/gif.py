"""GIF's guided imagination step (Zhang et al., NeurIPS 2023), as its official code does it,
independent of the model that produced the latent:

    s' = s * (1 + z) + b,   z ~ U[0, 1), b ~ N(0, 1), both of shape [B, C, 1, 1]
    S  = S_inf + S_div
    S_inf = (entropy of the guide's prediction on decode(s') - entropy on the seed)
            + probability of the output's intended class y on decode(s')
    S_div = KL(softmax(group mean of f) || softmax(f_i)), f the L2-normalised features,
            averaged over the samples (the official code's KLDivLoss(input=log_softmax(f),
            target=log_softmax(mean), log_target=True, reduction="batchmean"))
    z, b <- z + step * sign(dS/dz), b + step * sign(dS/db)
    s* = clip(s * (1 + z) + b, s - eps, s + eps)          (L-inf ball around s)

The intended class y is the seed's label for an expansion within its class, an edit's target
for a cross-class edit: always the class the output is meant to have and will be labelled
with. Here we deviate from the official GIF code, whose class term is the probability of the
class the guide predicts on the seed (its argmax). A guide is wrong exactly on the minor
classes that generation is for (a FER2013 guide trained with plain sampling predicts disgust
for none of the disgust test images), so that rule pushes a disgust seed towards whatever the
guide mistakes it for, away from its own label (DESIGN.md, "Evaluation protocol"). `classes`
is therefore a required argument of every scoring function: no path falls back to the guide's
prediction.

A group is the K outputs of one seed image: S_div compares an output with its siblings only,
so an output does not depend on which other seeds share its batch.

The projection is where eps matters: s * z + b is of the order of the latent's own scale, so
with a small eps nearly every entry lands on the ball's edge and the guided step changes
almost nothing. `GifStep.clipped` measures that share
(docs/stages.md#generation-gif-guided-imagination).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

Guide = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (logits, features)


def perturb(latents: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return latents * (1 + z) + b


def draw_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """z ~ U[0,1) and b ~ N(0,1) of `shape` ([C,1,1] per channel of a latent, [D] per dimension
    of an embedding), one draw per output from that output's own generator."""
    z = torch.stack([torch.rand(shape, generator=g) for g in generators])
    b = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return z, b


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)


def group_divergence(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per sample: KL(softmax(mean of f over i's group) || softmax(f_i)), f L2-normalised (B,).

    The direction is the official GIF code's: torch's KLDivLoss(input, target) is
    KL(target || input), called there with the sample as input and the batch mean as target
    (reduction "batchmean": the mean of these over the batch).
    """
    normalised = F.normalize(features.float(), dim=1)
    count = int(groups.max()) + 1
    sums = torch.zeros(count, normalised.shape[1], device=normalised.device).index_add(0, groups, normalised)
    sizes = torch.bincount(groups, minlength=count).clamp_min(1).unsqueeze(1)
    means = (sums / sizes)[groups]
    log_sample = F.log_softmax(normalised, dim=1)
    log_mean = F.log_softmax(means, dim=1)
    return (log_mean.exp() * (log_mean - log_sample)).sum(dim=1)


def gif_scores(
    logits: torch.Tensor,
    features: torch.Tensor,
    seed_probabilities: torch.Tensor,
    groups: torch.Tensor,
    classes: torch.Tensor,
) -> torch.Tensor:
    """S = S_inf + S_div of each perturbed output (B,); seed probabilities repeated per output.

    S_inf's class term is the probability of `classes` (B,), each output's intended class: its
    seed's label, or an edit's target. The official GIF code rewards the guide's prediction on
    the seed instead; see the module docstring for why we do not. An output's S depends on its
    own seed's K outputs only, never on other seeds in its batch.
    """
    probabilities = logits.float().softmax(dim=1)
    delta_entropy = entropy(probabilities) - entropy(seed_probabilities)
    classes = classes.to(probabilities.device, torch.long)
    if classes.shape != probabilities.shape[:1]:
        raise ValueError(
            f"classes: one intended class per output ({len(probabilities)}), got {tuple(classes.shape)}"
        )
    class_probability = probabilities.gather(1, classes.unsqueeze(1)).squeeze(1)
    return delta_entropy + class_probability + group_divergence(features, groups)


def gif_score(
    logits: torch.Tensor,
    features: torch.Tensor,
    seed_probabilities: torch.Tensor,
    groups: torch.Tensor,
    classes: torch.Tensor,
) -> torch.Tensor:
    """The batch's S, the mean of `gif_scores` (the official code's means over its batch): the
    quantity the signed-gradient step raises."""
    return gif_scores(logits, features, seed_probabilities, groups, classes).mean()


class GifStep(NamedTuple):
    """What one guided step gives, per output: the projected latents s*, the score S before the
    step (B,), the un-projected stepped latents, and the share of each output's entries that
    the projection clipped (B,)."""

    latents: torch.Tensor
    scores: torch.Tensor
    stepped: torch.Tensor
    clipped: torch.Tensor


def clipped_fraction(stepped: torch.Tensor, base: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output (first dimension): the share of its entries of `stepped` outside the L-inf
    ball of radius eps around `base`."""
    return ((stepped - base).abs() > eps).flatten(1).float().mean(dim=1)


def group_chunks(groups: torch.Tensor, chunk_groups: int | None) -> list[torch.Tensor]:
    """The batch's row indices in runs of `chunk_groups` whole groups (sorted group ids), or all
    rows at once (None). ValueError for a chunk of fewer than one group."""
    if chunk_groups is None:
        return [torch.arange(len(groups), device=groups.device)]
    if chunk_groups < 1:
        raise ValueError(f"chunk_groups = {chunk_groups}: at least one group per pass, or None")
    ids = torch.unique(groups)
    return [
        torch.nonzero(torch.isin(groups, ids[start : start + chunk_groups])).squeeze(1)
        for start in range(0, len(ids), chunk_groups)
    ]


def guided_latents(
    latents: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    guide: Guide,
    seed_probabilities: torch.Tensor,
    groups: torch.Tensor,
    generators: Sequence[torch.Generator],
    step_size: float = 0.1,
    eps: float = 0.1,
    *,
    classes: torch.Tensor,
    chunk_groups: int | None = None,
) -> GifStep:
    """One signed-gradient ascent step on (z, b), projected onto the eps-ball around `latents`.

    `classes` (B,): each output's intended class, whose probability S_inf rewards (its seed's
    label, or an edit's target; never the guide's prediction on the seed).
    Gradients flow only through this step (decoder and guide), never into their weights.

    `chunk_groups`: decode, score and backpropagate that many groups (seed images' K outputs)
    at a time, so that the decoder's activations of only those outputs are held at once (a
    512 px Stable Diffusion decoder's are GiBs per output); None: the whole batch at once.
    The step is the same either way: an output's S depends on its own group only, and each
    chunk's gradient is that of the whole batch's mean S. `decode` must treat rows alone.
    """
    base = latents.detach().float()
    if classes.shape != base.shape[:1]:
        raise ValueError(f"classes: one intended class per output ({len(base)}), got {tuple(classes.shape)}")
    # Per channel of a B x C x H x W latent ([C,1,1]), per dimension of a B x D embedding ([D]).
    z, b = draw_noise(generators, (base.shape[1],) + (1,) * (base.dim() - 2))
    z, b = z.to(base.device), b.to(base.device)
    grad_z, grad_b = torch.zeros_like(z), torch.zeros_like(b)
    scores = torch.zeros(len(base), device=base.device)
    for rows in group_chunks(groups, chunk_groups):
        z_rows, b_rows = z[rows].requires_grad_(True), b[rows].requires_grad_(True)
        with torch.enable_grad():
            logits, features = guide(decode(perturb(base[rows], z_rows, b_rows)))
            chunk = gif_scores(logits, features, seed_probabilities[rows], groups[rows], classes[rows])
            # The batch's mean S (the official code's objective), restricted to these rows' terms.
            grad_z[rows], grad_b[rows] = torch.autograd.grad(chunk.sum() / len(base), [z_rows, b_rows])
        scores[rows] = chunk.detach().float()
    with torch.no_grad():
        z_step = z + step_size * grad_z.sign()
        b_step = b + step_size * grad_b.sign()
        stepped = perturb(base, z_step, b_step)
        projected = torch.maximum(torch.minimum(stepped, base + eps), base - eps)
    return GifStep(projected, scores, stepped, clipped_fraction(stepped, base, eps))
