"""Profiles: every profile resolves, and the DVC graph and the KFP pipeline are built from it
(rows, test sets and settings), also after a user edits a copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fersynth.settings import load_settings, row_label
from helpers import REPO

ROOT = REPO
DVC = str(Path(sys.executable).parent / "dvc")
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
sys.path.insert(0, str(ROOT))  # pipelines/ and components/ live beside the package


def test_the_profiles_the_users_need_are_there():
    assert {p.stem for p in PROFILES} >= {"demo", "fer2013", "rafdb-thesis", "affectnet"}


def dvc_plan(profile: Path, tmp_path: Path) -> dict[str, list[str]]:
    """{stage: outputs} of dvc.yaml with `profile` as params.yaml, in a scratch DVC project."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(profile, project / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=project, check=True)
    done = subprocess.run([DVC, "stage", "list"], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = {}
    for line in done.stdout.splitlines():
        name, _, rest = line.partition(" ")
        outputs = rest.strip().split("; ")[0]  # "; Reports <metrics>, <plots>" follows (cut short)
        plan[name] = [o.strip() for o in outputs.removeprefix("Outputs ").split(",")]
    return plan


def expected_plan(settings) -> dict[str, list[str]]:
    at, experiment = settings.layout, settings.experiment
    grid = experiment.grid
    plan = {f"demo_data@{key}": [str(at.demo_set(key))] for key in settings.demo.sets}
    plan["ingest"] = [str(at.data / "ingested")]
    plan["in_domain_test_set"] = [str(at.test_set(experiment.in_domain))]
    plan.update({f"cross_test_set@{n}": [str(at.test_set(n))] for n in experiment.cross_sets})
    plan["quality"], plan["guard"] = [str(at.data / "quality")], [str(at.data / "guarded")]
    plan.update({f"train_original@{k}": [str(settings.row_folder(k))] for k in grid.original})
    plan["train_voters"] = [str(at.voters())]
    plan["train_prior"], plan["generate"] = [str(settings.prior.output)], [str(settings.generate.output)]
    plan["verify"], plan["augment"] = [str(settings.verify.output)], [str(at.data / "augmented")]
    plan.update({f"train_synthetic@{k}": [str(settings.row_folder(k))] for k in grid.synthetic})
    plan.update({f"evaluate_original@{k}": [str(at.evaluation(k))] for k in grid.original})
    plan.update({f"evaluate_synthetic@{k}": [str(at.evaluation(k))] for k in grid.synthetic})
    plan["compare"] = [str(at.runs / "compare")]
    plan["report"] = [str(settings.report.output)]  # the results page: written, not a DVC output
    plan["register"] = [str(at.runs / "register.json")]
    return plan


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_the_dvc_graph_is_built_from_each_profile(profile, tmp_path):
    settings = load_settings(profile)
    assert dvc_plan(profile, tmp_path) == expected_plan(settings)
    # The settings' own folders are the ones DVC tracks: stages read them, nothing else.
    assert settings.verify.data == Path(settings.generate.output) / "dataset"
    assert [str(p) for p in settings.evaluate.data] == [
        str(settings.layout.test_set(n)) for n in settings.experiment.test_sets()
    ]


def test_dvc_passes_no_settings_of_its_own():
    """No `-S` in a command: `dvc exp run -S key=value` changes what runs."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = stage.get("do", stage)["cmd"]
        assert " -S " not in command and "--set" not in command.replace("--set ${key}", ""), name


def compiled(profile: Path, tmp_path: Path) -> dict:
    from kfp import compiler

    from pipelines.fersynth_pipeline import build_pipeline

    target = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(load_settings(profile), "test"), str(target))
    return next(yaml.safe_load_all(target.read_text()))


def pipeline_rows(spec: dict) -> list[str]:
    """The grid rows the compiled pipeline loops over (both ParallelFor lists)."""
    rows = []
    for component in spec["components"].values():
        for task in component.get("dag", {}).get("tasks", {}).values():
            raw = task.get("parameterIterator", {}).get("items", {}).get("raw")
            if raw and "label" in raw:
                rows += [json.loads(item)["key"] for item in json.loads(raw)]
    return rows


def carried_profile(spec: dict) -> dict:
    """The resolved profile the pipeline's first step (resolve-settings) starts from."""
    for component in spec["components"].values():
        task = component.get("dag", {}).get("tasks", {}).get("resolve-settings")
        if task:
            return json.loads(task["inputs"]["parameters"]["profile"]["runtimeValue"]["constant"])
    raise AssertionError("no resolve-settings step")


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_the_kfp_pipeline_is_built_from_each_profile(profile, tmp_path):
    settings = load_settings(profile)
    spec = compiled(profile, tmp_path)
    grid = settings.experiment.grid
    assert pipeline_rows(spec) == [*grid.original, *settings.experiment.voters, *grid.synthetic]
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    carried = carried_profile(spec)
    assert type(settings).model_validate(carried) == settings  # every setting travels
    assert parameters["train_steps"]["defaultValue"] == settings.train.steps
    assert parameters["register_metric"]["defaultValue"] == f"{settings.experiment.in_domain}.mean_accuracy"
    assert parameters["data_path"]["defaultValue"] == str(settings.kfp.data_path)


def test_an_edited_copy_of_a_profile_moves_dvc_and_kfp_alike(tmp_path):
    """A row added, a test set added and a step count changed: both orchestrators follow."""
    raw = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    raw["experiment"]["grid"]["synthetic"]["balanced_sl"] = {
        "method": "sl",
        "variant": "balanced",
        "beats": ["original_sl_balanced"],
    }
    raw["experiment"]["cross_sets"]["other"] = {"source": "folder", "input": "data/other_faces"}
    raw["train"]["steps"] = 123
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(raw, sort_keys=False))
    settings = load_settings(edited)

    plan = dvc_plan(edited, tmp_path)
    assert plan == expected_plan(settings)
    assert plan["train_synthetic@balanced_sl"] == ["runs/demo/models/synthetic/balanced_sl"]
    assert plan["cross_test_set@other"] == ["data/demo/test_sets/other"]
    assert settings.experiment.grid.variants() == ["rho", "synthetic_matched", "balanced"]
    assert ("Balanced_SL", "Original_SL_balanced") in settings.report.changes
    assert row_label("balanced_sl") == "Balanced_SL"

    spec = compiled(edited, tmp_path)
    assert "balanced_sl" in pipeline_rows(spec)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["train_steps"]["defaultValue"] == 123
    carried = carried_profile(spec)
    assert "other" in carried["experiment"]["cross_sets"] and carried["train"]["steps"] == 123


def test_a_gpu_profile_evaluates_and_votes_on_the_gpu_pool_with_its_own_voters(tmp_path):
    """rafdb-thesis runs evaluate and verify on CUDA: their steps get the CUDA image."""
    profile = ROOT / "profiles" / "rafdb-thesis.yaml"
    settings = load_settings(profile)
    spec = compiled(profile, tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    for step in ("exec-evaluate", "exec-verify"):
        container = executors[step]["container"]
        assert (
            container["image"].startswith(settings.kfp.gpu_image) and "accelerator" in container["resources"]
        )
    voters = [
        json.loads(task["inputs"]["parameters"]["voter_rows"]["runtimeValue"]["constant"])
        if isinstance(task["inputs"]["parameters"]["voter_rows"]["runtimeValue"]["constant"], str)
        else task["inputs"]["parameters"]["voter_rows"]["runtimeValue"]["constant"]
        for component in spec["components"].values()
        for name, task in component.get("dag", {}).get("tasks", {}).items()
        if name == "verify"
    ]
    assert voters == [[Path(v).name for v in settings.verify.voters]]  # the experiment's voters
    assert voters == [list(settings.experiment.voters)]
