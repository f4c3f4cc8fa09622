"""`fersynth`: one subcommand per stage. Defaults come from params.yaml; options override them."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import get_args

import click

from fersynth import __version__, stage_times, tracking
from fersynth.classes import CLASS_MAP_PRESETS
from fersynth.errors import FersynthError, one_line
from fersynth.settings import (
    DEFAULT_PARAMS,
    AugmentVariant,
    Backend,
    Settings,
    Source,
    load_settings,
    resolved_dict,
)


class _Context:
    def __init__(self, params: Path | None, overrides: tuple[str, ...]) -> None:
        self.params = params
        self.overrides = list(overrides)
        self.started = time.perf_counter()  # for the stage's time (fersynth.stage_times)

    def settings(self, extra: list[str] | None = None) -> Settings:
        path = self.params
        if path is None and DEFAULT_PARAMS.is_symlink() and not DEFAULT_PARAMS.exists():
            target = DEFAULT_PARAMS.readlink()
            raise FersynthError(f"{DEFAULT_PARAMS} links to {target}, which does not exist (make profile)")
        if path is None and DEFAULT_PARAMS.is_file():
            path = DEFAULT_PARAMS
        return load_settings(path, self.overrides + (extra or []))

    def overridden(self, *keys: str) -> list[str]:
        """The given settings that a -S override sets."""
        return [key for key in keys if any(pair.partition("=")[0].strip() == key for pair in self.overrides)]


def _option_overrides(**pairs: object) -> list[str]:
    """Command-line options given by the user, as KEY=VALUE overrides (None = not given)."""
    return [
        f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}"
        for key, v in pairs.items()
        if v is not None
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fersynth")
@click.option(
    "--params",
    "params",
    type=click.Path(path_type=Path),
    default=None,
    help="Parameter file (default: ./params.yaml when present, else built-in defaults).",
)
@click.option(
    "-S",
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one parameter, e.g. -S ingest.workers=2 (repeatable).",
)
@click.pass_context
def cli(ctx: click.Context, params: Path | None, overrides: tuple[str, ...]) -> None:
    """fersynth: facial expression recognition with generated training data.

    Every stage reads its parameters from params.yaml; see `fersynth params` for the
    resolved values.
    """
    ctx.obj = _Context(params, overrides)


@cli.result_callback()
@click.pass_context
def _record_stage_time(ctx: click.Context, *_: object, **__: object) -> None:
    """A command that DVC ran as a stage (DVC_STAGE set) and that finished appends its wall time
    to runs/<experiment>/stage_times.jsonl (the results page shows them); a time that cannot be
    written never fails the stage."""
    stage = os.environ.get(stage_times.DVC_STAGE)
    if not stage or ctx.invoked_subcommand is None:
        return
    try:
        runs = ctx.obj.settings().layout.runs
        stage_times.record(runs, stage, ctx.invoked_subcommand, time.perf_counter() - ctx.obj.started)
    except (OSError, FersynthError) as exc:
        logging.getLogger(__name__).warning("stage time not recorded: %s", exc)


@cli.command("params")
@click.argument("key", required=False)
@click.pass_obj
def params_command(obj: _Context, key: str | None) -> None:
    """Validate params.yaml and print the resolved settings as JSON (or one KEY, e.g.
    experiment.name, as plain text)."""
    tree = resolved_dict(obj.settings())
    if key is None:
        click.echo(json.dumps(tree, indent=2, default=str))
        return
    value = tree
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise FersynthError(f"params: no setting {key!r}")
        value = value[part]
    click.echo(value if isinstance(value, str) else json.dumps(value, default=str))


@cli.command("demo-data")
@click.option(
    "--set", "set_name", help="One of demo.sets: its overrides, written to data/<experiment>/<set>."
)
@click.option("--output", type=click.Path(path_type=Path), help="Output folder [demo.output].")
@click.option("--seed", type=int, help="Random seed [demo.seed].")
@click.option("--train-size", type=int, help="Training images [demo.train_size].")
@click.option("--test-size", type=int, help="Test images [demo.test_size].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.pass_obj
def demo_data_command(obj: _Context, set_name, output, seed, train_size, test_size, force: bool) -> None:
    """Draw procedural demo faces in RAF-DB's folder layout (deterministic by seed)."""
    from fersynth.demo import write_demo_data

    extra: list[str] = []
    if set_name is not None:
        sets = obj.settings().demo.sets
        if set_name not in sets:
            raise FersynthError(f"demo.sets: no set {set_name!r} (sets: {', '.join(sets) or 'none'})")
        extra = [f"demo.{key}={json.dumps(value)}" for key, value in sets[set_name].items()]
        extra.append(f"demo.output={json.dumps(str(obj.settings().layout.demo_set(set_name)))}")
    settings = obj.settings(
        extra
        + _option_overrides(
            **{
                "demo.output": output,
                "demo.seed": seed,
                "demo.train_size": train_size,
                "demo.test_size": test_size,
            }
        )
    )
    out = write_demo_data(settings.demo, force=force)
    click.echo(
        f"demo data: {settings.demo.train_size} train + {settings.demo.test_size} test "
        f"faces in RAF-DB layout at {out}"
    )


@cli.command("ingest")
@click.option(
    "--source",
    type=click.Choice(get_args(Source)),
    help="Input layout [ingest.source].",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help="Input folder or CSV file [ingest.input].",
)
@click.option("--output", type=click.Path(path_type=Path), help="Dataset folder [ingest.output].")
@click.option(
    "--ferplus-labels",
    type=click.Path(path_type=Path),
    help="FER+ fer2013new.csv, for --source ferplus [ingest.ferplus.labels_csv].",
)
@click.option(
    "--keep-test-duplicates/--drop-test-duplicates",
    default=None,
    help="Keep training images that duplicate a test image (default: drop them).",
)
@click.option(
    "--class-map",
    help=f"What numbered class folders mean, for --source folder: a preset ({', '.join(CLASS_MAP_PRESETS)}) "
    "or pairs such as 0=neutral,1=happy,7=exclude [ingest.folder.class_map].",
)
@click.option(
    "--label-base",
    type=click.IntRange(0, 1),
    help="RAF-DB label numbering: 1 (RAF-DB's 1..7) or 0 (a re-numbered 0..6 file) "
    "[ingest.rafdb.label_base].",
)
@click.option(
    "--split",
    "split_name",
    help="The split of every row of a FER2013 CSV without a Usage column, e.g. train [ingest.fer2013.split].",
)
@click.option("--workers", type=int, help="Worker processes, 0 = all cores [ingest.workers].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def ingest_command(
    obj: _Context,
    source,
    input_path,
    output,
    ferplus_labels,
    keep_test_duplicates,
    class_map,
    label_base,
    split_name,
    workers,
    force: bool,
    quiet: bool,
) -> None:
    """Read RAF-DB, AffectNet, FER2013, FER+ or a split/class folder into a dataset folder.

    Writes manifest.csv, images/, the ingest report (Markdown, JSON, rejected inputs and
    duplicate groups as CSV) and the resolved settings.
    """
    from fersynth import stages
    from fersynth.ingest.report import REPORT_MD, markdown

    drop = None if keep_test_duplicates is None else not keep_test_duplicates
    settings = obj.settings(
        _option_overrides(
            **{
                "ingest.source": source,
                "ingest.input": input_path,
                "ingest.output": output,
                "ingest.ferplus.labels_csv": ferplus_labels,
                "ingest.drop_train_test_duplicates": drop,
                "ingest.folder.class_map": class_map,
                "ingest.rafdb.label_base": label_base,
                "ingest.fer2013.split": split_name,
                "ingest.workers": workers,
            }
        )
    )
    for option, value, source in (
        ("--class-map", class_map, "folder"),
        ("--label-base", label_base, "rafdb"),
        ("--split", split_name, "fer2013"),
    ):
        if value is not None and settings.ingest.source != source:
            raise FersynthError(f"{option} is for --source {source}, not {settings.ingest.source}")
    report = stages.ingest(settings, force=force, progress=not quiet)
    click.echo(markdown(report, figures=False))
    click.echo(f"report: {Path(report.output) / REPORT_MD}")


@cli.command("test-set")
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def test_set_command(obj: _Context, name: str, force: bool, quiet: bool) -> None:
    """Write one of the experiment's test sets to data/<experiment>/test_sets/NAME.

    The in-domain one (experiment.in_domain) is the ingested data's test split; a
    cross-dataset one (experiment.cross_sets) is ingested from its own source.
    """
    from fersynth import stages

    settings = obj.settings()
    output, images = stages.test_set(settings, name, force=force, progress=not quiet)
    experiment = settings.experiment
    if name == experiment.in_domain:
        click.echo(f"test set {name}: {images} images of {settings.ingest.output} -> {output}")
    else:
        cross = experiment.cross_sets[name]
        click.echo(f"test set {name}: {images} images from {cross.input} ({cross.source}) -> {output}")


@cli.command("quality")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset folder [quality.data].")
@click.option("--output", type=click.Path(path_type=Path), help="Output dataset folder [quality.output].")
@click.option(
    "--sr-model",
    multiple=True,
    help="SwinIR weights (file or s3:// URI), repeatable, or 'none' [quality.sr.model].",
)
@click.option("--workers", type=int, help="Worker processes, 0 = all cores [quality.workers].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def quality_command(obj: _Context, data, output, sr_model, workers, force: bool, quiet: bool) -> None:
    """Score image quality, flag poor training images and enhance them with super-resolution.

    Writes a new dataset folder (images hard-linked) with the scores in the manifest, the
    enhanced images, and quality_report.md with histograms and contact sheets.
    """
    from fersynth import stages
    from fersynth.quality.report import REPORT_MD

    models = list(sr_model) if sr_model else None
    if models == ["none"]:
        models = "none"
    settings = obj.settings(
        _option_overrides(
            **{
                "quality.data": data,
                "quality.output": output,
                "quality.sr.model": models,
                "quality.workers": workers,
            }
        )
    )
    result = stages.quality(settings, force=force, progress=not quiet)
    frame = result.manifest
    flagged = int((frame["q_flag"] != "").sum())
    enhanced = int((frame["q_action"] == "enhanced").sum())
    sr = ", ".join(result.sr_models) if result.sr_models else "skipped (quality.sr.model: none)"
    click.echo(
        f"quality: {flagged} training images flagged, {enhanced} enhanced; super-resolution {sr}; "
        f"{len(result.problems)} unreadable"
    )
    click.echo(f"report: {result.output / REPORT_MD}")


@cli.command("train")
@click.option(
    "--row",
    help="A row of experiment.grid (once per seed of experiment.grid.seeds) or a voter of "
    "experiment.voters: its method, sampler, data and folder.",
)
@click.option(
    "--voters",
    "all_voters",
    is_flag=True,
    help="Every voter of experiment.voters, each into runs/<experiment>/voters/.",
)
@click.option("--data", type=click.Path(path_type=Path), help="Dataset folder [train.data].")
@click.option("--output", type=click.Path(path_type=Path), help="Run folder [train.output].")
@click.option("--arch", help="timm model name [train.arch].")
@click.option("--method", type=click.Choice(["sl", "mek"]), help="Supervised or MEK [train.method].")
@click.option("--steps", type=int, help="Optimiser steps [train.steps].")
@click.option("--pretrained", help="Backbone weights: local file or s3:// URI [train.pretrained].")
@click.option("--device", help="auto, cpu, cuda, cuda:N [train.device].")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--force", is_flag=True, help="Delete an existing run folder and start over.")
@click.option(
    "--skip-if-empty",
    is_flag=True,
    help="No training images: record the run as skipped instead of failing (grid rows on synthetic data).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def train_command(
    obj: _Context,
    row,
    all_voters: bool,
    data,
    output,
    arch,
    method,
    steps,
    pretrained,
    device,
    resume: bool,
    force: bool,
    skip_if_empty: bool,
    quiet: bool,
) -> None:
    """Train a FER model (plain supervised learning or MEK) on a dataset folder.

    Writes model.pt (best weights by validation), checkpoint.pt (to resume), train_log.jsonl,
    train_summary.json and the resolved settings.
    """
    from fersynth import stages

    if all_voters:
        if row is not None or output is not None or method is not None:
            raise FersynthError(
                "--voters trains every experiment voter into its own folder: drop --row/--output/--method"
            )
        settings = obj.settings(_option_overrides(**{"train.data": data}))
        for key, result in stages.train_voters(settings, resume=resume, force=force, progress=not quiet):
            click.echo(f"voter {key}: trained {result.steps} steps -> {result.output}")
        return
    settings = obj.settings(
        _option_overrides(
            **{
                "train.data": data,
                "train.output": output,
                "train.arch": arch,
                "train.method": method,
                "train.steps": steps,
                "train.pretrained": pretrained,
                "train.device": device,
            }
        )
    )
    if row is not None:
        clash = obj.overridden("train.method", "train.balanced_sampler", "train.output")
        if row in settings.experiment.grid.synthetic:  # its data is its augmented variant (--data to change)
            clash += obj.overridden("train.data")
        if method is not None or clash:
            given = ", ".join(["--method"] * (method is not None) + [f"-S {key}" for key in clash])
            raise FersynthError(
                f"--row {row} sets method, sampler, data and folder (experiment.grid): drop {given}"
            )
        settings = stages.row_settings(settings, row, data, output)
    outcomes = stages.train(
        settings, row, resume=resume, force=force, progress=not quiet, skip_if_empty=skip_if_empty
    )
    for result, run_id in outcomes:
        if result.skipped:
            click.echo(f"skipped: {result.skipped} (recorded in {result.output})")
            continue
        if run_id:
            click.echo(f"MLflow run {run_id} at {tracking.tracking_uri()}")
        best = result.best_metrics
        line = f"trained {result.steps} steps at {result.images_per_second:.0f} images/s"
        if best:
            line += (
                f"; best validation at step {result.best_step}: accuracy {best['accuracy']:.2%}, "
                f"mean per-class {best['mean_accuracy']:.2%}"
            )
        click.echo(line)
        click.echo(f"model: {result.output / 'model.pt'}")


@cli.command("evaluate")
@click.option("--row", help="A row of experiment.grid: its model, results in runs/<experiment>/eval/<row>.")
@click.option("--model", type=click.Path(path_type=Path), help="Model file or run folder [evaluate.model].")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Test dataset folder, repeatable [evaluate.data].",
)
@click.option("--split", help="Split to evaluate [evaluate.split].")
@click.option("--output", type=click.Path(path_type=Path), help="Results folder [evaluate.output].")
@click.option("--no-tta", is_flag=True, default=None, help="No horizontal-flip test-time augmentation.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def evaluate_command(obj: _Context, row, model, data, split, output, no_tta, quiet: bool) -> None:
    """Accuracy, mean and per-class accuracy and confusion matrices on one or more test sets."""
    from fersynth import stages
    from fersynth.skipped import skipped_reason

    base = obj.settings()
    by_row = []
    if row is not None:
        if model is not None or output is not None:
            raise FersynthError(
                f"--row {row} evaluates the row's models into its folder: drop --model/--output"
            )
        settings = obj.settings(
            _option_overrides(**{"evaluate.split": split, "evaluate.tta_flip": False if no_tta else None})
            + ([f"evaluate.data={json.dumps([str(d) for d in data])}"] if data else [])
        )
        for seed, results in stages.evaluate_row(settings, row, progress=not quiet):
            if not results:
                click.echo(f"seed {seed}: skipped (its training was skipped)")
            for result in results:
                m = result.metrics
                click.echo(
                    f"seed {seed}, {result.name}: accuracy {m['accuracy']:.2%}, mean per-class "
                    f"{m['mean_accuracy']:.2%} -> {result.folder}"
                )
        return
    if model is not None and output is None and not obj.overridden("evaluate.output"):
        by_row = _option_overrides(**{"evaluate.output": stages.model_results_folder(base, model)})
    settings = obj.settings(
        by_row
        + _option_overrides(
            **{
                "evaluate.model": model,
                "evaluate.split": split,
                "evaluate.output": output,
                "evaluate.tta_flip": False if no_tta else None,
            }
        )
        + ([f"evaluate.data={json.dumps([str(d) for d in data])}"] if data else [])
    )
    results = stages.evaluate(settings, progress=not quiet)
    if not results:
        reason = skipped_reason(settings.evaluate.output)
        click.echo(f"skipped: its training was skipped ({reason}); recorded in {settings.evaluate.output}")
    for result in results:
        m = result.metrics
        per_class = ", ".join(
            f"{k} {v:.0%}" if v is not None else f"{k} -" for k, v in m["per_class_accuracy"].items()
        )
        click.echo(
            f"{result.name}: accuracy {m['accuracy']:.2%}, mean per-class "
            f"{m['mean_accuracy']:.2%} ({per_class}) -> {result.folder}"
        )


@cli.command("train-prior")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset folder [prior.data].")
@click.option("--output", type=click.Path(path_type=Path), help="Prior folder [prior.output].")
@click.option("--steps", type=int, help="Training steps [prior.steps].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def train_prior_command(obj: _Context, data, output, steps, force: bool, quiet: bool) -> None:
    """Train the offline autoencoder prior of gif-prior on the training split and, with
    prior.diffusion.steps > 0, the class-conditional latent diffusion model of gif-ldm."""
    from fersynth import stages

    settings = obj.settings(
        _option_overrides(**{"prior.data": data, "prior.output": output, "prior.steps": steps})
    )
    result = stages.train_prior(settings, force=force, progress=not quiet)
    click.echo(
        f"prior: reconstruction error {result.mae:.2f} grey levels (PSNR {result.psnr:.1f} dB) "
        f"on held-out training images -> {result.output}"
    )


@cli.command("generate")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset with the seed images [generate.data].")
@click.option("--output", type=click.Path(path_type=Path), help="Generation folder [generate.output].")
@click.option("--backend", type=click.Choice(get_args(Backend)), help="[generate.backend]")
@click.option("--shard", type=int, default=0, show_default=True, help="This shard's index.")
@click.option("--num-shards", type=int, default=1, show_default=True, help="How many shards in all.")
@click.option("--only", multiple=True, help="Regenerate only this seed id or job key (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def generate_command(
    obj: _Context, data, output, backend, shard: int, num_shards: int, only, quiet: bool
) -> None:
    """Expand training images K times with GIF guided imagination, and draw new identities
    (generate.identities; one shard; resumable).

    Run shards 0..N-1 anywhere (e.g. one GPU each), then `fersynth merge --num-shards N`.
    """
    from fersynth import stages

    settings = obj.settings(
        _option_overrides(**{"generate.data": data, "generate.output": output, "generate.backend": backend})
    )
    result = stages.generate(settings, shard, num_shards, only=list(only) or None, progress=not quiet)
    click.echo(
        f"{result.folder.name}: {result.seeds} seeds, {result.skipped} already done, "
        f"{result.written} images written -> {result.folder}"
    )


@cli.command("merge")
@click.option("--num-shards", type=int, default=1, show_default=True, help="How many shards were run.")
@click.option("--output", type=click.Path(path_type=Path), help="Generation folder [generate.output].")
@click.option("--force", is_flag=True, help="Replace an existing merged dataset.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def merge_command(obj: _Context, num_shards: int, output, force: bool, quiet: bool) -> None:
    """Join generation shards into one synthetic dataset; fails if anything is missing or doubled."""
    from fersynth import stages

    settings = obj.settings(_option_overrides(**{"generate.output": output}))
    result = stages.merge(settings, num_shards, force=force, progress=not quiet)
    counts = ", ".join(f"{k} {v}" for k, v in result.per_class.items())
    click.echo(f"merged {result.images} synthetic images ({counts}) -> {result.output}")


@cli.command("guard")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset folder [guard.data].")
@click.option("--output", type=click.Path(path_type=Path), help="Output dataset folder [guard.output].")
@click.option(
    "--test-set",
    "test_sets",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another dataset whose test splits must not leak (repeatable) [guard.test_sets].",
)
@click.option("--max-distance", type=int, help="pHash bits that still count as a copy [guard.max_distance].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def guard_command(obj: _Context, data, output, test_sets, max_distance, force: bool, quiet: bool) -> None:
    """Remove training and validation images that copy a test image, exactly or nearly.

    Writes a new dataset folder without them and guard_report.md listing every pair.
    """
    from fersynth import stages
    from fersynth.verify.report import GUARD_MD

    settings = obj.settings(
        _option_overrides(
            **{
                "guard.data": data,
                "guard.output": output,
                "guard.test_sets": [str(p) for p in test_sets] or None,
                "guard.max_distance": max_distance,
            }
        )
    )
    result = stages.guard(settings, force=force, progress=not quiet)
    leaks = result.leaks
    click.echo(
        f"guard: removed {len(leaks)} images ({int((leaks['kind'] == 'exact').sum())} exact copies, "
        f"{int((leaks['kind'] == 'perceptual').sum())} near-duplicates) of "
        f"{len(leaks[['test_set', 'test_id']].drop_duplicates())} distinct test images; "
        f"kept {len(result.manifest)}"
    )
    click.echo(f"report: {result.output / GUARD_MD}")


@cli.command("verify")
@click.option("--data", type=click.Path(path_type=Path), help="Synthetic dataset [verify.data].")
@click.option("--reference", type=click.Path(path_type=Path), help="Original dataset [verify.reference].")
@click.option("--output", type=click.Path(path_type=Path), help="Output dataset folder [verify.output].")
@click.option("--voter", "voters", multiple=True, help="Voter model (repeatable) [verify.voters].")
@click.option("--relabel", is_flag=True, default=None, help="Label by majority vote [verify.mode=relabel].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def verify_command(obj: _Context, data, reference, output, voters, relabel, force: bool, quiet: bool) -> None:
    """Keep synthetic images whose expression survives a vote of several FER models.

    Also drops synthetic copies of test images and writes verify_report.md with acceptance,
    Frechet distance, KID and diversity per class.
    """
    from fersynth import stages
    from fersynth.augment import COPY_KIND
    from fersynth.verify.report import VERIFY_MD

    settings = obj.settings(
        _option_overrides(
            **{
                "verify.data": data,
                "verify.reference": reference,
                "verify.output": output,
                "verify.voters": list(voters) or None,
                "verify.mode": "relabel" if relabel else None,
            }
        )
    )
    result = stages.verify(settings, force=force, progress=not quiet)

    frame = result.manifest
    twins = frame["gen_kind"].eq(COPY_KIND) if "gen_kind" in frame else frame.index.isin([])
    copies, frame = frame[twins], frame[~twins]  # the copy twins (the control) are counted apart
    accepted = frame[frame["v_accepted"] == "true"]["label"].value_counts()
    total = frame["label"].value_counts()
    per_class = ", ".join(f"{k} {accepted.get(k, 0)}/{n}" for k, n in total.items())
    kept_copies = (
        f"; copy twins {int((copies['v_accepted'] == 'true').sum())} of {len(copies)}" if len(copies) else ""
    )
    click.echo(
        f"verify: {int(accepted.sum())} of {len(frame)} accepted ({per_class}){kept_copies}; "
        f"{len(result.leaks)} test-image copies removed"
    )
    click.echo(f"report: {result.output / VERIFY_MD}")


@cli.command("augment")
@click.option("--original", type=click.Path(path_type=Path), help="Original dataset [augment.original].")
@click.option(
    "--synthetic", type=click.Path(path_type=Path), help="Verified synthetic data [augment.synthetic]."
)
@click.option("--output", type=click.Path(path_type=Path), help="Output dataset folder [augment.output].")
@click.option(
    "--variant",
    type=click.Choice(list(get_args(AugmentVariant))),
    help="Training set to build [augment.variant].",
)
@click.option("--rho", type=float, help="Largest/smallest class ratio to reach [augment.rho].")
@click.option(
    "--grid",
    "for_grid",
    is_flag=True,
    help="Every variant the grid's rows train on, each in data/<experiment>/augmented/.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_obj
def augment_command(
    obj: _Context, original, synthetic, output, variant, rho, for_grid: bool, force: bool, quiet: bool
) -> None:
    """Add accepted synthetic images to the minor classes (thesis Algorithm 4)."""
    from fersynth import stages
    from fersynth.augment import REPORT_MD

    if for_grid:
        given = [
            flag
            for flag, value in (
                ("--original", original),
                ("--synthetic", synthetic),
                ("--output", output),
                ("--variant", variant),
            )
            if value is not None
        ]
        if given:
            raise FersynthError(
                f"--grid builds every variant of the grid in its own folder: drop {', '.join(given)}"
            )
        for name, pool, result in stages.augment_grid(
            obj.settings(_option_overrides(**{"augment.rho": rho})), force=force, progress=not quiet
        ):
            twin = " (copy twins)" if pool == "copies" else ""
            click.echo(
                f"augment ({name}{twin}): class ratio {result.ratio_before:.2f} -> {result.ratio_after:.2f}; "
                f"added {sum(result.added.values())} -> {result.output}"
            )
        return
    settings = obj.settings(
        _option_overrides(
            **{
                "augment.original": original,
                "augment.synthetic": synthetic,
                "augment.output": output,
                "augment.variant": variant,
                "augment.rho": rho,
            }
        )
    )
    result = stages.augment(settings, force=force, progress=not quiet)
    added = ", ".join(f"{k} +{v}" for k, v in result.added.items() if v)
    click.echo(
        f"augment ({settings.augment.variant}): class ratio {result.ratio_before:.2f} -> "
        f"{result.ratio_after:.2f}; added {sum(result.added.values())} ({added or 'none'})"
    )
    click.echo(f"report: {result.output / REPORT_MD}")


@cli.command("compare")
@click.argument("runs", nargs=-1, metavar="[NAME=RESULTS...]")
@click.option(
    "--test-set",
    help="Test set to compare (default: every test set of the experiment; with RUNS, the first one).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Folder for comparison.md and comparison.csv [runs/<experiment>/compare/<test set>].",
)
@click.pass_obj
def compare_command(obj: _Context, runs: tuple[str, ...], test_set, output: Path | None) -> None:
    """The thesis comparison table: one row per run, classes by training count, Total, Mean.

    Without RUNS: every row of experiment.grid, one table per test set. Each RESULTS is an
    `fersynth evaluate` output folder, e.g. Original_SL=runs/demo/eval/original_sl.
    """
    from fersynth import stages
    from fersynth.compare import parse_run_arguments

    settings = obj.settings()
    if runs:
        tables = stages.compare_results(settings, parse_run_arguments(runs), test_set, output)
    else:
        tables = stages.compare_grid(settings, test_set, output)
    for _, markdown, markdown_path, csv_path in tables:
        click.echo(markdown)
        click.echo(f"table: {markdown_path} and {csv_path}")


@cli.command("report")
@click.option("--output", type=click.Path(path_type=Path), help="Report folder [report.output].")
@click.option("--force", is_flag=True, help="Replace an existing report.")
@click.pass_obj
def report_command(obj: _Context, output: Path | None, force: bool) -> None:
    """One page for the whole grid: comparison tables, what the synthetic data changed per
    class, confusion matrices, quality, verification, rebalancing and generated samples."""
    from fersynth import stages
    from fersynth.report import REPORT_MD

    settings = obj.settings(_option_overrides(**{"report.output": output}))
    result = stages.report(settings, force=force)
    click.echo(f"report: {result.output / REPORT_MD}")


@cli.command("register")
@click.argument("runs", nargs=-1, metavar="[NAME=MODEL_FOLDER...]")
@click.option("--metric", help="MLflow metric to rank by [default: <in-domain test set>.mean_accuracy].")
@click.option("--name", default=None, help="Registered model name [fersynth-<experiment>].")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Write the outcome as JSON (with tracking off: a note that nothing was registered).",
)
@click.pass_obj
def register_command(obj: _Context, runs: tuple[str, ...], metric, name, output: Path | None) -> None:
    """Register the grid's best model in the MLflow Model Registry; move the alias `champion`
    to it only when it beats the current champion on the same metric.

    Without RUNS: every row of experiment.grid."""
    from fersynth import stages
    from fersynth.compare import parse_run_arguments

    settings = obj.settings()
    folders = dict(parse_run_arguments(runs)) if runs else stages.grid_folders(settings, settings.row_folder)
    outcome = stages.register(settings, folders, metric, output, name)
    if not outcome["registered"]:
        click.echo(f"register: {outcome['reason']}; nothing registered")
        return
    verdict = (
        "now the champion"
        if outcome["promoted"]
        else (f"not promoted: the champion has {outcome['previous_champion_value']:.4f}")
    )
    click.echo(
        f"registered {outcome['name']} version {outcome['version']} ({outcome['run']}, "
        f"{outcome['metric']} = {outcome['value']:.4f}): {verdict}"
    )


@cli.command("predict")
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_uri",
    required=True,
    help="Model file, run folder, s3:// URI or models:/<name>@champion.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Write .csv or .json (default: CSV on standard output).",
)
@click.option("--face-crop", is_flag=True, help="Crop the largest detected face first.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--no-tta", is_flag=True, help="No horizontal-flip test-time augmentation.")
@click.option(
    "--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch."
)
@click.pass_obj
def predict_command(
    obj: _Context,
    target: Path,
    model_uri: str,
    output: Path | None,
    face_crop: bool,
    device: str,
    no_tta: bool,
    batch_size: int,
) -> None:
    """Predict the expression of an image, or of every image in a folder (a fersynth dataset
    folder: the images its manifest lists, with their labels beside the predictions)."""
    from fersynth.files import atomic_write_text
    from fersynth.predict import Predictor, predict

    obj.settings()  # the pixel limit of params.yaml (when present) and -S max_image_pixels=N
    predictor = Predictor.from_uri(model_uri, device, tta_flip=not no_tta)
    table = predict(
        target, predictor, face_crop=face_crop, batch_size=batch_size, progress=output is not None
    )
    if output is None:
        click.echo(table.to_csv(index=False, lineterminator="\n"), nl=False)
    elif output.suffix == ".json":
        atomic_write_text(output, table.to_json(orient="records", indent=2) + "\n")
    else:
        atomic_write_text(output, table.to_csv(index=False, lineterminator="\n"))
    failed = table[table["error"] != ""]
    if output is not None:
        click.echo(f"{len(table)} files: {len(table) - len(failed)} predicted, {len(failed)} not -> {output}")
    if "label" in table:  # a fersynth dataset folder: its manifest gives the labels
        done = table[table["error"] == ""]
        hits = int((done["predicted"] == done["label"]).sum())
        share = f" ({100 * hits / len(done):.1f}%)" if len(done) else ""
        click.echo(f"{hits} of {len(done)} predicted images match their manifest label{share}", err=True)
    for path, reason in list(zip(failed["path"], failed["error"], strict=True))[:10]:
        click.echo(f"not predicted: {path}: {reason}", err=True)
    if len(failed) > 10:
        click.echo(f"... and {len(failed) - 10} more not predicted (the error column says why)", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes end as one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="fersynth", standalone_mode=False)
    except FersynthError as exc:
        click.echo(f"fersynth: error: {one_line(exc)}", err=True)
        return 2
    except OSError as exc:  # unwritable output, full disk, ...: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"fersynth: error: {where}{exc.strerror or exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("fersynth: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
