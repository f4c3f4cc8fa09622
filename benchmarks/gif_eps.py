"""How much GIF's guided step acts for each eps (the L-inf radius of the projection).

For each eps: the share of perturbed latent entries that the projection clips onto the
ball's edge, how far the outputs move from the unperturbed decode (grey levels), how varied
one seed's K outputs are (mean pairwise distance of the guide's normalised features), and how
often the guide still reads the seed's class.

- `prior`: the demo's autoencoder prior (runs/demo/prior) and guide (the original_sl row's
  model) on training seeds of data/demo/guarded, K=5, through `GifPrior` and `guided_latents`.
  Run `make run` first.
- `sd_latents`: Stable Diffusion's scaled latents are near unit variance by construction
  (its VAE scaling factor is chosen for that), and the clipped share depends only on the
  latents' spread, GIF's noise (z ~ U[0,1), b ~ N(0,1)) and the step (0.1 * sign). It is
  measured by Monte Carlo on s ~ N(0, 1) with random step signs: no weights needed.

Writes benchmarks/results/gif_eps.json.

    .venv/bin/python benchmarks/gif_eps.py [--seeds-per-class 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fersynth.dataset import TRAIN_SPLIT, load_image, read_manifest
from fersynth.generate import output_seed
from fersynth.generate.backends import Batch, GifPrior, make_prompts, resize_seed, rewarded_classes, to_tensor
from fersynth.generate.gif import clipped_fraction, guided_latents
from fersynth.generate.guide import FerGuide
from fersynth.generate.prior import load_prior
from fersynth.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gif_eps.json"
EPS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
K = 5


def sd_latents(eps_values=EPS, samples: int = 200_000, step: float = 0.1, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(samples, generator=generator)
    z = torch.rand(samples, generator=generator)
    b = torch.randn(samples, generator=generator)
    signs = lambda: torch.randint(0, 2, (samples,), generator=generator) * 2 - 1  # noqa: E731
    stepped = s * (1 + z + step * signs()) + b + step * signs()
    return {f"{e:g}": round(float(clipped_fraction(stepped[None], s[None], e)), 4) for e in eps_values}


def prior_runs(seeds_per_class: int, eps_values=EPS) -> dict:
    settings = load_settings(ROOT / "profiles" / "demo.yaml")
    torch.set_num_threads(2)
    device = torch.device("cpu")
    guide = FerGuide(ROOT / settings.model_folder(settings.generate.guide_model), device)
    vae, size = load_prior(ROOT / settings.generate.prior)
    data = read_manifest(ROOT / settings.generate.data)
    train = data.manifest[data.manifest["split"] == TRAIN_SPLIT]
    chosen = train.groupby("label").head(seeds_per_class).sort_values("id")
    seeds = [resize_seed(load_image(data.image_path(p)), size) for p in chosen["path"]]
    labels = list(chosen["label"])
    results = {}
    for eps in eps_values:
        backend = GifPrior(
            vae, guide, device, settings.generate.step_size, eps, keep_detail=settings.generate.keep_detail
        )
        clipped, moved, spread, kept = [], [], [], []
        started = time.perf_counter()
        for pixels, label, seed_id in zip(seeds, labels, chosen["id"], strict=True):
            ids = [output_seed(2048, seed_id, k) for k in range(K)]
            batch = Batch(
                [pixels],
                [label],
                [0] * K,
                [torch.Generator().manual_seed(s) for s in ids],
                make_prompts([label] * K, ids, True),
            )
            with torch.no_grad():  # as generate(): the seed as stored is S_inf's reference
                seed_probabilities = guide(to_tensor(batch.seeds, device))[0].softmax(dim=1)
            latents = backend.latents(batch)
            step = guided_latents(
                latents,
                backend.decode,
                guide,
                seed_probabilities.repeat(K, 1),
                torch.zeros(K, dtype=torch.long),
                batch.generators,
                backend.step_size,
                eps,
                classes=rewarded_classes(batch),
            )
            with torch.no_grad():
                before, after = backend.decode(latents), backend.decode(step.latents)
                logits, features = guide(after)
            clipped.append(float(step.clipped.mean()))
            moved.append(float((after - before).abs().mean() * 255))
            unit = torch.nn.functional.normalize(features, dim=1)
            spread.append(float(torch.pdist(unit).mean()))
            kept.append(float((logits.argmax(1) == seed_probabilities.argmax(1)).float().mean()))
        results[f"{eps:g}"] = {
            "clipped_fraction": round(float(np.mean(clipped)), 4),
            "moved_grey_levels": round(float(np.mean(moved)), 2),
            "within_seed_feature_distance": round(float(np.mean(spread)), 4),
            "guide_keeps_seed_class": round(float(np.mean(kept)), 4),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(eps, results[f"{eps:g}"], flush=True)
    with torch.no_grad():
        sample = backend.latents(batch)
    return {
        "seeds": len(seeds),
        "outputs_per_seed": K,
        "latent_std": round(float(sample.std()), 4),
        "per_eps": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds-per-class", type=int, default=6)
    args = parser.parse_args()
    result = {
        "what": "share of GIF's perturbed latent entries the eps-ball projection clips; what the step does",
        "sd_latents_clipped_fraction": sd_latents(),
        "prior": prior_runs(args.seeds_per_class),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
