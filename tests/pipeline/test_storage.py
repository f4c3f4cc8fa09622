"""s3:// model files: an endpoint that does not answer is one clear line, after bounded retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from servers import free_port


def test_an_unreachable_s3_endpoint_is_a_clear_error_not_a_hang(tmp_path):
    image = tmp_path / "face.png"
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(image)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FERSYNTH_CACHE": str(tmp_path / "cache"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fersynth.cli", "predict", str(image), "--model", "s3://models/run/model.pt"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "s3://models/run/model.pt" in lines[0] and endpoint in lines[0]
    assert time.monotonic() - started < 120, "bounded retries, not a hang"
    assert not list((tmp_path / "cache").rglob("*.partial")), "no half-written download left behind"
