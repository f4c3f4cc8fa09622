"""MLflow tracking and the Model Registry against a real `mlflow server` (sqlite backend,
artifacts on the rclone S3 server), through the CLI as users run it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.helpers import colour_dataset
from tests.helpers import run_cli as fersynth

pytestmark = pytest.mark.slow  # the server takes 15-40 s to start on two cores


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


TINY = [
    "-S", "train.arch=resnet18", "-S", "train.image_size=32", "-S", "train.batch_size=16",
    "-S", "train.warmup_steps=2", "-S", "train.workers=0", "-S", "train.lr=0.003",
    "-S", "train.rotation=0.0", "-S", "evaluate.workers=0",
]  # fmt: skip


def test_runs_metrics_models_and_the_champion_alias(mlflow_env, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    data = colour_dataset(tmp_path / "colours", per_class=8, test_per_class=3, val_per_class=2)
    settings = ["-S", f"evaluate.data=[{json.dumps(str(data))}]"]
    for name, steps in (("weak", 1), ("strong", 40)):
        out = ok(
            fersynth(
                *TINY, *settings, "train", "--data", str(data), "--steps", str(steps),
                "--output", str(tmp_path / name), "--quiet", cwd=tmp_path,
            )
        )  # fmt: skip
        assert "MLflow run" in out
        ok(fersynth(*TINY, *settings, "evaluate", "--model", str(tmp_path / name), "--quiet", cwd=tmp_path))

    mlflow.set_tracking_uri(mlflow_env.uri)
    client = MlflowClient()
    strong_id = json.loads((tmp_path / "strong" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(strong_id)
    metric = f"{data.name}.mean_accuracy"
    assert run.data.params["train.arch"] == "resnet18" and run.data.params["seed"] == "2048"
    # The rates the run really used (an SL run: train.lr as given; MEK may scale it).
    assert run.data.params["effective.lr"] == "0.003" and run.data.params["effective.warmup_steps"] == "2"
    assert 0.0 <= run.data.metrics[metric] <= 1.0
    assert f"{data.name}.accuracy.fear" in run.data.metrics
    assert run.data.tags["git_commit"] and "val_accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(strong_id, f"evaluation/{data.name}")}
    assert f"evaluation/{data.name}/confusion.png" in artifacts
    assert f"evaluation/{data.name}/metrics.json" in artifacts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == data.name
    weak_value = client.get_run(json.loads((tmp_path / "weak" / "mlflow_run.json").read_text())["run_id"])
    weak_value = weak_value.data.metrics[metric]
    strong_value = run.data.metrics[metric]
    assert strong_value > weak_value, "40 steps on separable colours must beat 1 step"
    # The model's requirements are named, not inferred: exactly the installed torch and numpy.
    from importlib.metadata import version

    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{strong_id}/model/requirements.txt"))
    pins = set(requirements.read_text().split())
    assert {f"torch=={version('torch')}", f"numpy=={version('numpy')}"} <= pins

    # A skipped row (nothing to train on) is passed over, not an error.
    from fersynth.skipped import write_skipped

    write_skipped(tmp_path / "empty", "no training images", {})
    name = f"fer-{tmp_path.name}"
    out = ok(
        fersynth(
            *settings, "register", f"weak={tmp_path / 'weak'}", f"strong={tmp_path / 'strong'}",
            f"empty={tmp_path / 'empty'}", "--name", name, "--metric", metric, cwd=tmp_path,
        )
    )  # fmt: skip
    assert "now the champion" in out
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == strong_id and champion.version == "1"

    # A worse model is registered as a new version but does not take the alias.
    out = ok(
        fersynth(
            *settings,
            "register",
            f"weak={tmp_path / 'weak'}",
            "--name",
            name,
            "--metric",
            metric,
            cwd=tmp_path,
        )
    )
    assert "not promoted" in out
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    # A challenger ranked by a key the champion lacks is refused in one line, never promoted.
    other = "cross.mean_accuracy"
    client.log_metric(json.loads((tmp_path / "weak" / "mlflow_run.json").read_text())["run_id"], other, 0.99)
    refused = fersynth(
        *settings, "register", f"weak={tmp_path / 'weak'}", "--name", name, "--metric", other, cwd=tmp_path
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"has no metric {other!r}" in refused.stderr
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert len(client.search_model_versions(f"name='{name}'")) == 2  # nothing registered

    # predict loads the champion from the registry.
    image = data / read_first_test_image(data)
    out = ok(fersynth("predict", str(image), "--model", f"models:/{name}@champion", cwd=tmp_path))
    header, row = out.strip().splitlines()[:2]
    assert header.startswith("path,predicted,confidence")
    assert row.split(",")[1] == "surprise"  # the first test image is surprise-coloured


def read_first_test_image(data: Path) -> str:
    from fersynth.dataset import read_manifest

    return read_manifest(data).split("test").iloc[0]["path"]


def test_an_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    from tests.servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = fersynth("register", f"a={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"MLflow server {uri} is not reachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_run_report_is_logged_with_its_changes(mlflow_env, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from fersynth.classes import CLASSES

    compare = tmp_path / "compare" / "raf"
    compare.mkdir(parents=True)
    header = "run," + ",".join(CLASSES) + ",Total,Mean"
    original = "Original_SL," + ",".join(["50"] * 7) + ",50,50"
    expanded = "Expanded_SL," + ",".join(["50", "62"] + ["50"] * 5) + ",51,52"  # fear is second
    copies = "Expanded_SL_copies," + ",".join(["50", "57"] + ["50"] * 5) + ",50.5,51"  # its copy twin
    (compare / "comparison.csv").write_text("\n".join([header, original, expanded, copies]) + "\n")
    out = ok(
        fersynth(
            "-S", f"report.comparisons=[{json.dumps(str(compare))}]", "-S", f"report.output={tmp_path / 'r'}",
            "-S", f"report.evaluations={tmp_path / 'none'}",
            "-S", 'report.twins=[["Expanded_SL", "Expanded_SL_copies"]]', "report", cwd=tmp_path,
        )
    )  # fmt: skip
    assert "report.md" in out
    run_id = json.loads((tmp_path / "r" / "mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(mlflow_env.uri)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert CLASSES[1] == "fear"
    assert run.data.metrics["change.Expanded_SL-Original_SL.raf.fear"] == pytest.approx(12)
    assert run.data.metrics["change.Expanded_SL-Original_SL.raf.Mean"] == pytest.approx(2)
    # What the generator added over its copy twin, per class, beside what the data bought.
    assert run.data.metrics["generator_added.Expanded_SL-Expanded_SL_copies.raf.fear"] == pytest.approx(5)
    assert run.data.metrics["generator_added.Expanded_SL-Expanded_SL_copies.raf.Mean"] == pytest.approx(1)
    assert run.data.tags["fersynth.kind"] == "report"
    assert "report/report.md" in {a.path for a in client.list_artifacts(run_id, "report")}


def test_a_failed_pipeline_is_an_mlflow_run(mlflow_env, tmp_path):
    from mlflow import MlflowClient

    from components.artifacts import record_status

    status = {"state": "FAILED", "pipelineTaskName": "verify", "error": {"message": "no voters"}}
    record = record_status(status, str(tmp_path / "status.json"))
    assert json.loads((tmp_path / "status.json").read_text()) == record
    client = MlflowClient(mlflow_env.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(f"test-{tmp_path.name}").experiment_id],
        "tags.`fersynth.kind` = 'pipeline-status'",
    )
    assert runs and runs[0].data.tags["state"] == "FAILED"
    logged = Path(client.download_artifacts(runs[0].info.run_id, "status.json", str(tmp_path)))
    assert json.loads(logged.read_text())["error"] == "no voters"


def test_steps_racing_to_create_the_experiment_both_go_on(mlflow_env, monkeypatch):
    """Two steps side by side (a KFP ParallelFor) both find no experiment and both create it:
    the second one's RESOURCE_ALREADY_EXISTS is not a failure."""
    import mlflow

    from fersynth import tracking

    tracking._mlflow()  # the experiment now exists
    with monkeypatch.context() as patched:
        patched.setattr(mlflow, "get_experiment_by_name", lambda name: None)  # as the racer saw it
        assert tracking._mlflow() is mlflow
    assert mlflow.get_experiment_by_name(os.environ["FERSYNTH_EXPERIMENT"]) is not None


def test_a_step_that_loses_a_create_race_retries_instead_of_failing(monkeypatch):
    """Three rows trained side by side log the same dataset; the server's get-or-create can
    answer the loser with a UNIQUE constraint error, which is retried, never a failed step."""
    import mlflow

    from fersynth import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    calls = []

    def losing_then_fine():
        calls.append(1)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("UNIQUE constraint failed: datasets.experiment_id")
        return "logged"

    assert tracking._racing(losing_then_fine) == "logged" and len(calls) == 2

    def broken():
        raise mlflow.exceptions.MlflowException("something else")

    with pytest.raises(mlflow.exceptions.MlflowException, match="something else"):
        tracking._racing(broken)
