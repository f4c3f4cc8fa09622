"""dvc.yaml: the graph DVC reads from it, and its parameters, checked without running it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def test_dvc_reads_the_whole_graph_in_order():
    result = subprocess.run([DVC, "stage", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stages = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    expected = ["demo_data", "cross_data", "ingest", "quality", "guard"]
    expected += [f"train_original@{n}" for n in ("original_sl", "original_sl_balanced", "original_mek")]
    expected += ["train_prior", "generate", "verify", "augment@rho", "augment@synthetic"]
    expected += [f"train_synthetic@{n}" for n in ("expanded_sl", "synthetic_mek", "expanded_mek")]
    grid = [
        "original_sl",
        "original_sl_balanced",
        "original_mek",
        "expanded_sl",
        "synthetic_mek",
        "expanded_mek",
    ]
    expected += [f"evaluate@{n}" for n in grid] + ["compare@guarded", "compare@cross", "report", "register"]
    assert stages == expected


def test_every_declared_parameter_section_exists_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in pipeline["stages"].items():
        body = stage.get("do", stage)
        for section in body.get("params", []):
            assert section in params, f"{name}: params.yaml has no {section!r}"


def test_the_voters_verify_waits_for_are_the_ones_params_yaml_names():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = pipeline["stages"]["verify"]["deps"]
    for voter in params["verify"]["voters"]:
        assert voter.replace("runs/demo/models", "${models}") in deps


def test_only_the_rows_on_synthetic_data_may_be_skipped():
    """An empty synthetic set (the vote accepted nothing) skips its row; an empty original set
    is an error that stops the graph."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "--skip-if-empty" in stages["train_synthetic"]["do"]["cmd"]
    assert "--skip-if-empty" not in stages["train_original"]["do"]["cmd"]
