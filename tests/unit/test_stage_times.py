"""Stage times: recorded for commands DVC runs as stages, and the results page's table."""

from __future__ import annotations

import json

from fersynth import stage_times
from fersynth.cli import main


def test_the_last_run_of_each_stage_command_is_kept_in_finishing_order(tmp_path):
    stage_times.record(tmp_path, "ingest", "ingest", 10.0)
    stage_times.record(tmp_path, "generate", "generate", 65.2)
    stage_times.record(tmp_path, "generate", "merge", 2.0)  # a second command of one stage
    stage_times.record(tmp_path, "ingest", "ingest", 12.5)  # a rerun replaces the first
    with (tmp_path / stage_times.STAGE_TIMES).open("a") as handle:
        handle.write("{torn\n")  # not a stage time: skipped, never fatal
        handle.write(json.dumps({"stage": "", "command": "x", "seconds": 1, "finished": "t"}) + "\n")
        handle.write(json.dumps({"stage": "quality", "command": "quality"}) + "\n")
    stage_times.record(tmp_path, "report", "report", 3.0)
    entries = stage_times.last_times(tmp_path)
    assert [(e["stage"], e["command"], e["seconds"]) for e in entries] == [
        ("generate", "generate", 65.2),
        ("generate", "merge", 2.0),
        ("ingest", "ingest", 12.5),
        ("report", "report", 3.0),
    ]
    text = stage_times.times_markdown(tmp_path)
    assert "| generate " in text and "1 min 05 s" in text and "| 12 s " in text
    assert "**1 min 20 s**" in text  # 65.2 + 2.0 + 12.5; report (writes the page) is left out
    assert "report" not in text and "quality" not in text
    assert "No stage times" in stage_times.times_markdown(tmp_path / "absent")


def test_only_a_finished_command_that_dvc_runs_as_a_stage_records_its_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("experiment: {name: timing}\n")
    times = tmp_path / "runs" / "timing" / stage_times.STAGE_TIMES
    faces = ["demo-data", "--train-size", "14", "--test-size", "7", "--force", "--output", "faces"]
    monkeypatch.delenv(stage_times.DVC_STAGE, raising=False)
    assert main(["--params", "p.yaml", *faces]) == 0
    assert not times.exists()  # run by hand: not a stage of the graph
    monkeypatch.setenv(stage_times.DVC_STAGE, "demo_data@raw")
    assert main(["--params", "p.yaml", "train", "--data", str(tmp_path / "absent")]) == 2
    assert not times.exists()  # failed: no time
    assert main(["--params", "p.yaml", *faces]) == 0
    [entry] = [json.loads(line) for line in times.read_text().splitlines()]
    assert (entry["stage"], entry["command"]) == ("demo_data@raw", "demo-data") and entry["seconds"] > 0
