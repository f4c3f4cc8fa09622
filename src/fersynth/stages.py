"""The stage entry points both orchestrators call: the CLI (which DVC runs) and the Kubeflow
components (through `fersynth.pipeline_steps`). Each takes resolved `Settings`, runs the stage
and tracks it to MLflow when tracking is on, so a local run and a cluster run log the same
keys and tags."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fersynth import tracking
from fersynth.errors import FersynthError
from fersynth.files import atomic_write_text
from fersynth.folds import FOLD_PREFIX, fold_folder
from fersynth.settings import Settings, row_label, seed_folder

NOT_TRACKED = {"registered": False, "reason": "MLFLOW_TRACKING_URI is not set"}


def row_settings(settings: Settings, row: str, data: Path | str | None = None, output=None) -> Settings:
    """`settings` with a grid row's (or a voter's, experiment.voters) training settings: its
    method and sampler, its data (the augmented variant for a row on synthetic data, unless
    `data` is given) and its folder (a row's holds one model folder per seed)."""
    voter = settings.experiment.voters.get(row)
    if voter is not None:
        update = {
            "method": voter.method,
            "balanced_sampler": voter.sampler == "balanced",
            "arch": voter.arch or settings.train.arch,
            "data": Path(data) if data is not None else settings.train.data,
            "output": Path(output) if output is not None else settings.model_folder(row),
        }
        return settings.model_copy(update={"train": settings.train.model_copy(update=update)})
    spec = settings.row(row)
    on_synthetic = row in settings.experiment.grid.synthetic
    pool = "copies" if spec.twin_of else "generated"
    default_data = settings.layout.augmented(str(spec.variant), pool) if on_synthetic else settings.train.data
    train = settings.train.model_copy(
        update={
            "method": spec.method,
            "balanced_sampler": spec.sampler == "balanced",
            "data": Path(data) if data is not None else default_data,
            "output": Path(output) if output is not None else settings.row_folder(row),
        }
    )
    return settings.model_copy(update={"train": train})


def run_seeds(settings: Settings, row: str | None) -> list[tuple[int, Path, tuple[int, int] | None]]:
    """(seed, model folder, fold) of each training run a `train` call makes: a grid row trains
    once per seed (experiment.grid.seeds) into `<train.output>/seed_<seed>`; a voter with its own
    seed, once per fold of experiment.voter_folds into `<train.output>/fold_<f>` (without that
    fold: fersynth.folds), or once when folds are off; anything else once, with `seed`, into
    train.output. The fold is (f, folds), or None for the whole training split."""
    output = Path(settings.train.output)
    if row is not None and row in settings.experiment.voters:
        seed, folds = settings.experiment.voters[row].seed, settings.experiment.voter_folds
        if folds:
            return [(seed, output / fold_folder(f), (f, folds)) for f in range(folds)]
        return [(seed, output, None)]
    if row is not None:
        return [(seed, output / seed_folder(seed), settings.train.fold) for seed in settings.seeds]
    return [(settings.seed, output, settings.train.fold)]


def train(
    settings: Settings,
    row: str | None = None,
    *,
    resume=False,
    force=False,
    progress=True,
    skip_if_empty=False,
):
    """Train `settings.train` (a grid row's or a voter's settings when `row` is given: see
    `row_settings`), once per seed of `run_seeds`; a row on synthetic data with no training
    images is recorded as skipped, not failed. Returns [(TrainResult, MLflow run id or None)],
    one per seed."""
    from fersynth.train.loop import run_train

    on_synthetic = row is not None and row in settings.experiment.grid.synthetic
    runs = run_seeds(settings, row)
    tracking.check_artifact_store("training")  # a store that is down, found before hours of work
    if force and row in settings.experiment.voters:  # fold folders of an earlier fold count go
        kept = {folder.name for _, folder, _ in runs}
        for stale in Path(settings.train.output).glob(f"{FOLD_PREFIX}*"):
            if stale.is_dir() and stale.name not in kept:
                shutil.rmtree(stale)
    outcomes = []
    for seed, folder, fold in runs:
        seeded = settings.model_copy(
            update={"seed": seed, "train": settings.train.model_copy(update={"output": folder, "fold": fold})}
        )
        result = run_train(
            seeded.train,
            seed=seed,
            resume=resume,
            force=force,
            progress=progress,
            skip_if_empty=skip_if_empty or on_synthetic,
        )
        run_id = None if result.skipped else _log_training(result, seeded, row, seed)
        outcomes.append((result, run_id))
    return outcomes


def _log_training(result, settings: Settings, row: str | None, seed: int) -> str | None:
    """`tracking.track_training`; a failure to log keeps the trained model on disk and says how
    to log it again (the run's MLflow record is marked failed by MLflow)."""
    try:
        return tracking.track_training(result, settings, row=row, seed=seed)
    except FersynthError as exc:
        reason = str(exc)
    except Exception as exc:  # the tracking server or its store failed mid-way, in any of many ways
        reason = f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    raise FersynthError(
        f"{result.output}: trained, and kept on disk (model.pt, checkpoint.pt), but logging it to MLflow "
        f"failed ({reason}); once the tracking server and its store answer, run the same command with "
        "--resume to log it (nothing is trained again)"
    )


def evaluate(settings: Settings, *, progress: bool = True) -> list:
    """Evaluate `settings.evaluate.model` on every test set (named by folder) and log each
    test set's metrics into the model's MLflow run; [] for a skipped row."""
    tracking.check_artifact_store("evaluation")
    return _evaluate_one(settings, progress)


def _evaluate_one(settings: Settings, progress: bool) -> list:
    from fersynth.evaluate import run_evaluate

    results = run_evaluate(settings.evaluate, progress=progress)
    for result in results:
        tracking.track_evaluation(Path(settings.evaluate.model), result)
    return results


def evaluate_seeds(
    settings: Settings, models: Path, output: Path, seeds: list[int], *, progress: bool = True
) -> list[tuple[int | None, list]]:
    """Each seed's model `models/seed_<s>` on every test set of `settings.evaluate.data`, into
    `output/seed_<s>`; with no seeds, the model folder itself into `output` (a voter's, or any
    model). [(seed or None, results)]."""
    jobs = [(seed, models / seed_folder(seed), output / seed_folder(seed)) for seed in seeds]
    tracking.check_artifact_store("evaluation")  # once, not once per seed
    outcomes = []
    for seed, model, target in jobs or [(None, Path(models), Path(output))]:
        evaluate_settings = settings.evaluate.model_copy(update={"model": model, "output": target})
        results = _evaluate_one(settings.model_copy(update={"evaluate": evaluate_settings}), progress)
        outcomes.append((seed, results))
    return outcomes


def compare(
    named: list[tuple[str, Path]],
    test_sets: list[str | None],
    target: Callable[[str], Path],
    seeds: list[int] | None = None,
) -> list[tuple[str, str, Path, Path]]:
    """One comparison table per test set (None: the first the results hold) of the named
    results folders, written to `target(test set)`; `seeds`: exactly these seed folders (the
    grid's), else every one found. [(test set, markdown, .md path, .csv path)]."""
    from fersynth.compare import comparison_table, load_result, to_markdown, write_comparison

    tables = []
    for name in test_sets:
        results = [load_result(label, folder, name, seeds) for label, folder in named]
        table = comparison_table(results)
        ran = [r for r in results if r.metrics is not None]
        shown = name or (ran[0].metrics.get("test_set", "test") if ran else "test")
        title = f"Accuracy (%) on {shown}"
        markdown_path, csv_path = write_comparison(table, target(shown), title)
        tables.append((shown, to_markdown(table, title), markdown_path, csv_path))
    return tables


def evaluate_row(
    settings: Settings, row: str, models: Path | None = None, output: Path | None = None, *, progress=True
) -> list[tuple[int, list]]:
    """Evaluate every seed's model of a grid row: `models/seed_<s>` (default: the row's folder)
    into `output/seed_<s>` (default: runs/<experiment>/eval/<row>). [(seed, results)]."""
    settings.row(row)  # a clear error for an unknown row
    models = Path(models) if models is not None else settings.row_folder(row)
    in_layout = output is None  # the DVC graph's run: also the files DVC compares experiments by
    output = Path(output) if output is not None else settings.layout.evaluation(row)
    outcomes = evaluate_seeds(settings, models, output, settings.seeds, progress=progress)
    if in_layout:
        from fersynth.dvc_metrics import write_row_files

        write_row_files(settings.layout.row_metrics(row), settings.layout.row_plots(row), outcomes, models)
    return outcomes


def register(
    settings: Settings,
    folders: dict[str, Path],
    metric: str | None,
    output: Path | None,
    name: str | None = None,
) -> dict[str, Any]:
    """The grid's best model into the MLflow registry, ranked by `metric` (default: the
    in-domain mean accuracy); with tracking off, a record that nothing was registered."""
    if not tracking.enabled():
        if output is None:
            raise FersynthError("register needs MLflow: set MLFLOW_TRACKING_URI")
        outcome = dict(NOT_TRACKED)
    else:
        metric = metric or tracking.ranking_metric(settings)
        name = name or tracking.model_name(settings.experiment.name)
        outcome = {"registered": True, **tracking.register(folders, metric, name, seeds=settings.seeds)}
    if output is not None:
        atomic_write_text(Path(output), json.dumps(outcome, indent=2) + "\n")
    return outcome


def report(settings: Settings, *, force: bool = False):
    """The run report (`fersynth.report`), logged to MLflow as a run of its own."""
    from fersynth.report import run_report

    result = run_report(settings.report, force=force, experiment=settings.experiment.name)
    if tracking.enabled():
        tracking.log_report(result.output, settings.experiment.name)
    return result


def augment_grid(
    settings: Settings, output: Path | None = None, *, force: bool = False, progress: bool = True
):
    """Every training set the grid's rows on synthetic data train on (Algorithm 4): each variant
    of the generated pool, then each copy twin's variant of the seed copies, into
    `output/<variant>` and `output/copies_<variant>` (default: data/<experiment>/augmented).
    Returns [(variant, pool, AugmentResult)]."""
    from fersynth.augment import run_augment

    output = Path(output) if output is not None else settings.layout.data / "augmented"
    output.mkdir(parents=True, exist_ok=True)  # the stage's output, even with no variant
    grid = settings.experiment.grid
    jobs = [(v, "generated") for v in grid.variants()] + [(v, "copies") for v in grid.twin_variants()]
    outcomes = []
    for variant, pool in jobs:
        folder = output / settings.layout.augmented(variant, pool).name
        augment = settings.augment.model_copy(update={"variant": variant, "pool": pool, "output": folder})
        outcomes.append(
            (variant, pool, run_augment(augment, seed=settings.seed, force=force, progress=progress))
        )
    return outcomes


def grid_folders(settings: Settings, folder_of) -> dict[str, Path]:
    """{row label: folder_of(row key)} for every row of the grid, rows on the original data first."""
    return {row_label(key, row): Path(folder_of(key)) for key, row in settings.experiment.grid.rows().items()}
