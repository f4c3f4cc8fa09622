"""The fer2013 profile, reduced to a few steps, through every stage of the DVC graph on the real
file in ../shared: what `make run PARAMS=profiles/fer2013.yaml` does, in a scratch project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

ROOT = REPO
BIN = Path(sys.executable).parent
PROFILE = ROOT / "profiles" / "fer2013.yaml"

# Few steps and few seed images: every stage runs on the whole real file, none at the profile's scale.
REDUCED = {
    "train": {"steps": 12, "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 6, "log_every": 6},
    "prior": {"steps": 10},
    # Sized to the need as in the profile, capped: 40 outputs per class from 2 seed images.
    "generate": {"max_seeds_per_class": 2, "max_per_class": 40},
}
SEEDS = [2048, 2049]  # two training seeds: the paired statistics run, in a third of the time


def _reduced_profile() -> str:
    profile = yaml.safe_load(PROFILE.read_text())
    for section, values in REDUCED.items():
        profile[section] = {**(profile.get(section) or {}), **values}
    profile["experiment"]["grid"]["seeds"] = SEEDS
    return yaml.safe_dump(profile, sort_keys=False)


def _project(tmp_path: Path, fer2013_csv: Path) -> Path:
    """A scratch copy of the project (graph, code, reduced profile) beside a `shared` link, so the
    profile's `../shared/datasets/...` is the real file."""
    (tmp_path / "shared" / "datasets" / "fer2013").mkdir(parents=True)
    os.symlink(fer2013_csv, tmp_path / "shared" / "datasets" / "fer2013" / fer2013_csv.name)
    project = tmp_path / "main"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (project / "profiles").mkdir()
    (project / "profiles" / "fer2013.yaml").write_text(_reduced_profile())
    os.symlink("profiles/fer2013.yaml", project / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=project, check=True)
    return project


def _repro(project: Path, env: dict) -> str:
    done = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)  # every stage on the real file: 13-15+ min on two slow cores
def test_the_reduced_fer2013_profile_runs_every_stage_on_the_real_file(fer2013_csv, tmp_path):
    project = _project(tmp_path, fer2013_csv)
    mlflow = tmp_path / "mlflow"
    mlflow.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow}/mlflow.db",
        "FERSYNTH_ARTIFACT_LOCATION": str(mlflow / "artifacts"),
        "HF_HUB_OFFLINE": "1",
    }
    first = _repro(project, env)
    stages = subprocess.run(
        [str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=project, capture_output=True, text=True
    ).stdout.split()
    ran = set(re.findall(r"Running stage '([^']+)'", first))
    assert set(stages) == ran, f"stages that did not run: {sorted(set(stages) - ran)}"
    assert "train_synthetic@expanded_sl" in ran and "register" in ran

    # Every stage ran on the real data: FER2013's own counts come through.
    ingest = json.loads((project / "data/fer2013/ingested/ingest_report.json").read_text())
    assert ingest["inputs"] == 28709 + 3589
    test_manifest = (project / "data/fer2013/test_sets/in_domain/manifest.csv").read_text()
    assert len(test_manifest.strip().splitlines()) - 1 == 3589

    # The results page: tables, the changes against the cheapest competitor, the acceptance table
    # where every seeded class has accepted images or a stated reason, and the stage times.
    page = (project / "docs/results/fer2013.md").read_text()
    for label in ("Original_SL", "Original_SL_balanced", "Expanded_SL", "Expanded_SL_balanced"):
        assert f"| {label} " in page
    assert "Expanded_SL - Original_SL_balanced" in page
    # What the generator added: each row minus its copy twin; the counts per class behind it.
    assert "| Expanded_SL - Expanded_SL_copies (in_domain)" in page
    assert "| Expanded_SL_balanced - Expanded_SL_balanced_copies (in_domain)" in page
    sizing = json.loads((project / "data/fer2013/generated/dataset/sizing.json").read_text())
    assert sizing["copy_twins"] is True
    # rho 2 on happy: only disgust and surprise need images (each capped at 40 outputs).
    needy = {name for name, plan in sizing["per_class"].items() if plan["generated"]}
    assert needy == {"disgust", "surprise"}, sizing["per_class"]
    assert (
        sizing["per_class"]["disgust"]["needed"]
        == -(-sizing["per_class"]["happy"]["real"] // 2) - (sizing["per_class"]["disgust"]["real"])
    )
    counts_section = page.split("## Synthetic images per class", 1)[1].split(
        "## Synthetic images accepted", 1
    )[0]
    assert "| disgust " in counts_section and "Expanded_SL_balanced_copies" in counts_section
    verify = json.loads((project / "data/fer2013/verified/verify_report.json").read_text())
    for name, counts in verify["per_class"].items():
        if counts["generated"] > 0 and counts["accepted"] == 0:
            assert f"- {name}: " in page, f"{name}: no accepted image and no reason on the page"
    times = page.split("## Stage times", 1)[1]
    for stage in set(stages) - {"report", "register"}:  # every stage before the page, timed
        assert f"| {stage} " in times, stage
    assert re.search(r"\| generate +\| merge ", times) and "**total**" in times
    register = json.loads((project / "runs/fer2013/register.json").read_text())
    assert register["registered"] is True and register["name"] == "fersynth-fer2013"  # its own model

    # A second run with nothing changed runs nothing but the page (`report` is always_changed).
    second = _repro(project, env)
    assert set(re.findall(r"Running stage '([^']+)'", second)) == {"report"}, second
    assert (project / "docs/results/fer2013.md").read_text().split("## Stage times")[0] == page.split(
        "## Stage times"
    )[0]
