"""Shared test set-up: offline hubs, the shared data's location, the real servers, and the
tier markers: each test gets the marker of its folder (unit, data, model, pipeline, e2e, image;
docs/testing.md), so `pytest -m model` runs one tier."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import REPO
from servers import S3Server, start_mlflow, start_s3

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub download in a test is a bug
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SHARED_FER2013 = REPO.parent / "shared" / "datasets" / "fer2013" / "fer2013.csv.gz"


TIERS = ("unit", "data", "model", "pipeline", "e2e", "image")  # test folders, cheapest first


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path}: a test file belongs in a tier folder ({', '.join(TIERS)})")
        item.add_marker(tier)


@pytest.fixture(autouse=True)
def _isolated_environment():
    """Every test starts from the session's environment variables. Code a test runs in-process
    may set them for good: a KFP component body sets KFP_RUN_ID and FERSYNTH_DVC_REV (it owns
    its container's process), `mlflow.set_tracking_uri` sets MLFLOW_TRACKING_URI and MLflow's
    own process-wide URI; none of that may reach the tests after it (a tier's tests run after
    another tier's)."""
    saved = dict(os.environ)
    yield
    if "mlflow" in sys.modules:  # MLflow's process-wide URI, back to "read the environment"
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.clear()
    os.environ.update(saved)


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
