"""How much of the real images' variety survives the offline prior's autoencoder, per class.

Every offline synthetic image is a decode of the prior's autoencoder, so the variety its
reconstructions keep bounds what `gif-prior` and `gif-ldm` can show. For up to N training
images per class of the active profile's data: the diversity (mean pairwise distance of the
first voter's pre-logit features, as verify's fidelity report computes it) of the images as
stored, of the images at the prior's working size, and of their reconstructions (decode of the
posterior mean), with the reconstructions' share of the real diversity.

Writes benchmarks/results/autoencoder_diversity.json (one entry per prior folder given).

    .venv/bin/python benchmarks/autoencoder_diversity.py [runs/demo/prior ...] [--per-class 80]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from fersynth.classes import CLASSES
from fersynth.dataset import TRAIN_SPLIT, load_image, read_manifest
from fersynth.evaluate import load_model
from fersynth.generate.backends import resize_seed, to_tensor, to_uint8
from fersynth.generate.prior import load_prior
from fersynth.settings import load_settings
from fersynth.verify.fidelity import extract_features, mean_pairwise_distance

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "autoencoder_diversity.json"


def diversity(model, images: list) -> float:
    """verify's feature path on images written as a throwaway dataset folder."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "images").mkdir()
        rows = []
        for i, image in enumerate(images):
            Image.fromarray(image).save(Path(folder) / "images" / f"{i}.png")
            rows.append({"path": f"images/{i}.png", "label": CLASSES[0]})
        features = extract_features(
            model, Path(folder), pd.DataFrame(rows), device=torch.device("cpu"), batch_size=64, workers=0
        )
    return mean_pairwise_distance(features)


def measure(prior: Path, settings, per_class: int) -> dict:
    vae, size = load_prior(prior)
    model = load_model(settings.verify.voters[0], torch.device("cpu"))
    data = read_manifest(settings.generate.data)
    train = data.manifest[data.manifest["split"] == TRAIN_SPLIT]
    per = {}
    for name in CLASSES:
        rows = train[train["label"] == name].sort_values("id").head(per_class)
        if len(rows) < 2:
            continue
        stored = [load_image(data.image_path(p)) for p in rows["path"]]
        small = [resize_seed(image, size) for image in stored]
        with torch.no_grad():
            x = to_tensor(small, torch.device("cpu")) * 2 - 1
            decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        reconstructed = to_uint8((decoded + 1) / 2)
        real, working, recon = (
            diversity(model, stored),
            diversity(model, small),
            diversity(model, reconstructed),
        )
        per[name] = {
            "images": len(rows),
            "diversity_real": round(real, 3),
            "diversity_working_size": round(working, 3),
            "diversity_reconstructed": round(recon, 3),
            "reconstructed_share": round(recon / real, 3),
        }
        print(name, per[name], flush=True)
    info = json.loads((prior / "prior.json").read_text())
    resolved = (
        json.loads((prior / "settings.json").read_text()) if (prior / "settings.json").is_file() else {}
    )
    return {"prior_json": info, "prior_settings": resolved.get("prior"), "per_class": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("priors", type=Path, nargs="*", help="prior folders [the profile's]")
    parser.add_argument("--per-class", type=int, default=80)
    parser.add_argument("--params", type=Path, default=ROOT / "profiles" / "demo.yaml")
    args = parser.parse_args()
    settings = load_settings(args.params)
    torch.set_num_threads(2)
    priors = args.priors or [Path(settings.prior.output)]
    result = {
        "what": "feature diversity of training images and of the prior's reconstructions, per class",
        "features": "the first voter's pre-logit features (verify's fidelity report)",
        "priors": {str(p): measure(p, settings, args.per_class) for p in priors},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
