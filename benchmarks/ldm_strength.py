"""What the offline backends' accepted images are worth, per class, on the demo: how many the
vote accepts and how varied they are against the real images.

For `gif-prior` and for `gif-ldm` at several img2img strengths (and guidance scales), the
demo profile's generation (its seeds per class, K, guide, eps) runs through `run_generate`,
`run_merge` and `run_verify` (the profile's voters, fidelity report), as `make run` does, into
a scratch folder. Per class it reports the accepted count and the diversity of the accepted
synthetic images (mean pairwise distance of a trained FER model's pre-logit features) as a
share of the real images' diversity: issue 18 asks for at least 80% in every class that gets
accepted images. The prior folder must hold a latent diffusion model (`fersynth train-prior`
with `prior.diffusion.steps` > 0); `make run` first, for the guide and the voters.

Writes benchmarks/results/ldm_strength.json.

    .venv/bin/python benchmarks/ldm_strength.py [--prior runs/demo/prior] [--strengths 0.3 0.5 0.7]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from fersynth.generate import run_generate, run_merge
from fersynth.settings import BACKEND_DEFAULTS, load_settings
from fersynth.verify import run_verify

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ldm_strength.json"


def one_setting(settings, scratch: Path, name: str, **generate) -> dict:
    output = scratch / name
    config = settings.generate.model_copy(update={"output": output / "generated", **generate})
    started = time.perf_counter()
    run_generate(config, seed=settings.seed, progress=False)
    merged = run_merge(config, num_shards=1, progress=False).output
    generated_seconds = time.perf_counter() - started
    verify = settings.verify.model_copy(update={"data": merged, "output": output / "verified"})
    run_verify(verify, settings.guard, seed=settings.seed, force=True, progress=False)
    fidelity = pd.read_csv(output / "verified" / "fidelity.csv").set_index("class")
    per_class = {}
    for name_, row in fidelity.iterrows():
        share = row["diversity_synthetic"] / row["diversity_real"] if row["accepted"] else None
        per_class[name_] = {
            "generated": int(row["generated"]),
            "accepted": int(row["accepted"]),
            "diversity_synthetic": None
            if pd.isna(row["diversity_synthetic"])
            else round(row["diversity_synthetic"], 3),
            "diversity_real": round(row["diversity_real"], 3),
            "diversity_share": None if share is None or pd.isna(share) else round(share, 3),
            # how far an accepted image is from its own seed, on the same scale (0: a copy)
            "seed_distance_share": None
            if not row["accepted"] or pd.isna(row.get("seed_distance", float("nan")))
            else round(row["seed_distance"] / row["diversity_real"], 3),
        }
    shares = [c["diversity_share"] for c in per_class.values() if c["diversity_share"] is not None]
    result = {
        "generate": {k: v for k, v in generate.items() if k != "prior"},
        "generation_seconds": round(generated_seconds, 1),
        "accepted": sum(c["accepted"] for c in per_class.values()),
        "lowest_diversity_share": min(shares) if shares else None,
        "per_class": per_class,
    }
    print(
        name, json.dumps({k: result[k] for k in ("accepted", "lowest_diversity_share", "generation_seconds")})
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", type=Path, default=None, help="prior folder [the profile's]")
    parser.add_argument("--strengths", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    parser.add_argument("--max-seeds-per-class", type=int, default=None, help="[the profile's]")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0])
    parser.add_argument("--steps", type=int, default=None, help="gif-ldm's DDIM steps [its default]")
    parser.add_argument("--params", type=Path, default=ROOT / "profiles" / "demo.yaml")
    args = parser.parse_args()
    settings = load_settings(args.params)
    if args.max_seeds_per_class:
        settings.generate.max_seeds_per_class = args.max_seeds_per_class
    prior = args.prior or settings.generate.prior
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        rows["gif-prior"] = one_setting(
            settings, Path(scratch), "gif-prior", backend="gif-prior", prior=prior
        )
        for scale in args.scales:
            for strength in args.strengths:
                steps = args.steps or BACKEND_DEFAULTS["gif-ldm"]["steps"]
                name = f"gif-ldm strength {strength:g} scale {scale:g} steps {steps}"
                rows[name] = one_setting(
                    settings, Path(scratch), name.replace(" ", "_"), backend="gif-ldm", prior=prior,
                    strength=strength, scale=scale, steps=steps,
                )  # fmt: skip
    info = json.loads((Path(prior) / "prior.json").read_text())
    result = {
        "what": "accepted synthetic images and their diversity as a share of the real images', per class",
        "profile": str(args.params.relative_to(ROOT))
        if args.params.is_relative_to(ROOT)
        else str(args.params),
        "prior": info,
        "runs": rows,
    }
    result["max_seeds_per_class"] = settings.generate.max_seeds_per_class
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
