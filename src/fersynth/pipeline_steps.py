"""What each Kubeflow Pipelines component does, as plain functions the components call.

A step takes artifact folders in and writes one artifact folder out; its settings are the
profile the pipeline was compiled from (resolved, every key) plus the pipeline's `KEY=VALUE`
overrides, exactly as `fersynth --params <profile> -S KEY=VALUE` resolves them. Components
(`components/`) only unpack KFP artifacts and call these, so every step runs and is tested
without KFP.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fersynth import tracking
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.settings import (
    Settings,
    load_settings,
    save_resolved,
    seed_folder,
    settings_from_mapping,
)

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


def _linked(links: Mapping[str, str | Path]) -> Path:
    """A scratch folder with one symbolic link per name (artifact folders under stable names)."""
    folder = Path(tempfile.mkdtemp(prefix="fersynth-links-"))
    for name, target in links.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(Path(target).resolve(), target_is_directory=Path(target).is_dir())
    return folder


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


def ingest(raw: str, output: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    from fersynth.ingest import run_ingest

    settings = settings_from(overrides, ingest__input=raw, ingest__output=output)
    report = run_ingest(settings.ingest, seed=settings.seed, force=True, progress=False)
    return {"written": report.written, "rejected": report.rejected}


def quality(data: str, output: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    from fersynth.quality import run_quality

    settings = settings_from(overrides, quality__data=data, quality__output=output)
    result = run_quality(settings.quality, force=True, progress=False)
    return {"threshold": result.threshold, "problems": len(result.problems)}


def guard(data: str, test_sets: list[str], output: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    from fersynth.verify import run_guard

    settings = settings_from(overrides, guard__data=data, guard__output=output, guard__test_sets=test_sets)
    result = run_guard(settings.guard, force=True, progress=False)
    return {"kept": len(result.manifest), "removed": len(result.leaks)}


def train(data: str, output: str, row: str, overrides: Iterable[str] | str | Path = ()) -> dict[str, Any]:
    """Train one row of the experiment grid on `data` (`fersynth train --row`); a row on
    synthetic data with no training images is recorded as skipped."""
    from fersynth import stages

    settings = stages.row_settings(settings_from(overrides), row, data, output)
    outcomes = stages.train(settings, row, force=True, progress=False)
    result, run_id = outcomes[0]
    if result.skipped:
        log.warning("%s skipped: %s", row, result.skipped)
        return {"skipped": result.skipped}
    return {
        "best_step": result.best_step,
        "images_per_second": result.images_per_second,
        "mlflow_run": run_id,
        "seeds": len(outcomes),
    }


def first_seed(settings: Settings, folder: str | Path) -> Path:
    """The model (or results) of a row's first seed, as `Settings.model_folder(row)` names it."""
    return settings.first_seed_folder(Path(folder))


def evaluate(
    model: str, test_sets: Mapping[str, str], output: str, overrides: Iterable[str] | str | Path = ()
) -> list[dict[str, Any]]:
    """Evaluate on named test sets (names become the result folders and MLflow metric prefixes)."""
    from fersynth import stages

    named = _linked(test_sets)
    outcomes = []
    try:
        settings = settings_from(overrides, evaluate__data=[str(named / name) for name in test_sets])
        # A row's artifact: every seed's model, in the grid's order (the first one's results
        # are the step's metrics); a voter's or a plain model: the folder itself.
        seeds = [s for s in settings.seeds if (Path(model) / seed_folder(s)).is_dir()]
        evaluated = stages.evaluate_seeds(settings, Path(model), Path(output), seeds, progress=False)
        outcomes = [{"test_set": r.name, **r.metrics} for r in evaluated[0][1]]  # the first seed's
    finally:
        shutil.rmtree(named, ignore_errors=True)
    return outcomes


def train_prior(data: str, output: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    from fersynth.generate.prior import run_train_prior

    settings = settings_from(overrides, prior__data=data, prior__output=output)
    run_train_prior(settings.prior, seed=settings.seed, force=True, progress=False)
    return {}


def generate(
    data: str, prior: str, guide: str, output: str, shard: int, num_shards: int, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """One shard of GIF generation into `output/shards/<shard name>` (resumable)."""
    from fersynth.generate import run_generate

    settings = settings_from(
        overrides,
        generate__data=data,
        generate__prior=prior,
        generate__guide_model=guide,
        generate__output=output,
    )
    # The guide is a grid row's artifact: its first seed's model guides, as in a local run.
    settings.generate.guide_model = str(first_seed(settings, guide))
    result = run_generate(
        settings.generate, shard=shard, num_shards=num_shards, seed=settings.seed, progress=False
    )
    return {"seeds": result.seeds, "written": result.written}


def merge(data: str, shards: list[str], output: str, num_shards: int, overrides: Iterable[str] = ()) -> dict:
    """Join the shard folders (each a `generate` output) into one synthetic dataset at `output`."""
    from fersynth.generate import run_merge

    links = {}
    for shard in shards:
        for folder in sorted((Path(shard) / "shards").iterdir()):
            if folder.name in links:
                raise FersynthError(f"merge: {folder.name} comes from two shard artifacts")
            links[f"shards/{folder.name}"] = folder
    work = _linked(links)
    try:
        settings = settings_from(overrides, generate__data=data, generate__output=str(work))
        result = run_merge(
            settings.generate, num_shards=num_shards, seed=settings.seed, force=True, progress=False
        )
        shutil.move(str(result.output), output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": result.images, "per_class": result.per_class}


def verify(
    generated: str,
    reference: str,
    voters: list[str],
    test_sets: list[str],
    output: str,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    from fersynth.verify import run_verify

    base = settings_from(overrides)
    settings = settings_from(
        overrides,
        verify__data=generated,
        verify__reference=reference,
        verify__voters=[str(first_seed(base, voter)) for voter in voters],
        verify__output=output,
        guard__test_sets=test_sets,
    )
    result = run_verify(settings.verify, settings.guard, seed=settings.seed, force=True, progress=False)
    accepted = int(result.manifest["v_accepted"].astype(str).str.lower().eq("true").sum())
    return {"verified": len(result.manifest), "accepted": accepted, "leaks": len(result.leaks)}


def augment(original: str, synthetic: str, output: str, overrides: Iterable[str] = ()):
    """Every dataset the grid trains on, as `output/<variant>` (and `output/copies_<variant>`
    for copy twins): `stages.augment_grid`."""
    from fersynth import stages

    settings = settings_from(overrides, augment__original=original, augment__synthetic=synthetic)
    outcomes = stages.augment_grid(settings, Path(output), force=True, progress=False)

    def finite(value: float) -> float | None:  # KFP metadata holds no infinity (an empty set's ratio)
        return value if math.isfinite(value) else None

    return {
        f"{variant}{'' if pool == 'generated' else ' (copies)'}": {
            "before": finite(result.ratio_before),
            "after": finite(result.ratio_after),
        }
        for variant, pool, result in outcomes
    }


def compare(results: Mapping[str, str], test_sets: list[str], output: str) -> dict[str, str]:
    """One comparison table per test set, as `output/<test set>/comparison.{md,csv}`."""
    from fersynth import stages

    named = [(name, Path(folder)) for name, folder in results.items()]
    tables = stages.compare(named, list(test_sets), lambda test_set: Path(output) / test_set)
    return {test_set: markdown for test_set, markdown, _, _ in tables}


def report(
    comparisons: str,
    test_sets: list[str],
    evaluations: Mapping[str, str],
    stages: Mapping[str, str],
    output: str,
    overrides: Iterable[str] | str | Path = (),
) -> Path:
    """The run report (`fersynth report`) from the pipeline's artifacts; logged to MLflow."""
    from fersynth import stages as entry
    from fersynth.report import REPORT_MD

    keys = settings_from(overrides).report.row_keys or {}  # results are found by row key
    evaluation_links = _linked({keys.get(name, name.lower()): folder for name, folder in evaluations.items()})
    try:
        settings = settings_from(
            overrides,
            report__output=output,
            report__comparisons=[str(Path(comparisons) / name) for name in test_sets],
            report__evaluations=str(evaluation_links),
            report__results_page=str(Path(output) / "results.md"),
            **{f"report__{key}": value for key, value in stages.items()},
        )
        result = entry.report(settings, force=True)
    finally:
        shutil.rmtree(evaluation_links, ignore_errors=True)
    return result.output / REPORT_MD


def register(
    models: Mapping[str, str], metric: str | None, output: str, overrides: Iterable[str] | str | Path = ()
) -> dict[str, Any]:
    """The grid's best model into the MLflow registry (`fersynth register`); with tracking off,
    a record that nothing was registered."""
    from fersynth import stages

    folders = {k: Path(v) for k, v in models.items()}
    return stages.register(settings_from(overrides), folders, metric or None, Path(output))


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
