"""What the pipeline tests share with the image tests (tests/image runs the same tiny
pipeline in the built images): the tiny data project, the tiny pipeline run and the check of
its outputs. A module of its own beside helpers.py: a test module in a tier folder is not
importable from another tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

# `pipelines` and `components` live beside the package: importable by this module's users,
# whichever way pytest starts.
sys.path.insert(0, str(REPO))
DEMO = REPO / "profiles" / "demo.yaml"
DVC = str(Path(sys.executable).parent / "dvc")


def run_command(*args: str, cwd: Path) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def data_project(root: Path, s3) -> Path:
    """A git + DVC project holding tiny raw demo data and a cross-dataset test set, pushed to
    the S3 server: what `fetch_data` pulls at a revision."""
    from fersynth.demo import write_demo_data
    from fersynth.ingest import run_ingest
    from fersynth.settings import DemoSettings, IngestSettings

    s3.create_bucket("kfp-data")
    repo = root / "project"
    repo.mkdir()
    run_command("git", "init", "-q", cwd=repo)
    run_command("git", "config", "user.email", "ci@example.com", cwd=repo)
    run_command("git", "config", "user.name", "ci", cwd=repo)
    run_command(DVC, "init", "-q", cwd=repo)
    write_demo_data(
        DemoSettings(output=repo / "data" / "raw", train_size=56, test_size=28, image_size=40), progress=False
    )
    cross_raw = root / "cross_raw"
    write_demo_data(
        DemoSettings(output=cross_raw, seed=7, train_size=7, test_size=21, image_size=40), progress=False
    )
    run_ingest(IngestSettings(input=cross_raw, output=repo / "data" / "test_sets" / "cross"), progress=False)
    run_command(DVC, "add", "-q", "data/raw", "data/test_sets", cwd=repo)
    # The endpoint comes from AWS_ENDPOINT_URL.
    run_command(DVC, "remote", "add", "-d", "storage", "s3://kfp-data/dvc", cwd=repo)
    run_command(DVC, "push", "-q", cwd=repo)
    run_command("git", "add", "-A", cwd=repo)
    run_command("git", "commit", "-q", "-m", "data", cwd=repo)
    return repo


TINY = [
    "train.warmup_steps=1", "train.workers=0", "train.eval_every=2", "train.checkpoint_every=2",
    "train.log_every=1", "train.lr=0.003", "evaluate.workers=0", "evaluate.batch_size=32",
    "prior.steps=3", "prior.image_size=32", "prior.batch_size=8", "generate.max_seeds_per_class=1",
    "generate.sizing=fixed",
    "generate.k=2", "verify.fidelity_images_per_class=4", "verify.kid_subset_size=2",
    "verify.min_probability=0.0", "verify.min_votes=1", "verify.workers=0",
    "guard.workers=1", "ingest.workers=1", "quality.workers=1", "experiment.grid.seeds=[2048, 2049]",
]  # fmt: skip


def run_tiny_pipeline(repo: Path, image_tag: str, overrides: list[str]) -> None:
    """The demo profile's pipeline on `data_project`'s tiny data, under the runner that
    `kfp.local.init` set: 4 steps of the demo profile's architecture at 32 px, two generation
    shards."""
    from fersynth.settings import load_settings
    from pipelines.fersynth_pipeline import build_pipeline

    settings = load_settings(DEMO)
    build_pipeline(settings, image_tag)(
        data_repo=str(repo),
        data_rev="HEAD",
        data_path="data/raw",
        test_sets_path="data/test_sets",
        source="rafdb",
        train_arch=settings.train.arch,  # the demo's small ResNet: its models fill the disk least
        train_image_size=32,
        train_steps=4,
        train_batch_size=8,
        generate_shards=2,
        overrides=overrides,
    )


def check_pipeline_outputs(root: Path) -> None:
    """What a tiny pipeline run under `root` must leave: every grid row trained and evaluated on
    both test sets (the copy twins too), the two shards merged (7 classes x 1 seed x k=2 and
    each output's copy twin, nothing lost or doubled), the report, and the best row registered."""
    tables = sorted(root.rglob("comparisons/in_domain/comparison.csv"))
    assert len(tables) == 1
    table = tables[0].read_text()
    from fersynth.settings import load_settings, row_label

    for key, row in load_settings(DEMO).experiment.grid.rows().items():  # the copy twins too
        assert f"\n{row_label(key, row)}," in table
    assert sorted(root.rglob("comparisons/cross/comparison.csv"))
    merged = [p for p in root.rglob("merge/*/dataset/manifest.csv")] or [
        p for p in root.rglob("manifest.csv") if "merge" in str(p)
    ]
    assert merged and sum(1 for _ in merged[0].open()) - 1 == 2 * 14
    assert merged[0].read_text().count(",copy,") == 14  # gen_kind of the copy twins
    report = sorted(root.rglob("report/**/report.md"))
    assert report and "What the synthetic data changed" in report[0].read_text()
    status = json.loads(next(iter(sorted(root.rglob("register/**/outcome")))).read_text())
    assert status["registered"] and status["metric"] == "in_domain.mean_accuracy"
