"""GIF's guided imagination step (Zhang et al., NeurIPS 2023), as its official code does it,
independent of the model that produced the latent:

    s' = s * (1 + z) + b,   z ~ U[0, 1), b ~ N(0, 1), both of shape [B, C, 1, 1]
    S  = S_inf + S_div
    S_inf = (entropy of the guide's prediction on decode(s') - entropy on the seed)
            + probability of the seed's predicted class on decode(s')
    S_div = KL divergence of each sample's normalised features from its group's mean
    z, b <- z + step * sign(dS/dz), b + step * sign(dS/db)
    s* = clip(s * (1 + z) + b, s - eps, s + eps)          (L-inf ball around s)

A group is the K outputs of one seed image: S_div compares an output with its siblings only,
so an output does not depend on which other seeds share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Guide = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (logits, features)


def perturb(latents: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return latents * (1 + z) + b


def draw_noise(generators: Sequence[torch.Generator], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z ~ U[0,1) and b ~ N(0,1), one [C,1,1] draw per output from that output's own generator."""
    z = torch.stack([torch.rand(channels, 1, 1, generator=g) for g in generators])
    b = torch.stack([torch.randn(channels, 1, 1, generator=g) for g in generators])
    return z, b


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)


def group_divergence(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(f_i) || softmax(mean of f over i's group)), f L2-normalised."""
    normalised = F.normalize(features.float(), dim=1)
    count = int(groups.max()) + 1
    sums = torch.zeros(count, normalised.shape[1], device=normalised.device).index_add(0, groups, normalised)
    sizes = torch.bincount(groups, minlength=count).clamp_min(1).unsqueeze(1)
    means = (sums / sizes)[groups]
    log_p = F.log_softmax(normalised, dim=1)
    log_q = F.log_softmax(means, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def gif_score(
    logits: torch.Tensor, features: torch.Tensor, seed_probabilities: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """S = S_inf + S_div for a batch of perturbed outputs (seed probabilities repeated per output)."""
    probabilities = logits.float().softmax(dim=1)
    delta_entropy = (entropy(probabilities) - entropy(seed_probabilities)).mean()
    seed_class = seed_probabilities.argmax(dim=1, keepdim=True)
    class_probability = probabilities.gather(1, seed_class).mean()
    return delta_entropy + class_probability + group_divergence(features, groups)


def guided_latents(
    latents: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    guide: Guide,
    seed_probabilities: torch.Tensor,
    groups: torch.Tensor,
    generators: Sequence[torch.Generator],
    step_size: float = 0.1,
    eps: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One signed-gradient ascent step on (z, b), projected onto the eps-ball around `latents`.

    Returns (s*, score before the step, score of the un-projected stepped latent) per batch.
    Gradients flow only through this step (decoder and guide), never into their weights.
    """
    base = latents.detach().float()
    z, b = draw_noise(generators, base.shape[1])
    z, b = z.to(base.device).requires_grad_(True), b.to(base.device).requires_grad_(True)
    with torch.enable_grad():
        logits, features = guide(decode(perturb(base, z, b)))
        score = gif_score(logits, features, seed_probabilities, groups)
        grad_z, grad_b = torch.autograd.grad(score, [z, b])
    with torch.no_grad():
        z_step = z + step_size * grad_z.sign()
        b_step = b + step_size * grad_b.sign()
        stepped = perturb(base, z_step, b_step)
        projected = torch.maximum(torch.minimum(stepped, base + eps), base - eps)
    return projected, score.detach(), stepped
