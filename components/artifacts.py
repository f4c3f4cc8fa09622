"""What only the Kubeflow components need around the stage layer (`fersynth.stages`):
the settings artifact, grid-row labels on artifact folders (Collected lists come back
unordered), test-set folders inside a fetched artifact, artifact folders under stable names,
the data revision and `dvc get`, and the exit handler's record.

The components run this module inside our images (pyproject installs `components` beside
`fersynth`); it is plain Python (importing it imports the `components` package, hence kfp,
a core dependency) and is tested without running KFP.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fersynth import tracking
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.settings import Settings, load_settings, save_resolved, settings_from_mapping

log = logging.getLogger(__name__)

SETTINGS_JSON = "settings.json"  # the pipeline's settings artifact: every resolved setting
GRID_ROW_FILE = "grid_row.txt"  # in each model and results artifact: its row of the grid


def mark_grid_row(folder: str | Path, label: str) -> None:
    """Label an artifact folder with its grid row (Collected lists come back unordered)."""
    atomic_write_text(Path(folder) / GRID_ROW_FILE, label + "\n")


def by_grid_row(folders: Iterable[str | Path]) -> dict[str, str]:
    """{grid row: folder} for artifact folders `mark_grid_row` labelled."""
    rows: dict[str, str] = {}
    for folder in folders:
        label_file = Path(folder) / GRID_ROW_FILE
        if not label_file.is_file():
            raise FersynthError(f"{folder}: no {GRID_ROW_FILE} (not a grid row's artifact)")
        rows[label_file.read_text().strip()] = str(folder)
    return rows


def settings_from(overrides: Iterable[str] | str | Path = (), **values: Any) -> Settings:
    """The settings a step runs with: the settings folder `resolve_overrides` wrote (or the
    package defaults plus `overrides`, KEY=VALUE pairs), then `values` (dotted key with `__`
    for `.`: `train__steps=10`)."""
    pairs = [
        f"{key.replace('__', '.')}={json.dumps(str(v) if isinstance(v, Path) else v)}"
        for key, v in values.items()
    ]
    if isinstance(overrides, str | Path):  # the folder `resolve_overrides` wrote
        return load_settings(Path(overrides) / SETTINGS_JSON, pairs)
    return load_settings(None, list(overrides) + pairs)


def resolve_overrides(
    values: Mapping[str, Any],
    extra: Iterable[str],
    output: str | Path,
    profile: Mapping[str, Any] | None = None,
) -> Settings:
    """The profile (a resolved settings dict; None: the package defaults) with KEY=VALUE
    overrides from named values and `extra` pairs, validated once and written to `output` (a
    folder) as settings.json, which every step reads."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()] + list(extra)
    settings = settings_from_mapping(dict(profile or {}), overrides, "the pipeline's profile")
    save_resolved(settings, Path(output), SETTINGS_JSON)
    return settings


def test_set_folders(settings: Settings, in_domain: str | Path, test_sets: str | Path) -> dict[str, str]:
    """{test set name: dataset folder}: the in-domain one, then each cross-dataset set of the
    experiment from the fetched `data/<experiment>/test_sets` folder."""
    folders = {settings.experiment.in_domain: str(in_domain)}
    for name in settings.experiment.cross_sets:
        folder = Path(test_sets) / name
        if not folder.is_dir():
            raise FersynthError(f"{test_sets}: no test set {name!r} (is kfp.test_sets_path right?)")
        folders[name] = str(folder)
    return folders


def cross_set_folders(settings: Settings, test_sets: str | Path) -> list[str]:
    """The experiment's cross-dataset test set folders in the fetched test-sets folder (what
    guard and verify check for copies besides the data's own test split)."""
    return list(test_set_folders(settings, "", test_sets).values())[1:]


@contextmanager
def linked(links: Mapping[str, str | Path]) -> Iterator[Path]:
    """A scratch folder with one symbolic link per name (artifact folders under the names a
    stage expects), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="fersynth-links-"))
    try:
        for name, target in links.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(Path(target).resolve(), target_is_directory=Path(target).is_dir())
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_revision(repo_url: str, rev: str) -> str:
    """The commit that `rev` (a branch, a tag, HEAD, or a full commit) names in the git
    repository at `repo_url` now (`git ls-remote`). The pipeline resolves its `data_rev` with
    this in an uncached step, so the cached steps after it (fetch, ingest, ... training) are
    keyed on the commit: new data pushed to the branch reruns them, the same commit reuses them."""
    rev = (rev or "HEAD").strip()
    if COMMIT.match(rev):
        return rev
    try:
        done = subprocess.run(
            ["git", "ls-remote", "--", repo_url, rev, f"{rev}^{{}}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FersynthError(f"git ls-remote {repo_url}: {exc.__class__.__name__}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise FersynthError(f"git ls-remote {repo_url} {rev} failed: {(lines or ['no message'])[-1]}")
    refs = dict(reversed(line.split("\t", 1)) for line in done.stdout.splitlines() if "\t" in line)
    for name in (f"refs/tags/{rev}^{{}}", f"refs/heads/{rev}", f"refs/tags/{rev}", rev):
        if name in refs:  # an annotated tag's commit (^{}) before the tag object itself
            return refs[name]
    if re.fullmatch(r"[0-9a-f]{4,39}", rev):
        raise FersynthError(
            f"kfp.data_rev = {rev!r}: a short commit cannot be resolved in {repo_url}; give all 40 characters"
        )
    raise FersynthError(f"kfp.data_rev = {rev!r}: no branch or tag of that name in {repo_url}")


def fetch_data(repo_url: str, path: str, rev: str, output: str | Path) -> Path:
    """`dvc get`: the data at `path` of the project `repo_url` at git revision `rev`, from its
    DVC remote (S3 credentials and endpoint from the environment: AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""
    dvc = Path(sys.executable).parent / "dvc"
    command = [str(dvc if dvc.exists() else "dvc"), "get", repo_url, path, "-o", str(output), "--force"]
    if rev:
        command += ["--rev", rev]
    done = subprocess.run(command, capture_output=True, text=True, timeout=6 * 3600)
    if done.returncode != 0:
        # DVC ends every failure with a support footer: its ERROR lines are the reason.
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = " ".join(line for line in lines if line.startswith("ERROR")) or (lines or ["no message"])[-1]
        raise FersynthError(f"dvc get {path} from {repo_url} at {rev or 'HEAD'} failed: {reason}")
    return Path(output)


def record_status(status: Mapping[str, Any], output: str) -> dict[str, Any]:
    """The exit handler: the pipeline's final state, kept as JSON and, when it failed and MLflow
    is on, as an MLflow run tagged with the failure so it shows beside the successful ones."""
    record = {
        "state": status.get("state"),
        "pipeline_job": status.get("pipelineJobResourceName") or status.get("pipeline_job_resource_name"),
        "pipeline_task": status.get("pipelineTaskName") or status.get("pipeline_task_name"),
        "error": (status.get("error") or {}).get("message")
        if isinstance(status.get("error"), dict)
        else None,
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output), json.dumps(record, indent=2) + "\n")
    if record["state"] not in ("SUCCEEDED", None) and tracking.enabled():
        tracking.log_pipeline_failure(record)
    log.info("pipeline finished: %s", record["state"])
    return record
