"""Dataset versions pushed to and pulled from S3 with DVC, against a real S3-compatible server."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import colour_dataset

DVC = str(Path(sys.executable).parent / "dvc")


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr[-2000:]}"
    return result.stdout


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_push_then_pull_restores_identical_data(s3_env, tmp_path):
    s3_env.create_bucket("dvc-store")
    repo = tmp_path / "project"
    repo.mkdir()
    run("git", "init", "-q", cwd=repo)
    run(DVC, "init", "-q", cwd=repo)
    colour_dataset(repo / "data" / "colours", per_class=3, test_per_class=1)
    before = digest(repo / "data" / "colours")
    run(DVC, "add", "-q", "data/colours", cwd=repo)
    run(DVC, "remote", "add", "-d", "storage", "s3://dvc-store/fersynth", cwd=repo)
    # The endpoint goes in config.local (not committed); credentials come from the environment.
    run(DVC, "remote", "modify", "--local", "storage", "endpointurl", s3_env.endpoint, cwd=repo)
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()
    run(DVC, "push", cwd=repo)
    assert any((s3_env.root / "dvc-store" / "fersynth").rglob("*")), "nothing reached the S3 server"

    shutil.rmtree(repo / "data" / "colours")
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    run(DVC, "pull", cwd=repo)
    assert digest(repo / "data" / "colours") == before
