"""Shared test set-up: offline hubs, the shared data's location, and the `slow` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub download in a test is a bug
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_FER2013 = REPO.parent / "shared" / "datasets" / "fer2013" / "fer2013.csv.gz"


@pytest.fixture(scope="session")
def fer2013_csv() -> Path:
    if not SHARED_FER2013.is_file():
        pytest.skip(f"real FER2013 data not found at {SHARED_FER2013} (../shared is absent)")
    return SHARED_FER2013
