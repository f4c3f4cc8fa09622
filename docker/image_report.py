"""Write benchmarks/results/images.json for `make image-check` (docker/image-check.sh calls it).

The images' sizes and the ten largest packages of each (what takes the space), the build and
test times, how much of each build came from Docker's cache, and pytest's closing line. The
images come from FERSYNTH_IMAGE and FERSYNTH_GPU_IMAGE, the client from DOCKER.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

SITE = "/opt/venv/lib/python3.11/site-packages"
RESULT = Path("benchmarks/results/images.json")


def _docker(*args: str) -> str:
    docker = os.environ.get("DOCKER", "docker")
    return subprocess.run([docker, *args], capture_output=True, text=True, check=True).stdout


def largest_packages(image: str, count: int = 10) -> dict[str, int]:
    """The `count` largest entries of the image's site-packages, MB (du -sm)."""
    script = f"du -sm {SITE}/* | sort -rn | head -{count}"
    out = _docker("run", "--rm", "--network", "none", image, "sh", "-c", script)
    return {line.split()[1].rsplit("/", 1)[1]: int(line.split()[0]) for line in out.splitlines()}


def cached_steps(build_log: Path) -> str:
    """'N of M': the build steps BuildKit took from its cache."""
    text = build_log.read_text(errors="replace")
    steps = set(re.findall(r"^#(\d+) \[", text, re.M))
    cached = set(re.findall(r"^#(\d+) CACHED", text, re.M))
    return f"{len(cached & steps)} of {len(steps)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="image-check's log folder")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--ca-bundle-given", choices=["yes", "no"], required=True)
    parser.add_argument("--build-seconds", type=int, nargs=2, required=True, metavar=("CPU", "CUDA"))
    parser.add_argument("--test-seconds", type=int, required=True)
    parser.add_argument("--total-seconds", type=int, required=True)
    args = parser.parse_args()
    images = {"cpu": os.environ["FERSYNTH_IMAGE"], "cuda": os.environ["FERSYNTH_GPU_IMAGE"]}
    closing = [
        line.strip("= ")
        for line in (args.out / "pytest.log").read_text(errors="replace").splitlines()
        if re.search(r"\d+ (passed|failed|error)", line)
    ]
    result = {
        "command": "make image-check",
        "image_tag": args.tag,
        "base_image": os.environ["FERSYNTH_BASE_IMAGE"],
        "ca_bundle_given": args.ca_bundle_given == "yes",
        "images": {
            name: {
                "ref": ref,
                "size_mb": int(_docker("image", "inspect", "--format", "{{.Size}}", ref)) // 10**6,
                "largest_packages_mb": largest_packages(ref),
                "build_seconds": seconds,
                "cached_build_steps": cached_steps(args.out / f"build-{name}.log"),
            }
            for (name, ref), seconds in zip(images.items(), args.build_seconds, strict=True)
        },
        "test_seconds": args.test_seconds,
        "total_seconds": args.total_seconds,  # engine, base image, builds and tests
        "tests": closing[-1] if closing else "no pytest summary",
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"image-check: {RESULT}: {result['tests']}")


if __name__ == "__main__":
    main()
