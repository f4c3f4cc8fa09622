"""Print requirements.lock less the `dev` extra's packages of pyproject.toml: what an image installs.

    python docker/runtime_requirements.py requirements.lock pyproject.toml > runtime.txt

The images need none of the test and lint tools (pytest, ruff, hadolint, kubectl, ...); the
rest of the lock, versions unchanged, is what `make run` runs. Runs on the base image's own
Python (standard library only). A dev package that a runtime package also needs stays out too,
so the image's `fersynth --version` (a build step) and the image check prove nothing is missing.
"""

from __future__ import annotations

import re
import sys
import tomllib


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement line (`Foo_Bar==1.0` -> `foo-bar`)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s=<>!~;\[@]", requirement.strip(), maxsplit=1)[0]).lower()


def runtime_lines(lock_text: str, pyproject_text: str) -> list[str]:
    """The lock's requirement lines without the `dev` extra's packages (comments dropped)."""
    dev = tomllib.loads(pyproject_text)["project"]["optional-dependencies"]["dev"]
    dev_names = {_name(d) for d in dev}
    lines = [line.strip() for line in lock_text.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and _name(line) not in dev_names]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: runtime_requirements.py REQUIREMENTS_LOCK PYPROJECT_TOML", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as lock, open(argv[1], encoding="utf-8") as project:
        print("\n".join(runtime_lines(lock.read(), project.read())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
