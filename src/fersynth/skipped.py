"""A grid row with nothing to train on, recorded instead of stopping the run.

When the vote accepts no synthetic image, the synthetic-only row (Synthetic_MEK) has an empty
training set. That is a result of the experiment, not a fault: `fersynth train --skip-if-empty`
writes `skipped.json` (the reason) into the model folder, `evaluate` passes it on into its
results folder, `compare` shows the row as skipped with the reason under the table, the report
repeats it and `register` passes over the row. Everywhere else an empty training set stays an
error.
"""

from __future__ import annotations

import json
from pathlib import Path

from fersynth.files import atomic_write_text, staged_folder
from fersynth.settings import save_resolved

SKIPPED_JSON = "skipped.json"


def write_skipped(
    folder: Path, reason: str, settings: dict, *, force: bool = False, **details: object
) -> Path:
    """Replace `folder` with a record that its run was skipped, and why, beside the resolved
    `settings` of the stage that skipped it (both appear together or not at all)."""
    with staged_folder(Path(folder), force=force) as staging:
        record = {"skipped": True, "reason": reason, **details}
        atomic_write_text(staging / SKIPPED_JSON, json.dumps(record, indent=2) + "\n")
        save_resolved(settings, staging)
    return Path(folder)


def skipped_reason(folder: Path | str) -> str | None:
    """Why the run in `folder` (a model or evaluation folder) was skipped; None when it ran."""
    path = Path(folder) / SKIPPED_JSON
    if not path.is_file():
        return None
    return str(json.loads(path.read_text()).get("reason") or "skipped")
