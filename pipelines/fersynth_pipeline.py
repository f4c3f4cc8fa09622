"""The fersynth pipeline for Kubeflow Pipelines v2: the graph of dvc.yaml, wired from components.

fetch (DVC, at a git revision) -> ingest -> quality -> guard -> the original rows of the grid
(also the voters) -> prior -> generate (ParallelFor over shards) -> merge (Collected) ->
verify -> augment -> the synthetic rows -> evaluate (in-domain and cross-dataset) -> compare
-> report -> register; an exit handler records how the run ended.

Parameter defaults come from params.yaml; the grid's rows come from dvc.yaml's `vars`, so the
local run and the cluster run train the same rows.
"""

import json
from pathlib import Path

import yaml
from kfp import dsl

import components
from fersynth.settings import Settings, load_settings
from pipelines.resources import on_gpu_pool, with_credentials

ROOT = Path(__file__).resolve().parents[1]
IN_DOMAIN, CROSS = "in_domain", "cross"  # test-set names in results and MLflow metric keys
VARIANTS = ["rho", "synthetic"]  # the augmented datasets the synthetic rows train on


def grid_rows(dvc_yaml: Path = ROOT / "dvc.yaml") -> tuple[list[dict], list[dict]]:
    """(original rows, synthetic rows) of the experiment grid, as dvc.yaml declares them."""
    variables = {}
    for entry in yaml.safe_load(dvc_yaml.read_text())["vars"]:
        if isinstance(entry, dict):
            variables.update(entry)
    originals = [
        {"label": row_label(key), "method": row["method"], "balanced": bool(row["balanced"]), "variant": ""}
        for key, row in variables["originals"].items()
    ]
    synthetics = [
        {"label": row_label(key), "method": row["method"], "balanced": False, "variant": row["variant"]}
        for key, row in variables["synthetics"].items()
    ]
    return originals, synthetics


def row_label(key: str) -> str:
    """`expanded_sl` -> `Expanded_SL`: the thesis' row names."""
    head, _, tail = key.partition("_")
    return "_".join(
        [head.capitalize(), *(part.upper() if part in ("sl", "mek") else part for part in tail.split("_"))]
    )


def build_pipeline(settings: Settings, image_tag: str):
    """The pipeline function, with defaults from `settings` and images tagged `image_tag`."""
    kfp = settings.kfp
    ops = components.build(f"{kfp.image}:{image_tag}", f"{kfp.gpu_image}:{image_tag}")
    originals, synthetics = grid_rows()
    # Each row reaches its tasks as one JSON string (ParallelFor over strings runs everywhere).
    original_rows = [json.dumps(row, sort_keys=True) for row in originals]
    synthetic_rows = [json.dumps(row, sort_keys=True) for row in synthetics]

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
        data_path: str = kfp.data_path,
        cross_path: str = kfp.cross_path,
        source: str = settings.ingest.source,
        seed: int = settings.seed,
        train_arch: str = settings.train.arch,
        train_image_size: int = settings.train.image_size,
        train_steps: int = settings.train.steps,
        train_batch_size: int = settings.train.batch_size,
        rho: float = settings.augment.rho,
        min_votes: int = settings.verify.min_votes,
        generate_shards: int = kfp.generate_shards,
        register_metric: str = f"{IN_DOMAIN}.mean_accuracy",
        overrides: list = [],  # noqa: B006 (a KFP default, never mutated): more KEY=VALUE settings
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        status = prepared(ops.record_status(pipeline_run=run_id))
        with dsl.ExitHandler(status, name="grid"):
            resolved = prepared(
                ops.resolve_settings(
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
            raw = prepared(ops.fetch_data(repo_url=data_repo, path=data_path, rev=data_rev)).set_display_name(
                "fetch data"
            )
            cross = prepared(
                ops.fetch_data(repo_url=data_repo, path=cross_path, rev=data_rev)
            ).set_display_name("fetch cross-dataset test set")
            ingested = prepared(ops.ingest(raw=raw.outputs["data"], settings=every))
            scored = prepared(ops.quality(data=ingested.outputs["dataset"], settings=every), gpu=True)
            guarded = prepared(
                ops.guard(data=scored.outputs["dataset"], cross=cross.outputs["data"], settings=every)
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
                        cross=cross.outputs["data"],
                        row=row,
                        in_domain_name=IN_DOMAIN,
                        cross_name=CROSS,
                        settings=every,
                        pipeline_run=run_id,
                    )
                ).set_display_name("evaluate")
                return trained, evaluated

            with dsl.ParallelFor(original_rows, name="original-rows") as row:
                voter, voter_results = train_and_evaluate(clean, row)

            prior = prepared(ops.train_prior(data=clean, settings=every), gpu=True)
            # The guide is the first original row's model, as in dvc.yaml.
            guide = ops.select_model(
                models=dsl.Collected(voter.outputs["model"]), grid_row=originals[0]["label"]
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
                    voters=dsl.Collected(voter.outputs["model"]),
                    cross=cross.outputs["data"],
                    settings=every,
                )
            )
            augmented = prepared(
                ops.augment(
                    original=clean, synthetic=verified.outputs["dataset"], variants=VARIANTS, settings=every
                )
            )
            with dsl.ParallelFor(synthetic_rows, name="synthetic-rows") as row:
                model, results = train_and_evaluate(augmented.outputs["datasets"], row)

            compared = prepared(
                ops.compare(
                    original_results=dsl.Collected(voter_results.outputs["results"]),
                    synthetic_results=dsl.Collected(results.outputs["results"]),
                    in_domain_name=IN_DOMAIN,
                    cross_name=CROSS,
                )
            )
            prepared(
                ops.report(
                    comparisons=compared.outputs["comparisons"],
                    original_results=dsl.Collected(voter_results.outputs["results"]),
                    synthetic_results=dsl.Collected(results.outputs["results"]),
                    quality_data=scored.outputs["dataset"],
                    verified=verified.outputs["dataset"],
                    augmented=augmented.outputs["datasets"],
                    generated=merged.outputs["dataset"],
                    in_domain_name=IN_DOMAIN,
                    cross_name=CROSS,
                    settings=every,
                    pipeline_run=run_id,
                )
            )
            prepared(
                ops.register(
                    original_models=dsl.Collected(voter.outputs["model"]),
                    synthetic_models=dsl.Collected(model.outputs["model"]),
                    metric=register_metric,
                )
            ).after(compared)

    return fersynth


def default_pipeline(image_tag: str, params: Path = ROOT / "params.yaml"):
    return build_pipeline(load_settings(params), image_tag)
