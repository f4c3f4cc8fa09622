"""One KFP v2 component per stage: unpack the artifacts into settings, call the stage layer
(`fersynth.stages`, the functions the CLI calls), record what it returns as artifact metadata.

These are the bodies of containerized Python components: `components/__init__.py` turns
them into components on our own image (CPU or CUDA), and KFP copies each function's source
into its container, so every import is inside the function. KFP-only helpers live in
`components.artifacts`, installed in the images with the package. No stage logic lives here.
"""

# No `from __future__ import annotations`: KFP reads these annotations at runtime.

from kfp.dsl import (
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
    PipelineTaskFinalStatus,
)


def resolve_settings(
    profile: str,
    data_rev: str,
    seed: int,
    source: str,
    train_arch: str,
    train_image_size: int,
    train_steps: int,
    train_batch_size: int,
    rho: float,
    min_votes: int,
    extra: list[str],
    settings: Output[Artifact],
):
    """The profile the pipeline was compiled from (JSON, every setting) with the pipeline's
    parameters as KEY=VALUE overrides, checked here once (a bad value fails the run at its
    first step) and saved as the artifact every step reads."""
    import json

    from components.artifacts import resolve_overrides

    resolve_overrides(
        {
            "kfp.data_rev": data_rev,
            "seed": seed,
            "ingest.source": source,
            "train.arch": train_arch,
            "train.image_size": train_image_size,
            "train.steps": train_steps,
            "train.batch_size": train_batch_size,
            "augment.rho": rho,
            "verify.min_votes": min_votes,
        },
        extra,
        settings.path,
        json.loads(profile),
    )


def resolve_data_rev(repo_url: str, rev: str) -> str:
    """The commit `rev` names in the data repository now; runs uncached (see the pipeline)."""
    from components.artifacts import resolve_revision

    return resolve_revision(repo_url, rev)


def fetch_data(repo_url: str, path: str, rev: str, data: Output[Dataset]):
    """`dvc get` of `path` from the DVC project at `repo_url`, git revision `rev`."""
    from components.artifacts import fetch_data as step

    step(repo_url, path, rev, data.path)
    data.metadata.update({"repo_url": repo_url, "path": path, "rev": rev})


def ingest(raw: Input[Dataset], settings: Input[Artifact], dataset: Output[Dataset]):
    from components.artifacts import settings_from
    from fersynth import stages

    resolved = settings_from(settings.path, ingest__input=raw.path, ingest__output=dataset.path)
    report = stages.ingest(resolved, force=True, progress=False)
    dataset.metadata.update({"written": report.written, "rejected": report.rejected})


def quality(data: Input[Dataset], settings: Input[Artifact], dataset: Output[Dataset]):
    from components.artifacts import settings_from
    from fersynth import stages

    resolved = settings_from(settings.path, quality__data=data.path, quality__output=dataset.path)
    result = stages.quality(resolved, force=True, progress=False)
    dataset.metadata.update({"threshold": result.threshold, "problems": len(result.problems)})


def guard(
    data: Input[Dataset], test_sets: Input[Dataset], settings: Input[Artifact], dataset: Output[Dataset]
):
    """Training images that copy an in-domain or a cross-dataset test image are removed."""
    from components.artifacts import cross_set_folders, settings_from
    from fersynth import stages

    cross = cross_set_folders(settings_from(settings.path), test_sets.path)
    resolved = settings_from(
        settings.path, guard__data=data.path, guard__output=dataset.path, guard__test_sets=cross
    )
    result = stages.guard(resolved, force=True, progress=False)
    dataset.metadata.update({"kept": len(result.manifest), "removed": len(result.leaks)})


def train(
    data: Input[Dataset],
    row: str,
    settings: Input[Artifact],
    pipeline_run: str,
    model: Output[Model],
):
    """One row of the grid, a JSON object: key, label, and variant (a sub-folder of `data` for
    the augmented sets, or empty). ParallelFor hands each row over as a string; the row's
    method and sampler come from the settings. A row on synthetic data with no training images
    is recorded as skipped."""
    import json
    import os
    from pathlib import Path

    from components.artifacts import mark_grid_row, settings_from
    from fersynth import stages

    spec = json.loads(row)
    resolved = settings_from(settings.path)
    os.environ["KFP_RUN_ID"] = pipeline_run
    os.environ["FERSYNTH_DVC_REV"] = resolved.kfp.data_rev
    folder = Path(data.path) / spec["variant"] if spec["variant"] else Path(data.path)
    outcomes = stages.train(
        stages.row_settings(resolved, spec["key"], folder, model.path),
        spec["key"],
        force=True,
        progress=False,
    )
    result, run_id = outcomes[0]
    if result.skipped:
        print(f"{spec['key']} skipped: {result.skipped}")
        outcome = {"skipped": result.skipped}
    else:
        outcome = {
            "best_step": result.best_step,
            "images_per_second": result.images_per_second,
            "mlflow_run": run_id,
            "seeds": len(outcomes),
        }
    mark_grid_row(model.path, spec["label"])
    model.metadata.update({"grid_row": spec["label"], **outcome})


def evaluate(
    model: Input[Model],
    in_domain: Input[Dataset],
    test_sets: Input[Dataset],
    row: str,
    settings: Input[Artifact],
    pipeline_run: str,
    results: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    """Every seed's model of a row (a voter's or a plain model: the folder itself) on every
    test set, into one folder for compare; the first seed's per-class metrics and confusion
    matrix in the KFP UI."""
    import json
    import os
    from pathlib import Path

    from components.artifacts import linked, mark_grid_row, settings_from, test_set_folders
    from fersynth import stages
    from fersynth.classes import CLASSES
    from fersynth.settings import seed_folder

    name = json.loads(row)["label"]
    os.environ["KFP_RUN_ID"] = pipeline_run
    resolved = settings_from(settings.path)
    folders = test_set_folders(resolved, in_domain.path, test_sets.path)
    with linked(folders) as named:  # test sets under their names: the result folders' names
        resolved = settings_from(
            settings.path, evaluate__data=[str(named / test_set) for test_set in folders]
        )
        seeds = [seed for seed in resolved.seeds if (Path(model.path) / seed_folder(seed)).is_dir()]
        evaluated = stages.evaluate_seeds(
            resolved, Path(model.path), Path(results.path), seeds, progress=False
        )
    first = evaluated[0][1]  # the first seed's results; [] for a skipped row
    mark_grid_row(results.path, name)
    results.metadata["grid_row"] = name
    for result in first:
        for key in ("accuracy", "mean_accuracy"):
            metrics.log_metric(f"{result.name}.{key}", result.metrics[key])
        for cls, value in result.metrics["per_class_accuracy"].items():
            if value is not None:
                metrics.log_metric(f"{result.name}.accuracy.{cls}", value)
        if result.name == resolved.experiment.in_domain:
            confusion.log_confusion_matrix(list(CLASSES), result.metrics["confusion"])


def train_prior(data: Input[Dataset], settings: Input[Artifact], prior: Output[Model]):
    from components.artifacts import settings_from
    from fersynth import stages

    stages.train_prior(
        settings_from(settings.path, prior__data=data.path, prior__output=prior.path),
        force=True,
        progress=False,
    )


def shard_indices(num_shards: int) -> list[int]:
    """0 .. num_shards - 1, for the ParallelFor over generation shards."""
    return list(range(num_shards))


def select_model(models: Input[list[Model]], grid_row: str, model: Output[Model]):
    """The model of one grid row out of a Collected list (the generation guide)."""
    import shutil

    from components.artifacts import by_grid_row

    rows = by_grid_row(m.path for m in models)
    if grid_row not in rows:
        raise ValueError(f"no trained model for grid row {grid_row!r} (have {sorted(rows)})")
    shutil.copytree(rows[grid_row], model.path)
    model.metadata["grid_row"] = grid_row


def generate(
    data: Input[Dataset],
    prior: Input[Model],
    guide: Input[Model],
    shard: int,
    num_shards: int,
    settings: Input[Artifact],
    generated: Output[Dataset],
):
    """One generation shard into its own artifact (`merge` joins them); the guide is a grid
    row's artifact, and its first seed's model guides, as in a local run."""
    from components.artifacts import settings_from
    from fersynth import stages

    resolved = settings_from(
        settings.path,
        generate__data=data.path,
        generate__prior=prior.path,
        generate__guide_model=guide.path,
        generate__output=generated.path,
    )
    result = stages.generate(resolved, shard, num_shards, progress=False)
    generated.metadata.update({"seeds": result.seeds, "written": result.written})


def merge(
    data: Input[Dataset],
    shards: Input[list[Dataset]],
    num_shards: int,
    settings: Input[Artifact],
    dataset: Output[Dataset],
):
    """The shard artifacts joined into one synthetic dataset."""
    import shutil
    from pathlib import Path

    from components.artifacts import linked, settings_from
    from fersynth import stages
    from fersynth.errors import FersynthError

    links = {}  # every shard folder of every shard artifact, side by side as run_merge expects
    for artifact in shards:
        for folder in sorted((Path(artifact.path) / "shards").iterdir()):
            if f"shards/{folder.name}" in links:
                raise FersynthError(f"merge: {folder.name} comes from two shard artifacts")
            links[f"shards/{folder.name}"] = folder
    with linked(links) as work:
        resolved = settings_from(settings.path, generate__data=data.path, generate__output=str(work))
        result = stages.merge(resolved, num_shards, force=True, progress=False)
        shutil.move(str(result.output), dataset.path)
    dataset.metadata["images"] = result.images


def verify(
    generated: Input[Dataset],
    reference: Input[Dataset],
    voters: Input[list[Model]],
    original_models: Input[list[Model]],
    voter_rows: list[str],
    test_sets: Input[Dataset],
    settings: Input[Artifact],
    dataset: Output[Dataset],
):
    """The vote of the profile's voters (`voter_rows`: experiment voters or rows on the original
    data, out of both lists)."""
    from components.artifacts import by_grid_row, cross_set_folders, settings_from
    from fersynth import stages

    # The order of a Collected list is not fixed: models are found by their label.
    models = by_grid_row([voter.path for voter in voters] + [model.path for model in original_models])
    cross = cross_set_folders(settings_from(settings.path), test_sets.path)
    resolved = settings_from(
        settings.path,
        verify__data=generated.path,
        verify__reference=reference.path,
        verify__voters=[models[row] for row in voter_rows],  # each row's first seed votes
        verify__output=dataset.path,
        guard__test_sets=cross,
    )
    result = stages.verify(resolved, force=True, progress=False)
    accepted = int(result.manifest["v_accepted"].astype(str).str.lower().eq("true").sum())
    dataset.metadata.update(
        {"verified": len(result.manifest), "accepted": accepted, "leaks": len(result.leaks)}
    )


def augment(
    original: Input[Dataset],
    synthetic: Input[Dataset],
    settings: Input[Artifact],
    datasets: Output[Dataset],
):
    """Every training set of the grid's rows on synthetic data (their copy twins' included),
    each variant's class ratio before and after in the metadata."""
    import math
    from pathlib import Path

    from components.artifacts import settings_from
    from fersynth import stages

    resolved = settings_from(
        settings.path, augment__original=original.path, augment__synthetic=synthetic.path
    )
    outcomes = stages.augment_grid(resolved, Path(datasets.path), force=True, progress=False)

    def finite(value: float):  # KFP metadata holds no infinity (an empty set's ratio)
        return value if math.isfinite(value) else None

    datasets.metadata["ratios"] = {
        f"{variant}{'' if pool == 'generated' else ' (copies)'}": {
            "before": finite(result.ratio_before),
            "after": finite(result.ratio_after),
        }
        for variant, pool, result in outcomes
    }


def compare(
    original_results: Input[list[Artifact]],
    synthetic_results: Input[list[Artifact]],
    settings: Input[Artifact],
    comparisons: Output[Artifact],
    table: Output[Markdown],
):
    from pathlib import Path

    from components.artifacts import by_grid_row, settings_from
    from fersynth import stages

    runs = by_grid_row(result.path for result in [*original_results, *synthetic_results])
    named = [(name, Path(folder)) for name, folder in runs.items()]
    test_sets = settings_from(settings.path).experiment.test_sets()
    tables = stages.compare(named, test_sets, lambda test_set: Path(comparisons.path) / test_set)
    Path(table.path).write_text("\n".join(markdown for _, markdown, _, _ in tables))


def report(
    comparisons: Input[Artifact],
    original_results: Input[list[Artifact]],
    synthetic_results: Input[list[Artifact]],
    quality_data: Input[Dataset],
    verified: Input[Dataset],
    augmented: Input[Dataset],
    generated: Input[Dataset],
    settings: Input[Artifact],
    pipeline_run: str,
    folder: Output[Artifact],
    page: Output[Markdown],
):
    """The run report; the KFP UI shows its Markdown, with a link to its MLflow run."""
    import json
    import os
    from pathlib import Path

    from components.artifacts import by_grid_row, linked, settings_from
    from fersynth import stages
    from fersynth.report import REPORT_MD

    os.environ["KFP_RUN_ID"] = pipeline_run
    resolved = settings_from(settings.path)
    evaluations = by_grid_row(result.path for result in [*original_results, *synthetic_results])
    keys = resolved.report.row_keys or {}  # the report finds results by row key
    variants = resolved.experiment.grid.variants()
    with linked({keys.get(name, name.lower()): path for name, path in evaluations.items()}) as by_key:
        resolved = settings_from(
            settings.path,
            report__output=folder.path,
            report__comparisons=[
                str(Path(comparisons.path) / name) for name in resolved.experiment.test_sets()
            ],
            report__evaluations=str(by_key),
            report__results_page=str(Path(folder.path) / "results.md"),
            report__quality=quality_data.path,
            report__verify=verified.path,
            report__augment=str(Path(augmented.path) / (variants[0] if variants else "rho")),
            report__generated=generated.path,
        )
        result = stages.report(resolved, force=True)
    text = (result.output / REPORT_MD).read_text()
    run_file = Path(folder.path) / "mlflow_run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        text = f"MLflow run: {run['tracking_uri']}/#/runs/{run['run_id']}\n\n" + text
    Path(page.path).write_text(text)


def register(
    original_models: Input[list[Model]],
    synthetic_models: Input[list[Model]],
    metric: str,
    settings: Input[Artifact],
    outcome: Output[Artifact],
):
    from pathlib import Path

    from components.artifacts import by_grid_row, settings_from
    from fersynth import stages

    models = {
        row: Path(path)
        for row, path in by_grid_row(m.path for m in [*original_models, *synthetic_models]).items()
    }
    registered = stages.register(settings_from(settings.path), models, metric or None, Path(outcome.path))
    outcome.metadata.update({k: str(v) for k, v in registered.items()})


def record_status(status: PipelineTaskFinalStatus, pipeline_run: str):
    """The exit handler: runs whether the pipeline succeeded or failed."""
    import os
    import tempfile

    from components.artifacts import record_status as step

    os.environ["KFP_RUN_ID"] = pipeline_run
    record = {
        "state": status.state,
        "pipeline_job": status.pipeline_job_resource_name,
        "pipeline_task": status.pipeline_task_name,
        "error": {"message": status.error_message} if status.error_message else None,
    }
    print(step(record, os.path.join(tempfile.mkdtemp(), "status.json")))
