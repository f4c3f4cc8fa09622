"""One KFP v2 component per stage: unpack the artifacts, call `fersynth.pipeline_steps`.

These are the bodies of containerized Python components: `components/__init__.py` turns
them into components on our own image (CPU or CUDA), and KFP copies each function's source
into its container, so every import is inside the function. No logic lives here.
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

    from fersynth.pipeline_steps import resolve_overrides

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
    from fersynth.pipeline_steps import resolve_revision

    return resolve_revision(repo_url, rev)


def fetch_data(repo_url: str, path: str, rev: str, data: Output[Dataset]):
    """`dvc get` of `path` from the DVC project at `repo_url`, git revision `rev`."""
    from fersynth.pipeline_steps import fetch_data as step

    step(repo_url, path, rev, data.path)
    data.metadata.update({"repo_url": repo_url, "path": path, "rev": rev})


def ingest(raw: Input[Dataset], settings: Input[Artifact], dataset: Output[Dataset]):
    from fersynth.pipeline_steps import ingest as step

    dataset.metadata.update(step(raw.path, dataset.path, settings.path))


def quality(data: Input[Dataset], settings: Input[Artifact], dataset: Output[Dataset]):
    from fersynth.pipeline_steps import quality as step

    dataset.metadata.update(step(data.path, dataset.path, settings.path))


def guard(
    data: Input[Dataset], test_sets: Input[Dataset], settings: Input[Artifact], dataset: Output[Dataset]
):
    """Training images that copy an in-domain or a cross-dataset test image are removed."""
    from fersynth.pipeline_steps import cross_set_folders, settings_from
    from fersynth.pipeline_steps import guard as step

    cross = cross_set_folders(settings_from(settings.path), test_sets.path)
    dataset.metadata.update(step(data.path, cross, dataset.path, settings.path))


def train(
    data: Input[Dataset],
    row: str,
    settings: Input[Artifact],
    pipeline_run: str,
    model: Output[Model],
):
    """One row of the grid, a JSON object: key, label, and variant (a sub-folder of `data` for
    the augmented sets, or empty). ParallelFor hands each row over as a string; the row's
    method and sampler come from the settings."""
    import json
    import os
    from pathlib import Path

    from fersynth.pipeline_steps import mark_grid_row, settings_from
    from fersynth.pipeline_steps import train as step

    spec = json.loads(row)
    os.environ["KFP_RUN_ID"] = pipeline_run
    os.environ["FERSYNTH_DVC_REV"] = settings_from(settings.path).kfp.data_rev
    variant = spec["variant"]
    folder = str(Path(data.path) / variant) if variant else data.path
    outcome = step(folder, model.path, spec["key"], settings.path)
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
    """Per-class metrics and the confusion matrix in the KFP UI; the folder for compare."""
    import json
    import os

    from fersynth.classes import CLASSES
    from fersynth.pipeline_steps import evaluate as step
    from fersynth.pipeline_steps import first_seed, mark_grid_row, settings_from, test_set_folders

    name = json.loads(row)["label"]
    os.environ["KFP_RUN_ID"] = pipeline_run
    resolved = settings_from(settings.path)
    in_domain_name = resolved.experiment.in_domain
    folders = test_set_folders(resolved, in_domain.path, test_sets.path)
    outcomes = step(model.path, folders, results.path, settings.path)  # [] for a skipped row
    mark_grid_row(results.path, name)
    results.metadata["grid_row"] = name
    for outcome in outcomes:
        prefix = outcome["test_set"]
        metrics.log_metric(f"{prefix}.accuracy", outcome["accuracy"])
        metrics.log_metric(f"{prefix}.mean_accuracy", outcome["mean_accuracy"])
        for cls, value in outcome["per_class_accuracy"].items():
            if value is not None:
                metrics.log_metric(f"{prefix}.accuracy.{cls}", value)
    if outcomes:  # a row with seeds: the first seed's, as its metrics above
        first_folder = first_seed(resolved, results.path)
        first = json.loads((first_folder / in_domain_name / "metrics.json").read_text())
        confusion.log_confusion_matrix(list(CLASSES), first["confusion"])


def train_prior(data: Input[Dataset], settings: Input[Artifact], prior: Output[Model]):
    from fersynth.pipeline_steps import train_prior as step

    step(data.path, prior.path, settings.path)


def shard_indices(num_shards: int) -> list[int]:
    """0 .. num_shards - 1, for the ParallelFor over generation shards."""
    return list(range(num_shards))


def select_model(models: Input[list[Model]], grid_row: str, model: Output[Model]):
    """The model of one grid row out of a Collected list (the generation guide)."""
    import shutil

    from fersynth.pipeline_steps import by_grid_row

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
    """One generation shard into its own artifact (`merge` joins them)."""
    from fersynth.pipeline_steps import generate as step

    outcome = step(data.path, prior.path, guide.path, generated.path, shard, num_shards, settings.path)
    generated.metadata.update(outcome)


def merge(
    data: Input[Dataset],
    shards: Input[list[Dataset]],
    num_shards: int,
    settings: Input[Artifact],
    dataset: Output[Dataset],
):
    from fersynth.pipeline_steps import merge as step

    outcome = step(data.path, [shard.path for shard in shards], dataset.path, num_shards, settings.path)
    dataset.metadata["images"] = outcome["images"]


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
    from fersynth.pipeline_steps import by_grid_row, cross_set_folders, settings_from
    from fersynth.pipeline_steps import verify as step

    # The order of a Collected list is not fixed: models are found by their label.
    models = by_grid_row([voter.path for voter in voters] + [model.path for model in original_models])
    voter_paths = [models[row] for row in voter_rows]
    cross = cross_set_folders(settings_from(settings.path), test_sets.path)
    dataset.metadata.update(
        step(generated.path, reference.path, voter_paths, cross, dataset.path, settings.path)
    )


def augment(
    original: Input[Dataset],
    synthetic: Input[Dataset],
    settings: Input[Artifact],
    datasets: Output[Dataset],
):
    """Every training set of the grid's rows on synthetic data (their copy twins' included)."""
    from fersynth.pipeline_steps import augment as step

    datasets.metadata["ratios"] = step(original.path, synthetic.path, datasets.path, settings.path)


def compare(
    original_results: Input[list[Artifact]],
    synthetic_results: Input[list[Artifact]],
    settings: Input[Artifact],
    comparisons: Output[Artifact],
    table: Output[Markdown],
):
    from pathlib import Path

    from fersynth.pipeline_steps import by_grid_row, settings_from
    from fersynth.pipeline_steps import compare as step

    runs = by_grid_row(result.path for result in [*original_results, *synthetic_results])
    tables = step(runs, settings_from(settings.path).experiment.test_sets(), comparisons.path)
    Path(table.path).write_text("\n".join(tables.values()))


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

    from fersynth.pipeline_steps import by_grid_row, settings_from
    from fersynth.pipeline_steps import report as step

    os.environ["KFP_RUN_ID"] = pipeline_run
    resolved = settings_from(settings.path)
    evaluations = by_grid_row(result.path for result in [*original_results, *synthetic_results])
    variants = resolved.experiment.grid.variants()
    stages = {
        "quality": quality_data.path,
        "verify": verified.path,
        "augment": str(Path(augmented.path) / (variants[0] if variants else "rho")),
        "generated": generated.path,
    }
    test_sets = resolved.experiment.test_sets()
    markdown = step(comparisons.path, test_sets, evaluations, stages, folder.path, settings.path)
    text = markdown.read_text()
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
    from fersynth.pipeline_steps import by_grid_row
    from fersynth.pipeline_steps import register as step

    models = by_grid_row(model.path for model in [*original_models, *synthetic_models])
    outcome.metadata.update({k: str(v) for k, v in step(models, metric, outcome.path, settings.path).items()})


def record_status(status: PipelineTaskFinalStatus, pipeline_run: str):
    """The exit handler: runs whether the pipeline succeeded or failed."""
    import os
    import tempfile

    from fersynth.pipeline_steps import record_status as step

    os.environ["KFP_RUN_ID"] = pipeline_run
    record = {
        "state": status.state,
        "pipeline_job": status.pipeline_job_resource_name,
        "pipeline_task": status.pipeline_task_name,
        "error": {"message": status.error_message} if status.error_message else None,
    }
    print(step(record, os.path.join(tempfile.mkdtemp(), "status.json")))
