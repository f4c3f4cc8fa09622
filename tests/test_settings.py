from __future__ import annotations

import json
from pathlib import Path

import pytest

from fersynth.errors import FersynthError
from fersynth.settings import Settings, load_settings, save_resolved

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_yaml_is_valid_and_matches_defaults():
    # params.yaml spells out every default: the file and the code must not drift apart.
    assert load_settings(REPO / "params.yaml") == Settings()


def test_thesis_seed_default():
    assert Settings().seed == 2048


def test_bad_value_names_key_value_and_expectation(tmp_path):
    path = write(tmp_path, "ingest:\n  workers: many\n")
    with pytest.raises(FersynthError) as info:
        load_settings(path)
    message = str(info.value)
    assert "ingest.workers" in message and "'many'" in message and "integer" in message
    assert str(path) in message


def test_out_of_range_value_is_refused(tmp_path):
    with pytest.raises(FersynthError, match=r"demo.label_noise = 1.5"):
        load_settings(write(tmp_path, "demo:\n  label_noise: 1.5\n"))


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(FersynthError, match=r"unknown key 'ingest.wrkers'"):
        load_settings(write(tmp_path, "ingest:\n  wrkers: 2\n"))


def test_unknown_source_lists_choices(tmp_path):
    with pytest.raises(FersynthError, match=r"ingest.source = 'kdef'.*rafdb"):
        load_settings(write(tmp_path, "ingest:\n  source: kdef\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(FersynthError, match="not valid YAML"):
        load_settings(write(tmp_path, "ingest: [unclosed\n"))
    with pytest.raises(FersynthError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    with pytest.raises(FersynthError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    settings = load_settings(write(tmp_path, "seed: 1\n"), ["ingest.workers=3", "demo.seed=7"])
    assert settings.seed == 1
    assert settings.ingest.workers == 3 and settings.demo.seed == 7
    with pytest.raises(FersynthError, match="KEY=VALUE"):
        load_settings(None, ["ingest.workers"])
    with pytest.raises(FersynthError, match="ingest.workers = -1"):
        load_settings(None, ["ingest.workers=-1"])


def test_save_resolved_writes_every_default(tmp_path):
    settings = load_settings(None, ["ingest.workers=2"])
    path = save_resolved({"seed": settings.seed, "ingest": settings.ingest}, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["seed"] == 2048
    assert saved["ingest"]["workers"] == 2
    assert saved["ingest"]["affectnet"]["test_per_class"] == 500
    assert saved["ingest"]["fer2013"]["split_map"]["PublicTest"] == "test"
