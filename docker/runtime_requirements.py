"""Print requirements.lock less the `dev` extra's packages of pyproject.toml: what an image installs.

    python docker/runtime_requirements.py requirements.lock pyproject.toml [--part all|cpu|gpu]

The images need none of the test and lint tools (pytest, ruff, hadolint, kubectl, ...); the
rest of the lock, versions unchanged, is what `make run` runs. Runs on the base image's own
Python (standard library only). A dev package that a runtime package also needs stays out too,
so the image's `fersynth --version` (a build step) and the image check prove nothing is missing.

The CUDA image is the CPU image plus what only a GPU loads (docker/Dockerfile), so that the two
share their large layer instead of each holding its own copy of the environment:

- `--part cpu`: every runtime line but GPU_ONLY's (the CPU image; it also deletes cuDNN's engine
  libraries after installing cuDNN, whose core library `import torch` links);
- `--part gpu`: the lines the CUDA image installs on top: GPU_ONLY's and cuDNN's (reinstalled
  whole, engine libraries included);
- `--part all` (default): every runtime line.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

PARTS = ("all", "cpu", "gpu")
# Triton, PyTorch's GPU kernel compiler (0.9 GB): nothing on a CPU imports it.
GPU_ONLY = ("triton",)
# cuDNN (nvidia-cudnn-cu12, -cu13, ...): the CPU image keeps only the core library.
CUDNN = re.compile(r"nvidia-cudnn(-cu\d+)?")


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement line (`Foo_Bar==1.0` -> `foo-bar`)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s=<>!~;\[@]", requirement.strip(), maxsplit=1)[0]).lower()


def runtime_lines(lock_text: str, pyproject_text: str, part: str = "all") -> list[str]:
    """The lock's requirement lines without the `dev` extra's packages (comments dropped).

    `part` picks the CPU image's lines (`cpu`), the CUDA image's additions (`gpu`) or all of
    them (`all`); ValueError for any other value.
    """
    if part not in PARTS:
        raise ValueError(f"part {part!r}: expected all, cpu or gpu")
    dev = tomllib.loads(pyproject_text)["project"]["optional-dependencies"]["dev"]
    dev_names = {_name(d) for d in dev}
    lines = [line.strip() for line in lock_text.splitlines()]
    kept = [line for line in lines if line and not line.startswith("#") and _name(line) not in dev_names]
    if part == "cpu":
        return [line for line in kept if _name(line) not in GPU_ONLY]
    if part == "gpu":
        return [line for line in kept if _name(line) in GPU_ONLY or CUDNN.fullmatch(_name(line))]
    return kept


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Print requirements.lock less the dev extra's packages.")
    parser.add_argument("lock", type=argparse.FileType(encoding="utf-8"), help="requirements.lock")
    parser.add_argument("pyproject", type=argparse.FileType(encoding="utf-8"), help="pyproject.toml")
    parser.add_argument(
        "--part", choices=PARTS, default="all", help="cpu: the CPU image; gpu: the CUDA image's additions"
    )
    args = parser.parse_args(argv)
    print("\n".join(runtime_lines(args.lock.read(), args.pyproject.read(), args.part)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
