"""Shared test set-up: offline hubs, the shared data's location, and the `slow` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from servers import S3Server, start_mlflow, start_s3

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub download in a test is a bug
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_FER2013 = REPO.parent / "shared" / "datasets" / "fer2013" / "fer2013.csv.gz"


@pytest.fixture(scope="session")
def fer2013_csv() -> Path:
    if not SHARED_FER2013.is_file():
        pytest.skip(f"real FER2013 data not found at {SHARED_FER2013} (../shared is absent)")
    return SHARED_FER2013


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3-compatible server (rclone serve s3) on loopback, for the whole session."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The S3 server's endpoint and credentials in the environment, as users set them."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server (sqlite, artifacts on the S3 server), once per session."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server)
    yield server
    server.stop()


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("FERSYNTH_EXPERIMENT", f"test-{tmp_path.name}")
    return mlflow_server


@pytest.fixture(scope="session")
def fer2013_dataset(fer2013_csv, tmp_path_factory) -> Path:
    """The shared FER2013 CSV ingested once per session (about 30 s), every Training row kept
    (the default ingest drops Training copies of PublicTest images, 11 near-blank frames among them)."""
    from fersynth.ingest import run_ingest
    from fersynth.settings import IngestSettings

    output = tmp_path_factory.mktemp("fer2013") / "dataset"
    # Every Training row stays in `train` (no validation draw): the tests count Training rows.
    settings = IngestSettings(
        source="fer2013",
        input=fer2013_csv,
        output=output,
        drop_train_test_duplicates=False,
        val_fraction=0.0,
    )
    run_ingest(settings, progress=False)
    return output
