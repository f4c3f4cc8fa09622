"""The fersynth pipeline for Kubeflow Pipelines v2: the graph of dvc.yaml, wired from components.

fetch (DVC, at a git revision) -> ingest -> quality -> guard -> the original rows of the grid
(the guide), the voters -> prior -> generate (ParallelFor over shards) -> merge (Collected) ->
verify -> augment -> the synthetic rows -> evaluate (in-domain and cross-dataset) -> compare
-> report -> register; an exit handler records how the run ended.

Everything comes from one profile (profiles/*.yaml, resolved): the grid's rows, the test sets,
and every setting, which the compiled pipeline carries as its `profile` parameter; the typed
parameters below are overrides of it. DVC's dvc.yaml reads the same profile, so the local run
and the cluster run train the same rows with the same settings.
"""

import json
from pathlib import Path

from kfp import dsl

import components
from fersynth.errors import FersynthError
from fersynth.settings import Settings, load_settings, resolved_dict, row_label
from pipelines.resources import on_gpu_pool, with_credentials

ROOT = Path(__file__).resolve().parents[1]


def grid_rows(settings: Settings) -> tuple[list[dict], list[dict]]:
    """(rows on the original data, rows on synthetic data) of the experiment grid: key, table
    label and the augmented set they train on (its folder in the augment step's output: the
    variant, `copies_<variant>` for a copy twin; empty for the original data)."""
    grid = settings.experiment.grid

    def folder(row) -> str:
        return settings.layout.augmented(str(row.variant), "copies" if row.twin_of else "generated").name

    def rows(table: dict, on_synthetic: bool) -> list[dict]:
        return [
            {"key": key, "label": row_label(key, row), "variant": folder(row) if on_synthetic else ""}
            for key, row in table.items()
        ]

    return rows(grid.original, False), rows(grid.synthetic, True)


def voter_rows(settings: Settings) -> list[dict]:
    """The experiment's voters as rows for the train step (trained on the original data)."""
    return [{"key": key, "label": key, "variant": ""} for key in settings.experiment.voters]


def row_of(settings: Settings, model: str, where: str, originals: list[dict]) -> str:
    """The label of the row on the original data (or the voter) whose model folder `model` is."""
    for row in originals:
        if Path(model) == settings.model_folder(row["key"]):
            return row["label"]
    raise FersynthError(
        f"{where}: {model} is not a row on the original data nor a voter; the pipeline trains its models"
    )


def build_pipeline(settings: Settings, image_tag: str):
    """The pipeline function, with defaults from `settings` and images tagged `image_tag`."""
    kfp = settings.kfp
    # Evaluation and the vote go to the GPU pool when the profile runs them on CUDA.
    on_cuda = {
        name
        for name, device in (("evaluate", settings.evaluate.device), ("verify", settings.verify.device))
        if device.startswith("cuda")
    }
    ops = components.build(f"{kfp.image}:{image_tag}", f"{kfp.gpu_image}:{image_tag}", tuple(sorted(on_cuda)))
    originals, synthetics = grid_rows(settings)
    profile = json.dumps(resolved_dict(settings), sort_keys=True)
    # The guide and the voters: rows on the original data (resolved to their model folders).
    if settings.generate.guide != "fer":
        raise FersynthError(
            "the pipeline guides generation with a grid row's FER model (generate.guide: fer)"
        )
    guide_label = row_of(settings, settings.generate.guide_model, "generate.guide_model", originals)
    voters = voter_rows(settings)
    voter_labels = [
        row_of(settings, voter, "verify.voters", originals + voters) for voter in settings.verify.voters
    ]
    # Each row reaches its tasks as one JSON string (ParallelFor over strings runs everywhere).
    original_rows = [json.dumps(row, sort_keys=True) for row in originals]
    synthetic_rows = [json.dumps(row, sort_keys=True) for row in synthetics]
    voter_specs = [json.dumps(row, sort_keys=True) for row in voters]

    def prepared(task, gpu: bool = False):
        with_credentials(task, kfp, image_tag)
        return on_gpu_pool(task, kfp.gpu) if gpu else task

    @dsl.pipeline(
        name=kfp.pipeline_name,
        description="FER with generated training data: quality, GIF generation, voting, "
        "rebalancing, and the SL/MEK grid evaluated in-domain and cross-dataset.",
    )
    def fersynth(
        data_repo: str = kfp.data_repo,
        data_rev: str = kfp.data_rev,
        data_path: str = str(kfp.data_path),
        test_sets_path: str = str(kfp.test_sets_path),
        source: str = settings.ingest.source,
        seed: int = settings.seed,
        train_arch: str = settings.train.arch,
        train_image_size: int = settings.train.image_size,
        train_steps: int = settings.train.steps,
        train_batch_size: int = settings.train.batch_size,
        rho: float = settings.augment.rho,
        min_votes: int = settings.verify.min_votes,
        generate_shards: int = kfp.generate_shards,
        register_metric: str = f"{settings.experiment.in_domain}.mean_accuracy",
        overrides: list = [],  # noqa: B006 (a KFP default, never mutated): more KEY=VALUE settings
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        status = prepared(ops.record_status(pipeline_run=run_id))
        with dsl.ExitHandler(status, name="grid"):
            # data_rev (a branch such as main) resolved to its commit on every run, uncached: the
            # cached steps below are keyed on the commit, so data pushed since the last run is
            # fetched and everything downstream reruns, while an unchanged commit reuses them.
            commit = prepared(ops.resolve_data_rev(repo_url=data_repo, rev=data_rev))
            commit.set_caching_options(False).set_display_name("resolve data revision")
            data_commit = commit.output
            resolved = prepared(
                ops.resolve_settings(
                    profile=profile,
                    data_rev=data_commit,
                    seed=seed,
                    source=source,
                    train_arch=train_arch,
                    train_image_size=train_image_size,
                    train_steps=train_steps,
                    train_batch_size=train_batch_size,
                    rho=rho,
                    min_votes=min_votes,
                    extra=overrides,
                )
            )
            every = resolved.outputs["settings"]  # every step reads its settings from this artifact
            raw = prepared(
                ops.fetch_data(repo_url=data_repo, path=data_path, rev=data_commit)
            ).set_display_name("fetch data")
            test_sets = prepared(
                ops.fetch_data(repo_url=data_repo, path=test_sets_path, rev=data_commit)
            ).set_display_name("fetch test sets")
            ingested = prepared(ops.ingest(raw=raw.outputs["data"], settings=every))
            scored = prepared(ops.quality(data=ingested.outputs["dataset"], settings=every), gpu=True)
            guarded = prepared(
                ops.guard(data=scored.outputs["dataset"], test_sets=test_sets.outputs["data"], settings=every)
            )
            clean = guarded.outputs["dataset"]

            def train_and_evaluate(data, row):
                trained = prepared(
                    ops.train(
                        data=data,
                        row=row,
                        settings=every,
                        pipeline_run=run_id,
                    ),
                    gpu=True,
                ).set_display_name("train")
                evaluated = prepared(
                    ops.evaluate(
                        model=trained.outputs["model"],
                        in_domain=clean,
                        test_sets=test_sets.outputs["data"],
                        row=row,
                        settings=every,
                        pipeline_run=run_id,
                    ),
                    gpu="evaluate" in on_cuda,
                ).set_display_name("evaluate")
                return trained, evaluated

            with dsl.ParallelFor(original_rows, name="original-rows") as row:
                trained_original, evaluated_original = train_and_evaluate(clean, row)

            if voter_specs:  # models trained only to vote, independent of the guide
                with dsl.ParallelFor(voter_specs, name="voters") as spec:
                    vote_model = prepared(
                        ops.train(data=clean, row=spec, settings=every, pipeline_run=run_id), gpu=True
                    ).set_display_name("train voter")
                vote_models = dsl.Collected(vote_model.outputs["model"])
            else:
                vote_models = dsl.Collected(trained_original.outputs["model"])

            prior = prepared(ops.train_prior(data=clean, settings=every), gpu=True)
            guide = ops.select_model(
                models=dsl.Collected(trained_original.outputs["model"]), grid_row=guide_label
            )
            shards = ops.shard_indices(num_shards=generate_shards)
            with dsl.ParallelFor(shards.output, parallelism=kfp.max_parallel_shards, name="shards") as shard:
                generated_shard = prepared(
                    ops.generate(
                        data=clean,
                        prior=prior.outputs["prior"],
                        guide=guide.outputs["model"],
                        shard=shard,
                        num_shards=generate_shards,
                        settings=every,
                    ),
                    gpu=True,
                )
            merged = prepared(
                ops.merge(
                    data=clean,
                    shards=dsl.Collected(generated_shard.outputs["generated"]),
                    num_shards=generate_shards,
                    settings=every,
                )
            )
            verified = prepared(
                ops.verify(
                    generated=merged.outputs["dataset"],
                    reference=clean,
                    voters=vote_models,
                    original_models=dsl.Collected(trained_original.outputs["model"]),
                    voter_rows=voter_labels,
                    test_sets=test_sets.outputs["data"],
                    settings=every,
                ),
                gpu="verify" in on_cuda,
            )
            augmented = prepared(
                ops.augment(
                    original=clean,
                    synthetic=verified.outputs["dataset"],
                    settings=every,
                )
            )
            with dsl.ParallelFor(synthetic_rows, name="synthetic-rows") as row:
                model, results = train_and_evaluate(augmented.outputs["datasets"], row)

            compared = prepared(
                ops.compare(
                    original_results=dsl.Collected(evaluated_original.outputs["results"]),
                    synthetic_results=dsl.Collected(results.outputs["results"]),
                    settings=every,
                )
            )
            prepared(
                ops.report(
                    comparisons=compared.outputs["comparisons"],
                    original_results=dsl.Collected(evaluated_original.outputs["results"]),
                    synthetic_results=dsl.Collected(results.outputs["results"]),
                    quality_data=scored.outputs["dataset"],
                    verified=verified.outputs["dataset"],
                    augmented=augmented.outputs["datasets"],
                    generated=merged.outputs["dataset"],
                    settings=every,
                    pipeline_run=run_id,
                )
            )
            prepared(
                ops.register(
                    original_models=dsl.Collected(trained_original.outputs["model"]),
                    synthetic_models=dsl.Collected(model.outputs["model"]),
                    metric=register_metric,
                    settings=every,
                )
            ).after(compared)

    return fersynth


def default_pipeline(image_tag: str, params: Path = ROOT / "params.yaml"):
    """The pipeline of a profile (default: the active one, params.yaml)."""
    return build_pipeline(load_settings(params), image_tag)
