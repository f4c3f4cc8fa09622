"""An MLflow artifact store that is down or refuses writes: found before training, or, when it
fails only while logging, the trained model is kept and logged later with --resume. A local
sqlite tracking store with its artifacts on a real S3 server (rclone), no MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import colour_dataset
from servers import free_port, start_s3

TINY = [
    "-S", "train.arch=resnet18", "-S", "train.image_size=32", "-S", "train.batch_size=8",
    "-S", "train.steps=4", "-S", "train.warmup_steps=1", "-S", "train.workers=0",
    "-S", "train.eval_every=2", "-S", "train.checkpoint_every=2", "-S", "train.log_every=1",
]  # fmt: skip


@pytest.fixture
def data(tmp_path) -> Path:
    return colour_dataset(tmp_path / "colours", per_class=4, test_per_class=1, val_per_class=1)


def _train(tmp_path: Path, data: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fersynth.cli", *TINY, "train", "--data", str(data)]
    command += ["--output", str(tmp_path / "run"), "--quiet", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


def _tracking_env(tmp_path: Path, endpoint: str, keys: tuple[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "FERSYNTH_EXPERIMENT": "store-test",
        "FERSYNTH_ARTIFACT_LOCATION": "s3://mlflow/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": keys[0],
        "AWS_SECRET_ACCESS_KEY": keys[1],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_an_artifact_store_that_is_down_stops_training_before_it_starts(tmp_path, data):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = _train(tmp_path, data, _tracking_env(tmp_path, endpoint, ("key", "secret")))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "fersynth: error: MLflow artifact store s3://mlflow/artifacts is not reachable "
        f"(endpoint {endpoint}: "
    )
    assert "checked before training, nothing was done" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow  # trains, fails to log, resumes and logs, three processes: about 32 s
def test_a_store_that_fails_while_logging_keeps_the_model_and_resume_logs_it(tmp_path, data):
    import mlflow

    root = tmp_path / "s3"
    writable = start_s3(root)
    writable.create_bucket("mlflow")
    writable.stop()
    keys = (writable.access_key, writable.secret_key)
    port = int(writable.endpoint.rsplit(":", 1)[1])
    read_only = start_s3(root, "--read-only", keys=keys, port=port)  # answers, refuses every write
    env = _tracking_env(tmp_path, read_only.endpoint, keys)
    try:
        done = _train(tmp_path, data, env)
    finally:
        read_only.stop()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert (
        f"{tmp_path / 'run'}: trained, and kept on disk (model.pt, checkpoint.pt), "
        "but logging it to MLflow failed" in line
    )
    assert line.endswith("run the same command with --resume to log it (nothing is trained again)")
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert (tmp_path / "run" / "model.pt").is_file() and not (tmp_path / "run" / "mlflow_run.json").exists()

    store = start_s3(root, keys=keys, port=port)  # the store is back
    try:
        again = _train(tmp_path, data, env, "--resume")
    finally:
        store.stop()
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint  # nothing trained again
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    record = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["train_images_per_s"] > 0
