"""Which generation settings give the demo's accepted images the real images' variety: per
setting and class, how many images the vote accepts and their feature diversity as a share of
the real images' (issue 18 asks for at least 80% in every class that gets accepted images),
and their distance to their own seed image on the same scale (0: near-copies of the seeds).

Each setting is a JSON object of `generate.*` values laid over the profile's (for example
`{"max_seeds_per_class": 150}` or `{"eps": 1.6}`); it runs through `run_generate`, `run_merge`
and `run_verify` as `make run` does, into a scratch folder (see ldm_strength.py's
`one_setting`). `make run` first, for the guide, the voters and the prior.

Writes benchmarks/results/diversity_levers.json.

    .venv/bin/python benchmarks/diversity_levers.py '{}' '{"max_seeds_per_class": 150}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_strength import ROOT, one_setting  # noqa: E402

from fersynth.settings import load_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "diversity_levers.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help="JSON objects of generate.* values")
    parser.add_argument("--params", type=Path, default=ROOT / "profiles" / "demo.yaml")
    args = parser.parse_args()
    settings = load_settings(args.params)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, text in enumerate(args.settings):
            changes = json.loads(text)
            name = json.dumps(changes, sort_keys=True) if changes else "profile"
            rows[name] = one_setting(settings, Path(scratch), f"setting_{i}", **changes)
    profile = args.params.relative_to(ROOT) if args.params.is_relative_to(ROOT) else args.params
    result = {
        "what": "accepted synthetic images and their diversity as a share of the real images', per class",
        "profile": str(profile),
        "profile_generate": {
            k: settings.generate.model_dump(mode="json")[k]
            for k in ("backend", "k", "max_seeds_per_class", "eps", "seed_rotation", "keep_detail")
        },
        "runs": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
