"""The Kubeflow pipeline: the compiled YAML is current, schedules GPU steps as configured, and
the same pipeline runs end to end through `kfp.local` on a tiny fixture fetched with DVC."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from pipeline_fixtures import (
    DEMO,
    DVC,
    TINY,
    check_pipeline_outputs,
    data_project,
    run_command,
    run_tiny_pipeline,
)

ROOT = REPO
COMPILED = ROOT / "pipelines" / "compiled" / "demo.yaml"  # the demo profile's pipeline


def committed_tag() -> str:
    match = re.search(r"image: ghcr\.io/fersynth/fersynth:(\S+)", COMPILED.read_text())
    assert match, f"{COMPILED}: no fersynth image"
    return match.group(1)


def test_the_committed_pipeline_is_what_the_code_compiles(tmp_path):
    from pipelines.__main__ import compile_pipeline

    fresh = compile_pipeline(tmp_path / "demo.yaml", committed_tag(), DEMO)
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/compiled/demo.yaml is stale: run `make pipeline` (demo profile active) and commit it"
    )


def _spec():
    pipeline, platform = yaml.safe_load_all(COMPILED.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_gpu_steps_get_the_pool_the_accelerator_and_shared_memory():
    from fersynth.settings import load_settings

    gpu = load_settings(DEMO).kfp.gpu
    pipeline, executors = _spec()
    containers = {name: body["container"] for name, body in pipeline["deploymentSpec"]["executors"].items()}
    gpu_steps = {name for name, c in containers.items() if "accelerator" in c.get("resources", {})}
    # quality, train (three loops: original rows, voters, synthetic rows), prior, generate;
    # nothing else holds a GPU.
    trains = {"exec-train", "exec-train-2", "exec-train-3"}
    assert gpu_steps == {"exec-quality", *trains, "exec-train-prior", "exec-generate"}
    for name in gpu_steps:
        accelerator = containers[name]["resources"]["accelerator"]
        assert (
            accelerator["resourceType"] == gpu.accelerator and int(accelerator["resourceCount"]) == gpu.count
        )
        assert containers[name]["image"].startswith("ghcr.io/fersynth/fersynth-cuda:")
        k8s = executors[name]
        assert k8s["nodeSelector"]["labels"] == gpu.node_selector
        assert {"key": gpu.toleration_key, "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        shm = k8s["emptyDirMounts"][0]
        assert (shm["mountPath"], shm["medium"], shm["sizeLimit"]) == ("/dev/shm", "Memory", gpu.shm_size)
    for name in set(containers) - gpu_steps:
        assert containers[name]["image"].startswith("ghcr.io/fersynth/fersynth:")
        assert "nodeSelector" not in executors.get(name, {})


def test_credentials_come_only_from_secrets():
    pipeline, executors = _spec()
    for name in ("exec-fetch-data", "exec-train", "exec-evaluate", "exec-register", "exec-report"):
        secrets = {
            s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in executors[name]["secretAsEnv"]
        }
        assert secrets["fersynth-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
        assert secrets["fersynth-mlflow"] == {"MLFLOW_TRACKING_URI"}
    parameters = pipeline["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in parameters if re.search("secret|password|key|token", p, re.I)]
    text = COMPILED.read_text()
    assert "AWS_SECRET_ACCESS_KEY:" not in text  # only as a Secret key name, never a value


def test_generation_fans_out_over_shards_and_fans_in_to_merge():
    pipeline, _ = _spec()
    dag = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    loops = {
        name: task for name, task in dag.items() if "iteratorPolicy" in task or "parameterIterator" in task
    }
    key, shard_loop = next((k, t) for k, t in loops.items() if t["taskInfo"]["name"] == "shards")
    assert shard_loop["parameterIterator"]["items"]["inputParameter"]  # a runtime list: generate_shards
    assert shard_loop["iteratorPolicy"]["parallelismLimit"] == 4
    body = pipeline["components"][shard_loop["componentRef"]["name"]]["dag"]["tasks"]
    assert "generate" in body
    merge = dag["merge"]["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]
    assert merge["producerTask"] == key  # Collected from the loop
    assert "generate_shards" in pipeline["root"]["inputDefinitions"]["parameters"]
    assert (
        pipeline["root"]["dag"]["tasks"]["record-status"]["triggerPolicy"]["strategy"]
        == "ALL_UPSTREAM_TASKS_COMPLETED"
    )


def test_the_grid_rows_are_the_profile_s_rows():
    from fersynth.settings import load_settings
    from pipelines.fersynth_pipeline import grid_rows

    originals, synthetics = grid_rows(load_settings(DEMO))
    assert [r["label"] for r in originals] == ["Original_SL", "Original_SL_balanced", "Original_MEK"]
    assert [r["label"] for r in synthetics] == [
        "Expanded_SL",
        "Synthetic_MEK",
        "Expanded_MEK",
        "Expanded_SL_balanced",
        "Expanded_SL_copies",
        "Expanded_SL_balanced_copies",
    ]
    assert [r["key"] for r in originals] == ["original_sl", "original_sl_balanced", "original_mek"]
    # The folder of each row's set in the augment step's output: a copy twin's holds seed copies.
    assert [r["variant"] for r in synthetics] == [
        "rho",
        "synthetic_matched",
        "rho",
        "rho",
        "copies_rho",
        "copies_rho",
    ]


def test_the_data_revision_is_resolved_uncached_and_keys_every_cached_step():
    """A moving `data_rev` (main) must not hit the cache of an older fetch: an uncached step
    resolves it to a commit, and the fetches and the settings every step reads take the commit."""
    pipeline, _ = _spec()
    dag = pipeline["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    resolve = dag["resolve-data-rev"]
    assert "enableCache" not in resolve["cachingOptions"]  # KFP's form of caching off
    assert resolve["inputs"]["parameters"]["rev"]["componentInputParameter"] == "pipelinechannel--data_rev"
    from_commit = {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "resolve-data-rev"}
    }
    fetches = [task for task in dag.values() if task["componentRef"]["name"].startswith("comp-fetch-data")]
    assert len(fetches) == 2 and all(task["inputs"]["parameters"]["rev"] == from_commit for task in fetches)
    assert dag["resolve-settings"]["inputs"]["parameters"]["data_rev"] == from_commit
    others = [name for name, task in dag.items() if name != "resolve-data-rev"]
    assert all(
        dag[name]["cachingOptions"].get("enableCache") for name in others if "cachingOptions" in dag[name]
    )
    uses_rev = [
        name for name, task in dag.items()
        if any(v.get("componentInputParameter") == "pipelinechannel--data_rev"
               for v in task.get("inputs", {}).get("parameters", {}).values())
    ]  # fmt: skip
    assert uses_rev == ["resolve-data-rev"]  # no cached step reads the moving name itself


def test_a_new_commit_of_the_data_repository_is_what_the_next_run_fetches(s3_env, tmp_path):
    """Under kfp.local, the pipeline's own resolve and fetch components: a run on branch
    `data_rev`, new data pushed to that branch, a second run: it resolves the new commit and
    fetches the new data (on a cluster the new commit is a new cache key for fetch and
    everything downstream of it)."""
    from kfp import dsl, local

    import components

    repo = data_project(tmp_path, s3_env)
    branch = run_command("git", "rev-parse", "--abbrev-ref", "HEAD", cwd=repo).strip()
    ops = components.build("fersynth:test", "fersynth-cuda:test")

    def fetch_at(data_repo: str, data_rev: str):
        commit = ops.resolve_data_rev(repo_url=data_repo, rev=data_rev).set_caching_options(False)
        ops.fetch_data(repo_url=data_repo, path="data/raw", rev=commit.output)

    fetch_at.__annotations__ = {"data_repo": str, "data_rev": str}  # types, not this file's strings
    fetch_at = dsl.pipeline(name="fetch-at-a-revision")(fetch_at)

    def run_pipeline(name: str) -> tuple[str, list[str]]:
        """One run in its own pipeline root: (the commit fetch was given, the files it fetched)."""
        root = tmp_path / name
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
        )
        fetch_at(data_repo=str(repo), data_rev=branch)
        (fetched,) = [p for p in root.rglob("data") if p.parent.name == "fetch-data" and p.is_dir()]
        (executor,) = root.rglob("fetch-data/executor_output.json")
        files = sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file())
        metadata = json.loads(executor.read_text())
        return json.dumps(metadata), files

    first_meta, before = run_pipeline("first")
    first_commit = run_command("git", "rev-parse", "HEAD", cwd=repo).strip()
    assert first_commit in first_meta and before

    added = repo / "data" / "raw" / "new_labels.txt"  # new data lands on the branch
    added.write_text("new\n")
    run_command(DVC, "add", "-q", "data/raw", cwd=repo)
    run_command(DVC, "push", "-q", cwd=repo)
    run_command("git", "add", "-A", cwd=repo)
    run_command("git", "commit", "-q", "-m", "more data", cwd=repo)
    second_commit = run_command("git", "rev-parse", "HEAD", cwd=repo).strip()

    second_meta, after = run_pipeline("second")
    assert second_commit in second_meta and first_commit not in second_meta
    assert after == sorted([*before, "new_labels.txt"])


def test_a_failed_fetch_names_dvc_s_error_not_its_support_footer(tmp_path):
    from components.artifacts import fetch_data
    from fersynth.errors import FersynthError

    with pytest.raises(FersynthError) as failed:
        fetch_data(str(tmp_path / "no-project"), "data/raw", "HEAD", tmp_path / "out")
    message = str(failed.value)
    assert "ERROR: failed to get 'data/raw'" in message and "Having any troubles" not in message


@pytest.mark.slow
def test_a_synthetic_row_with_no_images_is_skipped_by_the_components(tmp_path):
    """What the train, evaluate and compare components do when the vote accepted nothing: the
    component functions themselves, on real KFP artifact objects, without KFP running them."""
    from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

    from components import stages as component
    from components.artifacts import by_grid_row, resolve_overrides
    from helpers import colour_dataset

    empty = Dataset(uri=str(colour_dataset(tmp_path / "synthetic", per_class=0, test_per_class=1)))
    settings = Artifact(uri=str(tmp_path / "settings"))
    resolve_overrides({}, [], settings.path)  # the package defaults, as the pipeline's first step writes them

    def row(key: str, label: str) -> str:
        return json.dumps({"key": key, "label": label, "variant": ""})

    with pytest.raises(Exception, match="no training images"):  # a row on the original data
        component.train(
            empty, row("original_mek", "Original_MEK"), settings, "", Model(uri=str(tmp_path / "m0"))
        )
    model = Model(uri=str(tmp_path / "model"))
    component.train(empty, row("synthetic_mek", "Synthetic_MEK"), settings, "", model)
    assert "no training images" in model.metadata["skipped"] and model.metadata["grid_row"] == "Synthetic_MEK"
    assert by_grid_row([model.path]) == {"Synthetic_MEK": model.path}
    results, metrics = Artifact(uri=str(tmp_path / "results")), Metrics(uri=str(tmp_path / "metrics"))
    (tmp_path / "test_sets").mkdir()
    component.evaluate(
        model, empty, Dataset(uri=str(tmp_path / "test_sets")), row("synthetic_mek", "Synthetic_MEK"),
        settings, "", results, metrics, ClassificationMetrics(uri=str(tmp_path / "confusion")),
    )  # fmt: skip
    assert metrics.metadata == {} and by_grid_row([results.path]) == {"Synthetic_MEK": results.path}
    table = Markdown(uri=str(tmp_path / "table.md"))
    component.compare([results], [], settings, Artifact(uri=str(tmp_path / "comparisons")), table)
    assert "Synthetic_MEK: skipped, " in Path(table.path).read_text()


def _local_run(root: Path, profile: dict) -> None:
    """The demo profile's first row trained and evaluated by the CLI, as DVC runs it, in a git
    project whose dvc.lock is committed (the lineage a local run records)."""
    from helpers import run_cli

    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    run_command("git", "init", "-q", cwd=root)
    identity = ["-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    run_command("git", *identity, "add", "-A", cwd=root)
    run_command("git", *identity, "commit", "-qm", "lock", cwd=root)
    for command in (
        ["demo-data", "--set", "raw"],
        ["demo-data", "--set", "cross_raw"],
        ["ingest", "--quiet"],
        ["test-set", "in_domain"],
        ["test-set", "cross", "--quiet"],
        ["-S", "train.data=data/demo/ingested", "train", "--row", "original_sl", "--quiet"],
        ["evaluate", "--row", "original_sl", "--quiet"],
    ):
        done = run_cli(*command, cwd=root)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"


def _row_runs(experiment: str, row: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.grid_row = '{row}'")


@pytest.mark.slow  # the whole grid through kfp.local: about 5 minutes
def test_the_pipeline_runs_end_to_end_with_kfp_local(s3_env, mlflow_env, tmp_path):
    """The whole grid through kfp.local; its MLflow runs carry the same metric keys and lineage
    tags as a local run of the same profile through the CLI, against the real MLflow server."""
    from kfp import local

    repo = data_project(tmp_path, s3_env)
    root = tmp_path / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    run_tiny_pipeline(repo, "test", TINY)
    check_pipeline_outputs(root)

    # The same row run locally through the CLI (as DVC runs it) logs the same keys and tags.
    profile = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    profile["demo"]["sets"] = {
        "raw": {"train_size": 56, "test_size": 28, "image_size": 40},
        "cross_raw": {"seed": 7, "train_size": 7, "test_size": 21, "image_size": 40},
    }
    profile["train"].update(image_size=32, steps=4, batch_size=8)
    for pair in TINY:
        section, _, rest = pair.partition(".")
        key, _, value = rest.partition("=")
        if "." not in key:
            profile.setdefault(section, {})[key] = yaml.safe_load(value)
    profile["experiment"]["grid"]["seeds"] = [2048, 2049]
    _local_run(tmp_path / "local", profile)
    experiment = os.environ["FERSYNTH_EXPERIMENT"]
    runs = _row_runs(experiment, "original_sl")
    kfp_runs = [r for r in runs if "kfp_run_id" in r.data.tags]
    local_runs = [r for r in runs if "kfp_run_id" not in r.data.tags]
    # One run per seed on either orchestrator, tagged with its seed.
    assert sorted(r.data.tags["seed"] for r in kfp_runs) == ["2048", "2049"]
    assert sorted(r.data.tags["seed"] for r in local_runs) == ["2048", "2049"]
    kfp_run = next(r for r in kfp_runs if r.data.tags["seed"] == "2048")
    local_run = next(r for r in local_runs if r.data.tags["seed"] == "2048")
    assert set(kfp_run.data.metrics) == set(local_run.data.metrics)
    assert {"in_domain.mean_accuracy", "cross.mean_accuracy", "in_domain.accuracy.fear"} <= set(
        local_run.data.metrics
    )
    for run in (kfp_run, local_run):
        tags = run.data.tags
        assert tags["profile"] == "demo" and tags["grid_label"] == "Original_SL" and tags["git_commit"]
    # The pipeline's data_rev ("HEAD"), resolved to the data repository's commit.
    assert kfp_run.data.tags["dvc_rev"] == run_command("git", "rev-parse", "HEAD", cwd=repo).strip()
    local_dir = tmp_path / "local"
    local_commit = run_command("git", "log", "-1", "--format=%H", "--", "dvc.lock", cwd=local_dir).strip()
    assert local_run.data.tags["dvc_rev"] == local_commit  # the commit whose dvc.lock names the data


@pytest.mark.parametrize("existing", [False, True])
def test_schedule_uploads_a_version_and_replaces_the_recurring_run(tmp_path, existing):
    from servers import KfpApiRecorder

    old = [
        {"recurring_run_id": "r-old", "display_name": "fersynth-retrain"},
        {"recurring_run_id": "r-other", "display_name": "someone-elses"},
    ]
    api = KfpApiRecorder(existing_pipeline=existing, existing_schedules=old)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipelines", "--image-tag", "abc123", "schedule", "--host", api.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "KFP_TOKEN": ""},
        )
    finally:
        api.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [(r["method"], r["path"].removeprefix("/apis/v2beta1")) for r in api.requests]
    uploads = [c for c in calls if c[1].startswith("/pipelines/upload")]
    assert uploads == ([] if existing else [("POST", "/pipelines/upload")]) + [
        ("POST", "/pipelines/upload_version")
    ]
    version = next(r for r in api.requests if r["path"].endswith("/upload_version"))
    assert version["query"]["name"] == ["abc123-retrain"] and version["multipart"]
    assert ("DELETE", "/recurringruns/r-old") in calls and ("DELETE", "/recurringruns/r-other") not in calls
    assert calls.index(("DELETE", "/recurringruns/r-old")) < calls.index(("POST", "/recurringruns"))
    body = next(
        r["body"] for r in api.requests if r["method"] == "POST" and r["path"].endswith("/recurringruns")
    )
    assert body["display_name"] == "fersynth-retrain" and body["experiment_id"] == "e-1"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert body["max_concurrency"] in (1, "1") and body["no_catchup"] is True
    assert body["pipeline_version_reference"] == {
        "pipeline_id": "p-1" if existing else "p-new",
        "pipeline_version_id": "v-9",
    }
    assert "recurring run r-new" in done.stdout


def test_the_retraining_version_has_caching_off_everywhere(tmp_path):
    from fersynth.kfp_deploy import without_caching

    target = without_caching(COMPILED, tmp_path / "nocache.yaml")
    text = target.read_text()
    assert "enableCache: true" in COMPILED.read_text()
    assert "enableCache: true" not in text and text.count("enableCache: false") >= 20


def test_a_five_field_cron_is_refused():
    command = [sys.executable, "-m", "pipelines", "--image-tag", "t", "schedule"]
    command += ["--host", "http://127.0.0.1:9", "--cron", "0 3 * * 1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "KFP needs 6 fields" in done.stderr and "Traceback" not in done.stderr
