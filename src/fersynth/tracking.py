"""MLflow: every training and evaluation run, its metrics, confusion matrices, model and data
lineage; the Model Registry with a `champion` alias.

Tracking is on when `MLFLOW_TRACKING_URI` is set (a server `http://...`, or a local store such
as `sqlite:///runs/mlflow/mlflow.db`), and off otherwise: the stages never need MLflow. A
training run's MLflow run id is kept in its output folder (`mlflow_run.json`), so evaluation
logs its metrics into the run of the model it evaluates.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.skipped import skipped_reason

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
CHAMPION = "champion"
MODEL_PREFIX = "fersynth-"  # one registered model per profile: fersynth-<experiment>


def model_name(experiment: str) -> str:
    """The registered model of a profile's grid (`fersynth-demo`, `fersynth-fer2013`): its
    champion is compared only with models tested on the same data."""
    return f"{MODEL_PREFIX}{experiment}"


def tracking_uri() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def enabled() -> bool:
    return tracking_uri() is not None


def _check_reachable(uri: str, attempts: int = 3, timeout: float = 5.0) -> None:
    """A server that does not answer gives one clear error after bounded retries, not a hang."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    last = ""
    for attempt in range(attempts):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            if response.ok:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = exc.__class__.__name__
        time.sleep(min(2.0, 0.5 * 2**attempt))
    raise FersynthError(f"MLflow server {uri} is not reachable ({last}, {attempts} attempts)")


def _mlflow():
    import mlflow

    uri = tracking_uri()
    if uri is None:
        raise FersynthError("MLflow tracking is off: set MLFLOW_TRACKING_URI")
    # Bounded retries on every request, so an unreachable server fails in seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment = os.environ.get("FERSYNTH_EXPERIMENT", "fersynth")
    if mlflow.get_experiment_by_name(experiment) is None:
        location = os.environ.get("FERSYNTH_ARTIFACT_LOCATION")  # e.g. a local folder for sqlite
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException as exc:
            # Steps running side by side (ParallelFor, several DVC jobs) may race to create it.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(experiment)
    return mlflow


def _s3_store_problem(location: str) -> str | None:
    """Why the S3 bucket of an artifact location cannot be reached (None when it answers),
    with short timeouts: the endpoint MLflow's client uses (MLFLOW_S3_ENDPOINT_URL, else
    AWS_ENDPOINT_URL, else AWS)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = location.removeprefix("s3://").split("/", 1)[0]
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=15)
    client = boto3.client("s3", endpoint_url=endpoint, config=config)
    where = f"endpoint {endpoint}" if endpoint else "AWS"
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        return f"bucket {bucket!r} at {where}: {code}"
    except BotoCoreError as exc:
        return f"{where}: {exc.__class__.__name__}"
    return None


def check_artifact_store(before: str = "training") -> None:
    """Before a stage's work, when tracking is on: the tracking server answers (bounded retries)
    and the experiment's artifact store can be reached, so that a store that is down is found
    before hours of training, not after. Raises FersynthError, one line."""
    if not enabled():
        return
    mlflow = _mlflow()
    experiment = mlflow.get_experiment_by_name(os.environ.get("FERSYNTH_EXPERIMENT", "fersynth"))
    location = experiment.artifact_location if experiment is not None else ""
    problem = None
    if location.startswith("s3://"):
        problem = _s3_store_problem(location)
    elif location.startswith(("mlflow-artifacts:", "file:", "/")) or "://" not in location:
        # Served by the tracking server (which lists its own store) or a local folder.
        try:
            mlflow.artifacts.list_artifacts(artifact_uri=location)
        except Exception as exc:  # the server relays its store's failure as many kinds
            said = (str(exc).strip().splitlines() or [""])[0][:160]
            problem = f"{exc.__class__.__name__}: {said}"
    if problem:
        raise FersynthError(
            f"MLflow artifact store {location} is not reachable ({problem}); checked before {before}, "
            "nothing was done: start it, or fix its endpoint and credentials, then run again"
        )


def _racing(call, attempts: int = 4):
    """`call()`, again when a step beside this one (KFP's ParallelFor, parallel DVC jobs) won
    the race to create the same record: the server's get-or-create then finds it. Seen with the
    dataset of three rows trained side by side (a UNIQUE constraint on the sqlite store)."""
    import mlflow

    for attempt in range(attempts):
        try:
            return call()
        except mlflow.exceptions.MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    return None


def _git_commit(folder: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _dvc_rev(folder: Path) -> str | None:
    """The commit whose dvc.lock names the data of this working tree: the last commit that
    changed dvc.lock, or `uncommitted:<that commit>` while the working tree's dvc.lock differs
    from it (a run whose lock is not committed yet)."""
    try:
        last = subprocess.run(
            ["git", "-C", str(folder), "log", "-1", "--format=%H", "--", "dvc.lock"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if last.returncode != 0 or not last.stdout.strip():
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "diff", "--quiet", "HEAD", "--", "dvc.lock"], timeout=10
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    commit = last.stdout.strip()
    return f"uncommitted:{commit}" if dirty else commit


def lineage_tags(profile: str | None = None) -> dict[str, str]:
    """The code's git commit (FERSYNTH_GIT_COMMIT in images), the DVC revision whose dvc.lock
    names the data (FERSYNTH_DVC_REV on KFP: the pipeline's data_rev), the KFP run id and the
    profile (experiment name)."""
    tags: dict[str, str] = {}
    code = os.environ.get("FERSYNTH_GIT_COMMIT") or _git_commit(Path(__file__).resolve().parent)
    if code:
        tags["git_commit"] = code
    project = os.environ.get("FERSYNTH_DVC_REV") or _dvc_rev(Path.cwd())
    if project:
        tags["dvc_rev"] = project
    if profile:
        tags["profile"] = profile
    for env, tag in (("KFP_RUN_ID", "kfp_run_id"), ("FERSYNTH_PIPELINE_RUN", "pipeline_run")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _flatten(tree: dict[str, Any]) -> dict[str, str]:
    """MLflow params: dotted keys, values as text within MLflow's length limit."""
    from fersynth.settings import flatten

    return {key: str(value)[:6000] for key, value in flatten(tree).items()}


def model_requirements() -> list[str]:
    """What serving a logged model needs: it is saved as an exported program (pt2), which torch
    alone loads. Naming them spares MLflow's requirement inference, a subprocess that imports
    the model's code (12 of 16 s per model on two cores)."""
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"numpy=={version('numpy')}"]


def log_training(
    output: Path,
    run_name: str,
    settings: dict[str, Any],
    summary: dict[str, Any],
    data: Path,
    tags: dict[str, str] | None = None,
) -> str:
    """Log a finished training run (settings, validation metrics, model, data lineage);
    returns the MLflow run id, also written to `output/mlflow_run.json`."""
    import mlflow.data
    import mlflow.pytorch
    import pandas as pd

    from fersynth.train.models import MODEL_FILE, load_model

    mlflow = _mlflow()
    loaded = load_model(output / MODEL_FILE)
    example = np.zeros((1, 3, loaded.spec.image_size, loaded.spec.image_size), np.float32)
    manifest = pd.read_csv(Path(data) / "manifest.csv", dtype=str, keep_default_na=False)
    profile = (settings.get("experiment") or {}).get("name")
    with mlflow.start_run(run_name=run_name, tags={**lineage_tags(profile), **(tags or {})}) as run:
        mlflow.log_params(_flatten({k: settings[k] for k in ("seed", "train") if k in settings}))
        # The rates the run really used (MEK may scale train.lr by batch/512): effective.lr, ...
        mlflow.log_params(_flatten({"effective": summary.get("effective_lr") or {}}))
        mlflow.log_dict(settings, "settings.json")  # every resolved setting of the run
        best = summary.get("best_metrics") or {}
        metrics = {"val_accuracy": best.get("accuracy"), "val_mean_accuracy": best.get("mean_accuracy")}
        metrics["train_images_per_s"] = summary.get("images_per_second")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        dataset = mlflow.data.from_pandas(manifest, source=str(data), name=Path(data).name)
        _racing(lambda: mlflow.log_input(dataset, context="training"))
        logged = mlflow.pytorch.log_model(
            loaded.model.eval(),
            name="model",
            input_example=example,
            extra_files=[str(output / MODEL_FILE)],
            pip_requirements=model_requirements(),
        )
        run_id = run.info.run_id
    # MLflow 3 keeps a logged model as its own entity (models:/m-...), which is what to register.
    record = {"run_id": run_id, "model_uri": logged.model_uri, "tracking_uri": tracking_uri()}
    atomic_write_text(output / RUN_FILE, json.dumps(record) + "\n")
    return run_id


def _run_record(model_folder: Path) -> dict[str, str] | None:
    path = Path(model_folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_id_of(model_folder: Path) -> str | None:
    record = _run_record(model_folder)
    return record["run_id"] if record else None


def log_evaluation(model_folder: Path, test_set: str, metrics: dict[str, Any], files: list[Path]) -> None:
    """Metrics of one test set (prefixed by its name) and its confusion matrix (figure and JSON)
    into the model's training run."""
    run_id = run_id_of(model_folder)
    if run_id is None:
        log.warning("%s has no MLflow run (trained with tracking off): evaluation not logged", model_folder)
        return
    mlflow = _mlflow()
    prefix = test_set.replace("/", "_")
    values = {f"{prefix}.accuracy": metrics["accuracy"], f"{prefix}.mean_accuracy": metrics["mean_accuracy"]}
    values.update({f"{prefix}.accuracy.{k}": v for k, v in metrics["per_class_accuracy"].items()})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: float(v) for k, v in values.items()})
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=f"evaluation/{prefix}")


def track_training(result, settings, row: str | None = None, seed: int | None = None) -> str | None:
    """Log a finished `run_train` (its `TrainResult`, the resolved `Settings`) when tracking is
    on, named and tagged by its grid row; the MLflow run id, or None with tracking off or a
    skipped run."""
    if not enabled() or result.skipped:
        return None
    from fersynth.settings import resolved_dict, row_label

    summary = json.loads((result.output / "train_summary.json").read_text())
    tags = {}
    name = result.output.name
    if row is not None and row in settings.experiment.voters:
        name, tags = row, {"voter": row}
    elif row is not None:
        name = row_label(row, settings.experiment.grid.rows().get(row))
        tags = {"grid_row": row, "grid_label": name}
    # MEK: the counts its class weights came from (original, own or pinned) and where they were read.
    for key in ("class_weights_from", "class_weight_counts_source"):
        if summary.get(f"mek_{key}"):
            tags[f"mek.{key}"] = str(summary[f"mek_{key}"])
    if seed is not None:
        tags["seed"] = str(seed)
        if row is not None and len(settings.seeds) > 1 and row not in settings.experiment.voters:
            name = f"{name} seed {seed}"
    return log_training(
        result.output,
        name,
        resolved_dict(settings),
        {**summary, "images_per_second": result.images_per_second, "best_metrics": result.best_metrics},
        settings.train.data,
        tags,
    )


def ranking_metric(settings) -> str:
    """The key `register` ranks by, whichever orchestrator ran: `<in-domain test set>.mean_accuracy`."""
    return f"{settings.experiment.in_domain}.mean_accuracy"


def track_evaluation(model: Path, result) -> None:
    """Log one test set's `TestSetResult` into the training run of `model` when tracking is on."""
    if not enabled():
        return
    model_folder = Path(model) if Path(model).is_dir() else Path(model).parent
    files = sorted(p for p in result.folder.iterdir() if p.suffix in (".json", ".png", ".csv"))
    log_evaluation(
        model_folder, result.name, result.metrics, [f for f in files if f.name != "predictions.csv"]
    )


def log_report(folder: Path, profile: str | None = None) -> str:
    """The run report as an MLflow run of its own (its Markdown and pictures as artifacts, the
    per-class changes as metrics); the run id is written to `folder/mlflow_run.json`."""
    mlflow = _mlflow()
    summary = json.loads((Path(folder) / "report.json").read_text())
    # What the synthetic data bought (`change.`) and what the generator added over its copy
    # twins (`generator_added.`), per class: mean accuracy points over the seeds.
    metrics = {
        f"{prefix}.{_metric_key(label)}.{column}": value
        for prefix, key in (("change", "changes"), ("generator_added", "generator_changes"))
        for label, row in (summary.get(key) or {}).items()
        for column, value in row.items()
        if value is not None and value == value  # NaN: the class has no test image
    }
    with mlflow.start_run(
        run_name="report", tags={**lineage_tags(profile), "fersynth.kind": "report"}
    ) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder), artifact_path="report")
        run_id = run.info.run_id
    atomic_write_text(
        Path(folder) / RUN_FILE, json.dumps({"run_id": run_id, "tracking_uri": tracking_uri()}) + "\n"
    )
    return run_id


def _metric_key(label: str) -> str:
    """`Expanded_SL - Original_SL (guarded)` -> `Expanded_SL-Original_SL.guarded` (MLflow's key charset)."""
    return label.replace(" - ", "-").replace(" (", ".").replace(")", "").replace(" ", "_")


def log_pipeline_failure(record: dict[str, Any]) -> str:
    """A failed pipeline as an MLflow run beside the successful ones (tagged with its state);
    the run id."""
    mlflow = _mlflow()
    tags = {**lineage_tags(), "fersynth.kind": "pipeline-status", "state": str(record.get("state"))}
    with mlflow.start_run(run_name="pipeline failed", tags=tags) as run:
        mlflow.log_dict(dict(record), "status.json")
        return run.info.run_id


def _seed_folders(folder: Path, seeds: list[int] | None = None) -> list[Path]:
    """A grid row's model folder per seed (`seed_<s>/`: those of `seeds` when given, so a
    stale folder never counts), or the folder itself (one model)."""
    from fersynth.settings import SEED_PREFIX, seed_folder

    found = sorted(Path(folder).glob(f"{SEED_PREFIX}*/"), key=lambda p: (len(p.name), p.name))
    if found and seeds is not None:
        return [Path(folder) / seed_folder(seed) for seed in seeds]
    return found or [Path(folder)]


def register(
    model_folders: dict[str, Path], metric: str, name: str, seeds: list[int] | None = None
) -> dict[str, Any]:
    """Register the best of the runs by `metric` (e.g. `test.mean_accuracy`); move the alias
    `champion` to it only when it beats the current champion's value of that metric.

    A grid row trained with several seeds (`seed_<s>/` folders) is ranked by its mean over the
    seeds, and the seed model with the best validation mean accuracy stands for it (choosing
    the seed by the test metric would select on the test set)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    scored = []
    for label, row_folder in model_folders.items():
        reason = skipped_reason(row_folder)
        folders = _seed_folders(row_folder, seeds)
        if reason is not None or any(skipped_reason(f) is not None for f in folders):
            log.info("register: %s passed over (skipped: %s)", label, reason or skipped_reason(folders[0]))
            continue
        runs = []
        for folder in folders:
            if not folder.is_dir():
                raise FersynthError(
                    f"{folder}: no model for this seed of experiment.grid.seeds (train it first)"
                )
            run_id = run_id_of(folder)
            if run_id is None:
                raise FersynthError(f"{folder}: no MLflow run here (train it with MLFLOW_TRACKING_URI set)")
            metrics = client.get_run(run_id).data.metrics
            value = metrics.get(metric)
            if value is None:
                raise FersynthError(
                    f"{folder}: MLflow run {run_id} has no metric {metric!r} (evaluate it first)"
                )
            model_uri = _run_record(folder).get("model_uri") or f"runs:/{run_id}/model"
            runs.append((metrics.get("val_mean_accuracy", float("-inf")), value, run_id, model_uri))
        mean = float(np.mean([value for _, value, _, _ in runs]))
        _, _, run_id, model_uri = max(runs, key=lambda r: r[0])  # the best on validation
        scored.append((mean, label, run_id, model_uri, len(runs)))
    if not scored:
        raise FersynthError("register: every row of the grid was skipped; nothing to register")
    value, label, run_id, model_uri, seeds = max(scored)
    champion_value = None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None:
        tagged = (current.tags or {}).get(metric)  # the row's mean over seeds, when it was registered
        champion_value = float(tagged) if tagged else client.get_run(current.run_id).data.metrics.get(metric)
        if champion_value is None:
            # Runs logged under another key (another test-set name) are not comparable.
            raise FersynthError(
                f"register: the champion ({name} version {current.version}, run {current.run_id}) has no "
                f"metric {metric!r}; compare on a key both have (--metric), or move the alias by hand"
            )
    version = mlflow.register_model(model_uri, name)
    client.set_model_version_tag(name, version.version, metric, str(value))
    client.set_model_version_tag(name, version.version, "grid_row", label)
    client.set_model_version_tag(name, version.version, "seeds", str(seeds))
    promoted = current is None or value > champion_value
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "run": label,
        "metric": metric,
        "value": value,
        "seeds": seeds,
        "previous_champion_value": champion_value,
        "promoted": promoted,
    }


def download_model(uri: str) -> Path:
    """The fersynth model file inside a registered MLflow model (`models:/<name>@<alias>`)."""
    mlflow = _mlflow()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except mlflow.exceptions.MlflowException as exc:
        raise FersynthError(f"{uri}: {exc.message.splitlines()[0]}") from None
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise FersynthError(f"{uri}: the MLflow model holds no fersynth model.pt")
    return found[0]
