"""How long each stage took: every stage command run by DVC appends its wall time to
`runs/<experiment>/stage_times.jsonl`, and the results page shows the last run of each.

The file sits outside every DVC output (a time differs between two runs of the same settings),
so it never changes a hash; a stage that DVC skips keeps the time of its last real run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STAGE_TIMES = "stage_times.jsonl"

# DVC names the stage it runs in this variable (`train_original@original_sl`); only commands run
# as a DVC stage are timed, so a command run by hand never lands on the results page.
DVC_STAGE = "DVC_STAGE"


def record(runs: Path, stage: str, command: str, seconds: float) -> None:
    """Append one finished command of a stage (a stage may run several: generate, merge)."""
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    line = {
        "stage": stage,
        "command": command,
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # One short append per line (O_APPEND): two commands finishing together lose nothing.
    with (runs / STAGE_TIMES).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def _valid(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("stage"), str)
        and bool(entry["stage"])
        and isinstance(entry.get("command"), str)
        and isinstance(entry.get("seconds"), int | float)
        and isinstance(entry.get("finished"), str)
    )


def last_times(runs: Path) -> list[dict]:
    """The last recorded run of each (stage, command), in the order they last finished. A line
    that is not a stage time (torn, edited) is skipped."""
    path = Path(runs) / STAGE_TIMES
    if not path.is_file():
        return []
    latest: dict[tuple[str, str], dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not _valid(entry):
            continue
        key = (entry["stage"], entry["command"])
        latest.pop(key, None)  # re-inserted: ordered by its last finish
        latest[key] = entry
    return list(latest.values())


def minutes_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


# Stages that write the results page or run after it: never on the page.
AFTER_THE_PAGE = ("report", "register")


def times_markdown(runs: Path) -> str:
    """A table of the stages' wall times and their sum (the stages before the results page),
    or a line saying none were recorded."""
    import pandas as pd

    from fersynth.markdown import table

    entries = [e for e in last_times(runs) if e["stage"] not in AFTER_THE_PAGE]
    if not entries:
        return f"No stage times recorded in `{Path(runs) / STAGE_TIMES}`.\n"
    total = sum(e["seconds"] for e in entries)
    frame = pd.DataFrame(
        [[e["command"], minutes_seconds(e["seconds"]), e["seconds"], e["finished"]] for e in entries]
        + [["", "**" + minutes_seconds(total) + "**", round(total, 1), ""]],
        index=pd.Index([e["stage"] for e in entries] + ["**total**"], name="DVC stage"),
        columns=["command", "wall time", "seconds", "finished (UTC)"],
    )
    return table(frame, {"seconds": ".1f"}) + "\n"
