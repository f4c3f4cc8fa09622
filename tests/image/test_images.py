"""The built images (docker/), proven where they run: `make image-check` builds the CPU and CUDA
targets and runs these tests against them (docker/image-check.sh). Without built images (the
environment variables below unset) they are skipped; `make test` deselects them (marker `image`).

- FERSYNTH_IMAGE, FERSYNTH_GPU_IMAGE: the CPU and CUDA images under test.
- FERSYNTH_BASE_IMAGE: the Python base image they were built on.
- FERSYNTH_CA_BUNDLE: the CA bundle given to the build (`--secret id=ca_bundle`), if any.
- DOCKER: the docker client (default `docker`).

Containers here run with no network, or on the host's network for the loopback S3 and MLflow
servers: never on a bridge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from helpers import REPO

pytestmark = pytest.mark.image

ROOT = REPO
DOCKER = os.environ.get("DOCKER", "docker")
IMAGE = os.environ.get("FERSYNTH_IMAGE", "")
GPU_IMAGE = os.environ.get("FERSYNTH_GPU_IMAGE", "")
BASE_IMAGE = os.environ.get("FERSYNTH_BASE_IMAGE", "")
CA_BUNDLE = os.environ.get("FERSYNTH_CA_BUNDLE", "")
SITE = "/opt/venv/lib/python3.11/site-packages"
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)-----END CERTIFICATE-----", re.S)


@pytest.fixture(scope="module", autouse=True)
def _images_built():
    if not (IMAGE and GPU_IMAGE):
        pytest.skip("no built images: run `make image-check` (FERSYNTH_IMAGE and FERSYNTH_GPU_IMAGE unset)")


def _docker(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _offline(image: str, *command: str, volume: Path | None = None, timeout: float = 600) -> str:
    """`command` in `image` as its own user (10001), with no network at all; the container is
    removed even when the client is killed by a timeout."""
    mount = ["-v", f"{volume}:/work", "-w", "/work"] if volume else []
    name = f"fersynth-test-{uuid.uuid4().hex[:12]}"
    try:
        return _docker(
            "run", "--rm", "--name", name, "--network", "none", *mount, image, *command, timeout=timeout
        ).stdout
    finally:
        _docker("rm", "-f", name, check=False)


@pytest.fixture
def shared_dir():
    """A folder the container's user (uid 10001) may write: outside pytest's root-only tmp,
    removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fersynth-image-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_cpu_image_runs_the_demo_stages_offline_as_uid_10001(shared_dir):
    """Demo data, ingest, the test sets, quality (with a tiny SwinIR), guard, a 5-step training
    run tracked in a local MLflow store, evaluation and predict: the commands of dvc.yaml, in
    the CPU image, as uid 10001, with no network."""
    from helpers import write_tiny_swinir

    work = shared_dir
    profile = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    profile["demo"]["sets"] = {
        "raw": {"train_size": 70, "test_size": 35, "image_size": 40, "blurred_fraction": 0.2},
        "cross_raw": {"seed": 7, "train_size": 7, "test_size": 21, "image_size": 40},
    }
    profile["experiment"]["grid"]["seeds"] = [2048]
    profile["train"].update(image_size=32, steps=5, batch_size=8, eval_every=5, checkpoint_every=5, workers=0)
    profile["evaluate"] = {"workers": 0, "batch_size": 32}
    profile["quality"] = {"workers": 1}
    profile["guard"] = {"workers": 1}
    (work / "params.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    (work / "params.yaml").chmod(0o644)  # whatever the umask: uid 10001 reads it
    write_tiny_swinir(work / "swinir_x2.pth").chmod(0o644)
    script = """set -eux
id -u
export MLFLOW_TRACKING_URI=sqlite:////work/mlflow.db FERSYNTH_ARTIFACT_LOCATION=/work/mlartifacts
fersynth demo-data --set raw
fersynth demo-data --set cross_raw
fersynth ingest --quiet
fersynth test-set in_domain
fersynth test-set cross --quiet
fersynth quality --sr-model /work/swinir_x2.pth --quiet
fersynth guard --quiet
fersynth train --row original_sl --quiet
fersynth evaluate --row original_sl --quiet
fersynth predict --model runs/demo/models/original/original_sl/seed_2048 \
  --output predictions.csv data/demo/test_sets/in_domain
"""
    out = _offline(IMAGE, "bash", "-c", script, volume=work, timeout=800)
    assert out.splitlines()[0] == "10001"

    import pandas as pd

    from fersynth.classes import CLASSES

    quality = pd.read_csv(work / "data/demo/quality/manifest.csv")
    assert len(quality) == 70 + 35 and (quality["origin"] == "enhanced").sum() > 0  # SwinIR ran
    model = work / "runs/demo/models/original/original_sl/seed_2048"
    summary = json.loads((model / "train_summary.json").read_text())
    assert summary["steps"] == 5
    metrics = {
        p.parent.name: json.loads(p.read_text()) for p in (work / "runs/demo/eval").rglob("metrics.json")
    }
    assert set(metrics) == {"in_domain", "cross"}, f"evaluate wrote {sorted(metrics)}"
    assert metrics["in_domain"]["images"] == 35 and sum(map(sum, metrics["in_domain"]["confusion"])) == 35
    assert 0.0 <= metrics["in_domain"]["mean_accuracy"] <= 1.0
    predictions = pd.read_csv(work / "predictions.csv")
    assert len(predictions) == 35 and set(predictions["predicted"]) <= set(CLASSES)
    assert predictions["error"].isna().all()
    assert (work / "mlflow.db").stat().st_size > 0  # the run was tracked, offline


def _certificates(pem: bytes) -> set[bytes]:
    """The base64 bodies of a PEM bundle's certificates, whitespace removed."""
    return {re.sub(rb"\s+", b"", body) for body in PEM.findall(pem)}


def _layer_dirs(image: str) -> list[Path] | None:
    """The folders of every layer of `image` on this machine (overlay2: the top layer and the
    ones below it), or None where the engine stores images otherwise or elsewhere."""
    driver = json.loads(_docker("image", "inspect", image).stdout)[0]["GraphDriver"]
    if driver["Name"] != "overlay2":
        return None
    data = driver["Data"]
    dirs = [Path(d) for d in [data.get("UpperDir", ""), *data.get("LowerDir", "").split(":")] if d]
    return dirs if dirs and all(d.is_dir() for d in dirs) else None


def _file_contents(image: str, max_bytes: int = 8 << 20):
    """(name, bytes) of the files up to `max_bytes` that say CERTIFICATE in any layer of
    `image` (a file that a later layer deletes is still seen), and of its configuration and
    history. From the layers' folders where the engine is local (grep finds the candidates, a
    minute faster per image than reading `docker save`), else from `docker save`."""
    yield "image config", _docker("image", "inspect", image).stdout.encode()
    yield "image history", _docker("history", "--no-trunc", image).stdout.encode()
    dirs = _layer_dirs(image)
    if dirs is not None:
        found = subprocess.run(
            ["grep", "-rlZ", "-D", "skip", "-F", "CERTIFICATE", "--", *map(str, dirs)], capture_output=True
        )
        assert found.returncode in (0, 1), found.stderr.decode()[-2000:]
        for name in filter(None, found.stdout.split(b"\0")):
            path = Path(os.fsdecode(name))
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= max_bytes:
                yield str(path), path.read_bytes()
        return
    save = subprocess.Popen([DOCKER, "save", image], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
            for member in outer:
                if not member.isfile():
                    continue
                data = outer.extractfile(member)
                if member.name.endswith(".tar"):
                    with tarfile.open(fileobj=data, mode="r|") as layer:
                        for entry in layer:
                            if entry.isfile() and entry.size <= max_bytes:
                                yield f"{member.name}:{entry.name}", layer.extractfile(entry).read()
                elif member.size <= max_bytes:
                    yield member.name, data.read()
        assert save.wait() == 0, f"docker save {image} failed"
    finally:
        save.kill()


def _build_machine_certificates() -> tuple[set[bytes], set[bytes]]:
    """(certificates of the build's CA bundle that the base image lacks, the base image's own)."""
    if not CA_BUNDLE:
        pytest.skip("the images were built without a CA bundle (FERSYNTH_CA_BUNDLE unset)")
    bundle = _certificates(Path(CA_BUNDLE).read_bytes())
    public = _certificates(
        _docker(
            "run", "--rm", "--network", "none", BASE_IMAGE, "cat", "/etc/ssl/certs/ca-certificates.crt"
        ).stdout.encode()
    )
    private = bundle - public
    assert private, f"{CA_BUNDLE}: every certificate is also in {BASE_IMAGE}: nothing to look for"
    return private, public


def _scan(image: str, private: set[bytes], public: set[bytes]) -> tuple[list[str], bool]:
    """(files of `image` holding one of `private`, whether any file holds one of `public`).
    A certificate's body may be wrapped at any width: a run of 60 characters of it is looked for
    in each file that says CERTIFICATE, whitespace removed."""
    needles = [cert[100:160] for cert in private]
    known = [cert[100:160] for cert in sorted(public)[:5]]
    found, public_seen = [], False
    for name, data in _file_contents(image):
        if b"CERTIFICATE" not in data and not name.startswith("image "):  # config, history: always
            continue
        flat = re.sub(rb"\s+", b"", data)
        found += [name for needle in needles if needle in flat]
        public_seen |= any(needle in flat for needle in known)
    return found, public_seen


@pytest.mark.parametrize("which", ["cpu", "cuda"])
def test_the_images_hold_no_ca_certificate_of_the_build_machine(which):
    """The build's CA bundle reached pip as a build secret: no certificate of it that the base
    image lacks (the build machine's own or its proxy's) is in any file, and no variable names it."""
    image = IMAGE if which == "cpu" else GPU_IMAGE
    private, public = _build_machine_certificates()
    found, public_seen = _scan(image, private, public)
    assert not found, f"{image}: the build machine's CA certificates are in {found}"
    assert public_seen, "the scan found not even the base image's own certificates: it is broken"
    inspect = _docker("image", "inspect", image).stdout
    metadata = inspect + _docker("history", "--no-trunc", image).stdout
    assert CA_BUNDLE not in metadata and "BEGIN CERTIFICATE" not in metadata
    config = json.loads(inspect)[0]["Config"]
    names = [entry.split("=", 1)[0] for entry in config.get("Env") or []]
    assert not [n for n in names if re.search(r"CERT|CA_BUNDLE|SSL", n)], f"{image}: {names}"


@pytest.mark.parametrize("via", ["layer folders", "docker save"])
def test_the_ca_scan_finds_a_bundle_copied_into_an_image(via, monkeypatch):
    """The scan above can fail: an image that copies the bundle in (the mistake it guards
    against), re-wrapped at 76 columns, is caught, by either way of reading the layers."""
    if via == "docker save":
        monkeypatch.setattr(f"{__name__}._layer_dirs", lambda image: None)
    private, public = _build_machine_certificates()
    context = Path(tempfile.mkdtemp(prefix="fersynth-ca-leak-"))
    try:
        bodies = [cert.decode() for cert in sorted(private)]
        wrapped = "".join(
            "-----BEGIN CERTIFICATE-----\n"
            + "\n".join(body[i : i + 76] for i in range(0, len(body), 76))
            + "\n-----END CERTIFICATE-----\n"
            for body in bodies
        )
        (context / "proxy-ca.pem").write_text(wrapped)
        dockerfile = f"FROM {BASE_IMAGE}\nCOPY proxy-ca.pem /usr/lib/ssl/proxy-ca.pem\n"
        (context / "Dockerfile").write_text(dockerfile)
        _docker("build", "--network", "none", "-t", "fersynth-test/ca-leak:1", str(context))
        found, _ = _scan("fersynth-test/ca-leak:1", private, public)
        assert found and all(name.endswith("usr/lib/ssl/proxy-ca.pem") for name in found), found
    finally:
        _docker("rmi", "-f", "fersynth-test/ca-leak:1", check=False)
        shutil.rmtree(context, ignore_errors=True)


def test_the_cpu_image_leaves_out_only_what_a_gpu_loads_and_the_cuda_image_has_it_all():
    probe = (
        "import glob, importlib.util, json, torch; "
        f"print(json.dumps({{'triton': importlib.util.find_spec('triton') is not None, "
        f"'cudnn': sorted(p.rsplit('/', 1)[1] for p in glob.glob('{SITE}/nvidia/cudnn/lib/*.so*')), "
        "'torch': torch.__version__, 'cuda': torch.version.cuda}))"
    )
    cpu = json.loads(_offline(IMAGE, "python", "-c", probe).strip().splitlines()[-1])
    cuda = json.loads(_offline(GPU_IMAGE, "python", "-c", probe).strip().splitlines()[-1])
    assert cpu["torch"] == cuda["torch"] and cpu["cuda"] == cuda["cuda"]  # the same locked torch
    assert not cpu["triton"] and cpu["cudnn"] == ["libcudnn.so.9"]
    assert cuda["triton"] and "libcudnn_engines_precompiled.so.9" in cuda["cudnn"] and len(cuda["cudnn"]) >= 8
    # The CUDA image is what the GPU pool runs: the NVIDIA toolkit's variables, the image's user.
    config = json.loads(_docker("image", "inspect", GPU_IMAGE).stdout)[0]["Config"]
    assert "NVIDIA_VISIBLE_DEVICES=all" in config["Env"] and config["User"] == "10001:10001"
    # No test or lint tool ships in either: the lock's runtime part only.
    tools = "('pytest', 'ruff', 'kubernetes_validate')"
    probe = f"import importlib.util as u; print([m for m in {tools} if u.find_spec(m)])"
    for image in (IMAGE, GPU_IMAGE):
        assert _offline(image, "python", "-c", probe).strip() == "[]", image


def test_torch_compile_builds_its_kernels_in_the_cuda_image():
    """train.compile is on by default on CUDA where a C compiler is on PATH: the CUDA image has
    one (Triton's launchers, Inductor's CPU kernels), and a compiled function runs there as the
    image's user, offline (here on the CPU, with Inductor's C++ kernels) and matches eager.
    The CPU image, whose steps never compile, has none."""
    compiler = "from fersynth.train.loop import c_compiler; "
    probe = (
        f"import json, torch; {compiler}"
        "eager = lambda x: torch.sin(x) * 2 + x.sum(); x = torch.arange(6.0); "
        "same = bool(torch.allclose(torch.compile(eager)(x), eager(x))); "
        "print(json.dumps({'cc': c_compiler(), 'same': same}))"
    )
    cuda = json.loads(_offline(GPU_IMAGE, "python", "-c", probe).strip().splitlines()[-1])
    assert cuda == {"cc": "cc", "same": True}
    assert _offline(IMAGE, "python", "-c", f"{compiler}print(c_compiler())").strip() == "None"


def test_the_pipeline_runs_in_its_images_with_kfp_docker_runner(s3_env, mlflow_env, shared_dir):
    """The compiled pipeline's steps, each in the image it ships in (kfp.local.DockerRunner),
    on the host's network for the loopback S3 and MLflow servers: every grid row is trained and
    evaluated, the shards are merged, and the best model is registered."""
    from docker.types import Mount
    from kfp import local
    from mlflow import MlflowClient

    from fersynth.settings import load_settings
    from pipeline_fixtures import DEMO, TINY, check_pipeline_outputs, data_project, run_tiny_pipeline

    work = shared_dir
    repo = data_project(work, s3_env)
    root = work / "pipeline-root"
    root.mkdir()
    root.chmod(0o777)
    environment = {
        key: os.environ[key] for key in (*s3_env.env(), "MLFLOW_TRACKING_URI", "FERSYNTH_EXPERIMENT")
    }
    # On a cluster the data project is cloned from a git server; here it is a folder of the
    # host's, which git refuses to read unless the reader owns it.
    if os.geteuid() == 0:
        for path in (repo, *repo.rglob("*")):
            os.lchown(path, 10001, 10001)
        user = {}  # the image's own user, 10001
    else:
        user = {"user": f"{os.getuid()}:{os.getgid()}"}
    runner = local.DockerRunner(
        network_mode="host",
        environment=environment,
        **user,
        mounts=[Mount(target=str(repo), source=str(repo), type="bind", read_only=True)],
    )
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    tag = IMAGE.rsplit(":", 1)[1]
    settings = load_settings(DEMO)
    assert f"{settings.kfp.image}:{tag}" == IMAGE and f"{settings.kfp.gpu_image}:{tag}" == GPU_IMAGE
    old_umask = os.umask(0)  # folders kfp.local makes for the steps' outputs: writable by uid 10001
    try:
        run_tiny_pipeline(repo, tag, [*TINY[:-1], "experiment.grid.seeds=[2048]"])
    finally:
        os.umask(old_umask)
    check_pipeline_outputs(root)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ["FERSYNTH_EXPERIMENT"])
    runs = client.search_runs([experiment.experiment_id], "tags.grid_row = 'original_sl'")
    assert (
        runs
        and all(r.data.tags["git_commit"] == tag for r in runs)
        and "in_domain.mean_accuracy" in runs[0].data.metrics
    )
