"""The one stage layer: every stage's entry point, called by the CLI (which DVC runs) and by the
Kubeflow components (`components/stages.py`) alike.

Each function takes resolved `Settings` (plus the paths a caller chose), owns its grid, seed,
fold and variant loops, runs the stage, tracks it to MLflow when tracking is on (so a local run
and a cluster run log the same keys and tags) and returns its result. Adapters only parse
options or unpack artifacts into `Settings` and print or record what comes back.
"""

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
from fersynth.settings import SEED_PREFIX, Settings, row_label, seed_folder

NOT_TRACKED = {"registered": False, "reason": "MLFLOW_TRACKING_URI is not set"}


def ingest(settings: Settings, *, force: bool = False, progress: bool = True):
    """`settings.ingest` into a dataset folder (fersynth.ingest). Returns the IngestReport."""
    from fersynth.ingest import run_ingest

    return run_ingest(settings.ingest, seed=settings.seed, force=force, progress=progress)


def test_set(
    settings: Settings, name: str, *, force: bool = False, progress: bool = True
) -> tuple[Path, int]:
    """One of the experiment's test sets into data/<experiment>/test_sets/<name>: the in-domain
    one is the ingested data's evaluation split; a cross-dataset one (experiment.cross_sets) is
    ingested from its own source with its own ingest options. Returns (folder, images)."""
    from fersynth.dataset import write_split_dataset
    from fersynth.ingest import run_ingest

    experiment = settings.experiment
    output = settings.layout.test_set(name)
    if name == experiment.in_domain:
        dataset = write_split_dataset(
            Path(settings.ingest.output), settings.evaluate.split, output, force=force
        )
        return output, len(dataset.manifest)
    if name not in experiment.cross_sets:
        known = ", ".join(experiment.test_sets())
        raise FersynthError(f"experiment: no test set {name!r} (test sets: {known})")
    report = run_ingest(settings.cross_set_ingest(name), seed=settings.seed, force=force, progress=progress)
    return output, report.written


def quality(settings: Settings, *, force: bool = False, progress: bool = True):
    """Quality scores and super-resolution of `settings.quality` (fersynth.quality)."""
    from fersynth.quality import run_quality

    return run_quality(settings.quality, force=force, progress=progress)


def guard(settings: Settings, *, force: bool = False, progress: bool = True):
    """Training images that copy a test image removed (`settings.guard`, fersynth.verify)."""
    from fersynth.verify import run_guard

    return run_guard(settings.guard, force=force, progress=progress)


def train_prior(settings: Settings, *, force: bool = False, progress: bool = True):
    """The offline prior of gif-prior / gif-ldm (`settings.prior`, fersynth.generate.prior)."""
    from fersynth.generate.prior import run_train_prior

    return run_train_prior(settings.prior, seed=settings.seed, force=force, progress=progress)


def generate(
    settings: Settings,
    shard: int = 0,
    num_shards: int = 1,
    *,
    only: list[str] | None = None,
    progress: bool = True,
):
    """One shard of generation (`settings.generate`, fersynth.generate; resumable). A guide
    given as a grid row's folder guides with its first seed's model, as the DVC graph does."""
    from fersynth.generate import run_generate

    guide = settings.generate.guide_model
    if guide and Path(str(guide)).is_dir():
        first = settings.first_seed_folder(Path(str(guide)))
        settings = settings.model_copy(
            update={"generate": settings.generate.model_copy(update={"guide_model": str(first)})}
        )
    return run_generate(
        settings.generate,
        shard=shard,
        num_shards=num_shards,
        seed=settings.seed,
        only=only,
        progress=progress,
    )


def merge(settings: Settings, num_shards: int = 1, *, force: bool = False, progress: bool = True):
    """Join the generation shards under `settings.generate.output` into one synthetic dataset."""
    from fersynth.generate import run_merge

    return run_merge(
        settings.generate, num_shards=num_shards, seed=settings.seed, force=force, progress=progress
    )


def verify(settings: Settings, *, force: bool = False, progress: bool = True):
    """The vote (`settings.verify`, with the leakage check of `settings.guard`). A voter given
    as a grid row's or a voter's folder votes with its first seed's model."""
    from fersynth.verify import run_verify

    verify_settings = settings.verify
    if verify_settings.voters is not None:
        voters = [str(settings.first_seed_folder(Path(voter))) for voter in verify_settings.voters]
        verify_settings = verify_settings.model_copy(update={"voters": voters})
    return run_verify(verify_settings, settings.guard, seed=settings.seed, force=force, progress=progress)


def augment(settings: Settings, *, force: bool = False, progress: bool = True):
    """One training set of Algorithm 4 (`settings.augment`, fersynth.augment)."""
    from fersynth.augment import run_augment

    return run_augment(settings.augment, seed=settings.seed, force=force, progress=progress)


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
        if result.settings is not None:  # MLflow gets the settings as run (device values resolved)
            seeded = seeded.model_copy(update={"train": result.settings})
        run_id = None if result.skipped else _log_training(result, seeded, row, seed)
        outcomes.append((result, run_id))
    return outcomes


def train_voters(settings: Settings, *, resume: bool = False, force: bool = False, progress: bool = True):
    """Every experiment voter (experiment.voters) on `settings.train.data`, each into its own
    folder, once per fold (`run_seeds`). Returns [(voter key, TrainResult)]."""
    settings.layout.voters().mkdir(parents=True, exist_ok=True)  # the stage's output, even with no voter
    outcomes = []
    for key in settings.experiment.voters:
        for result, _ in train(
            row_settings(settings, key), key, resume=resume, force=force, progress=progress
        ):
            outcomes.append((key, result))
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


def model_results_folder(settings: Settings, model: Path) -> Path:
    """Where `evaluate --model` writes when no output is given: beside the grid rows' results,
    named by the model's folder (a row's seed model, `.../original_sl/seed_2048`, by row and
    seed), so another model's results never replace a grid row's."""
    given = Path(model).parent if Path(model).suffix else Path(model)
    name = f"{given.parent.name}_{given.name}" if given.name.startswith(SEED_PREFIX) else given.name
    return settings.layout.evaluation(f"model_{name}")


def compare_grid(
    settings: Settings, test_set: str | None = None, output: Path | None = None
) -> list[tuple[str, str, Path, Path]]:
    """The grid's comparison tables (`compare`), one per test set of the experiment (or only
    `test_set`), into runs/<experiment>/compare/<test set> (or `output`, for one table); each
    row's exact grid seeds, so a stale seed folder never counts."""
    named = list(grid_folders(settings, settings.layout.evaluation).items())
    test_sets = [test_set] if test_set else settings.experiment.test_sets()
    if output is not None and len(test_sets) > 1:
        raise FersynthError(f"--output holds one table: add --test-set (one of {', '.join(test_sets)})")
    return compare(
        named, test_sets, lambda shown: output or settings.layout.comparison(shown), settings.seeds
    )


def compare_results(
    settings: Settings, named: list[tuple[str, Path]], test_set: str | None = None, output: Path | None = None
) -> list[tuple[str, str, Path, Path]]:
    """A comparison of the user's own results folders (`compare`): on `test_set`, else the
    in-domain set when the first folder has it, else the first test set the results hold;
    into runs/compare/<test set> (or `output`)."""
    in_domain = settings.experiment.in_domain
    first = Path(named[0][1])
    has_in_domain = (first / in_domain).is_dir() or any(first.glob(f"{SEED_PREFIX}*/{in_domain}"))
    test_sets: list[str | None] = [test_set or in_domain] if test_set or has_in_domain else [None]
    return compare(named, test_sets, lambda shown: output or Path("runs") / "compare" / shown)


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
