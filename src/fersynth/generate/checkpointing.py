"""Whether GIF's guided step stores the decoder's activations for its backward or recomputes
them (gradient checkpointing), decided from what they would take and what the device has.

The guided step backpropagates from the guide's score through the VAE decoder to the latent
perturbation (gif.py). Stored, a Stable Diffusion 1.5 decoder's activations take 14.6 GiB for
K = 5 outputs at 512 px in bf16 (28.4 GiB in float32); recomputed, about 2 GiB are stored and
one up-block's (at most 6.6 GiB) are rebuilt at a time, at the cost of a second forward pass of
the decoder: about 2.5 of the step's 19 TFLOP per image (docs/benchmarks.md). So the step
stores them where they fit and recomputes them where they do not. The outputs are the same
either way (the recomputation repeats the same operations).

The bytes are counted, not estimated: the decoder runs once on the `meta` device (a weightless
twin built from the VAE's config: nothing is computed or allocated) and autograd's
saved-tensor hooks add up what its backward would keep.
"""

from __future__ import annotations

import torch

# The share of the device's available memory that stored activations may take: the rest holds
# the backward's own gradients (a few activation-sized tensors at a time) and the guide's.
ACTIVATION_SHARE = 0.5


def saved_activation_bytes(vae, latent_shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
    """Bytes that autograd saves for the backward of `vae.decode` on a latent of `latent_shape`
    (B x C x H x W) in `dtype`, without checkpointing, the weights left out (they are in memory
    anyway): counted on a twin of `vae` on the meta device. `vae` must be a diffusers model
    (`from_config`); None where it is not.

    The count is what a CPU's backward saves (to 2% on a tiny VAE, tested). Where the device fuses
    attention (flash or memory-efficient kernels on CUDA) the mid-block's B x (h*w) x (h*w)
    attention matrix is not saved, so the count is high by that much (0.84 of 14.6 GiB for
    SD-1.5's decoder at K = 5, 512 px): it errs towards recomputing."""
    if not hasattr(type(vae), "from_config"):
        return None
    with torch.device("meta"):
        twin = type(vae).from_config(vae.config)
    # torch's own `to`: diffusers' warns on every cast of a dtype, empty list of modules included.
    twin = torch.nn.Module.to(twin, dtype).eval().requires_grad_(False)
    weights = {id(p) for p in twin.parameters()}
    saved: dict[int, torch.Tensor] = {}  # by identity: a tensor saved by two operations counts once

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in weights:
            saved[id(tensor)] = tensor  # held, so that no id is reused while counting
        return tensor

    latent = torch.zeros(latent_shape, device="meta", dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        twin.decode(latent)
    return sum(t.numel() * t.element_size() for t in saved.values())


def available_bytes(device: torch.device) -> int:
    """What a CUDA device (only) can still give this process: its free memory plus what
    PyTorch's caching allocator has reserved but not handed out."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def should_checkpoint(needed: int | None, available: int, share: float = ACTIVATION_SHARE) -> bool:
    """Recompute (True) when the stored activations (`needed` bytes; None: unknown) would take
    more than `share` of `available` bytes."""
    return needed is None or needed > share * available
