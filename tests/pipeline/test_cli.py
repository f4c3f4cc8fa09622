from __future__ import annotations

import json

import pytest
from tests.helpers import run_cli

from fersynth.cli import main
from helpers import REPO

ROOT = REPO


@pytest.mark.parametrize("command", [[], ["ingest"], ["demo-data"], ["params"]])
def test_help_everywhere(capsys, command):
    assert main([*command, "--help"]) == 0
    assert "Usage: fersynth" in capsys.readouterr().out


def test_user_mistakes_are_one_line_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad-params.yaml"
    bad.write_text("ingest:\n  workers: lots\n")
    cases = [
        (["--params", str(bad), "params"], "ingest.workers = 'lots'"),
        (["-S", "ingest.sourc=rafdb", "params"], "unknown key 'ingest.sourc'"),
        (
            ["ingest", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")],
            "nothing: input not found",
        ),
        (
            ["ingest", "--source", "fer2013", "--input", str(bad), "--output", str(tmp_path / "o")],
            "missing columns emotion, pixels",
        ),
    ]
    for args, expected in cases:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fersynth: error:"), result.stderr
        assert expected in lines[0]


def test_params_prints_resolved_settings_with_overrides(capsys):
    assert main(["-S", "ingest.workers=3", "params"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["ingest"]["workers"] == 3 and resolved["seed"] == 2048
    assert main(["-S", "experiment.name=fer", "params", "experiment.name"]) == 0
    assert capsys.readouterr().out == "fer\n"
    assert main(["params", "train.stepz"]) == 2
    assert "no setting 'train.stepz'" in capsys.readouterr().err


def test_grid_and_test_set_names_are_checked_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").symlink_to(ROOT / "profiles" / "demo.yaml")
    assert main(["train", "--row", "nosuch"]) == 2
    assert "experiment.grid: no row 'nosuch'" in capsys.readouterr().err
    assert main(["test-set", "nosuch"]) == 2
    assert "no test set 'nosuch' (test sets: in_domain, cross)" in capsys.readouterr().err
    assert main(["train", "--row", "original_sl", "--method", "mek"]) == 2
    assert "drop --method" in capsys.readouterr().err
    assert main(["-S", "train.method=mek", "train", "--row", "original_sl"]) == 2
    assert "drop -S train.method" in capsys.readouterr().err
    assert main(["augment", "--grid", "--variant", "rho"]) == 2
    assert "drop --variant" in capsys.readouterr().err
    assert main(["compare", "--output", "x"]) == 2  # two test sets, one folder
    assert "add --test-set (one of in_domain, cross)" in capsys.readouterr().err


def test_a_dangling_params_link_is_an_error_not_the_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").symlink_to("profiles/gone.yaml")
    assert main(["params", "experiment.name"]) == 2
    assert "params.yaml links to profiles/gone.yaml, which does not exist" in capsys.readouterr().err


def test_demo_data_then_ingest_from_the_command_line(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "ds"
    assert main(["demo-data", "--output", str(raw), "--train-size", "70", "--test-size", "21"]) == 0
    assert main(["ingest", "--input", str(raw), "--output", str(out), "--quiet"]) == 0
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 91
    # A second run refuses to overwrite silently, and --force replaces.
    result = run_cli("ingest", "--input", str(raw), "--output", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "--force" in result.stderr
    assert main(["ingest", "--input", str(raw), "--output", str(out), "--quiet", "--force"]) == 0
