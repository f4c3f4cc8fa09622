"""dvc.yaml: what DVC needs from every profile, checked without running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fersynth.settings import load_settings
from helpers import REPO

ROOT = REPO
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def _declared(stage: dict) -> list[str]:
    return [p for p in stage.get("do", stage).get("params", []) if "${" not in p]


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_parameter_dvc_tracks_is_in_every_profile(profile):
    """DVC refuses a stage whose tracked parameter is missing from params.yaml."""
    params = yaml.safe_load(profile.read_text())
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        for dotted in _declared(stage):
            node = params
            for part in dotted.split("."):
                assert isinstance(node, dict) and part in node, f"{profile.name}: {name} tracks {dotted!r}"
                node = node[part]


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_the_voters_and_the_guide_are_inside_what_verify_and_generate_wait_for(profile):
    settings = load_settings(profile)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    originals = settings.layout.runs / "models" / "original"
    for stage in ("verify", "generate"):
        assert "runs/${experiment.name}/models/original" in stages[stage]["deps"]
    # The voters live apart, so generation (which needs only the guide) never waits for them.
    assert "runs/${experiment.name}/voters" in stages["verify"]["deps"]
    assert "runs/${experiment.name}/voters" not in stages["generate"]["deps"]
    assert Path(settings.generate.guide_model).is_relative_to(originals)
    for voter in settings.verify.voters:
        assert Path(voter).is_relative_to(originals) or Path(voter).is_relative_to(settings.layout.voters())
