"""`python -m pipelines`: compile the pipeline, upload it, start a run, schedule retraining.

    python -m pipelines compile                      # -> pipelines/compiled/<profile>.yaml
    python -m pipelines run --host URL [--no-cache]  # upload as a new version, start one run
    python -m pipelines schedule --host URL          # upload (caching off), create/replace the recurring run

The image tag is the git commit (or `kfp.image_tag`, or --image-tag); `make image` builds the
images with the same tag.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from fersynth import kfp_deploy
from fersynth.errors import FersynthError
from fersynth.settings import load_settings
from pipelines.fersynth_pipeline import ROOT, build_pipeline

COMPILED = ROOT / "pipelines" / "compiled"  # one compiled pipeline per profile: <experiment name>.yaml


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise FersynthError("no git commit to tag the images with: pass --image-tag")
    return done.stdout.strip()


def compile_pipeline(output: Path, image_tag: str, params: Path = ROOT / "params.yaml") -> Path:
    from kfp import compiler

    settings = load_settings(params)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".partial-{output.name}")  # KFP wants the .yaml suffix
    compiler.Compiler().compile(build_pipeline(settings, image_tag), str(partial))
    partial.replace(output)
    return output


@click.group()
@click.option(
    "--params",
    type=click.Path(path_type=Path, exists=True),
    default=ROOT / "params.yaml",
    help="Profile to compile (default: the active one, params.yaml).",
)
@click.option("--image-tag", help="Image tag [kfp.image_tag, else the git commit].")
@click.pass_context
def cli(ctx, params: Path, image_tag: str | None) -> None:
    """Kubeflow Pipelines: compile, run, schedule."""
    settings = load_settings(params)
    ctx.obj = {"params": params, "settings": settings, "tag": image_tag or settings.kfp.image_tag}


def _tag(ctx) -> str:
    return ctx.obj["tag"] or git_commit()


@cli.command("compile")
@click.option("--output", type=click.Path(path_type=Path), help="[pipelines/compiled/<profile>.yaml]")
@click.pass_context
def compile_command(ctx, output: Path | None) -> None:
    """Compile the pipeline to YAML (commit the result: a test compares it)."""
    output = output or COMPILED / f"{ctx.obj['settings'].experiment.name}.yaml"
    path = compile_pipeline(output, _tag(ctx), ctx.obj["params"])
    click.echo(f"compiled {path} (images tagged {_tag(ctx)})")


def _params(pairs: tuple[str, ...]) -> dict:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FersynthError(f"--param {pair!r}: expected NAME=VALUE")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


@cli.command("run")
@click.option("--host", envvar="KFP_HOST", required=True, help="KFP API endpoint [KFP_HOST].")
@click.option("--param", "params", multiple=True, help="Pipeline parameter NAME=VALUE (repeatable).")
@click.option("--no-cache", is_flag=True, help="Run every step again (caching is on by default).")
@click.pass_context
def run_command(ctx, host: str, params: tuple[str, ...], no_cache: bool) -> None:
    """Upload the pipeline as a new version and start one run of it."""
    tag, kfp = _tag(ctx), ctx.obj["settings"].kfp
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(Path(scratch) / "fersynth.yaml", tag, ctx.obj["params"])
        client = kfp_deploy.client(host)
        uploaded = kfp_deploy.upload(client, package, kfp.pipeline_name, tag)
    run_id = kfp_deploy.start_run(client, uploaded, _params(params), f"fersynth {tag}", not no_cache)
    click.echo(f"started run {run_id} of {kfp.pipeline_name} version {tag}")


@cli.command("schedule")
@click.option("--host", envvar="KFP_HOST", required=True, help="KFP API endpoint [KFP_HOST].")
@click.option("--cron", help="6-field cron, seconds first [kfp.schedule_cron].")
@click.option("--param", "params", multiple=True, help="Pipeline parameter NAME=VALUE (repeatable).")
@click.pass_context
def schedule_command(ctx, host: str, cron: str | None, params: tuple[str, ...]) -> None:
    """Upload the pipeline (caching off) as a new version and create or replace the recurring
    retraining run: max concurrency 1, no catch-up."""
    tag, kfp = _tag(ctx), ctx.obj["settings"].kfp
    cron = kfp_deploy.check_cron(cron or kfp.schedule_cron)
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(Path(scratch) / "fersynth.yaml", tag, ctx.obj["params"])
        nocache = kfp_deploy.without_caching(package, Path(scratch) / "fersynth-nocache.yaml")
        client = kfp_deploy.client(host)
        uploaded = kfp_deploy.upload(client, nocache, kfp.pipeline_name, f"{tag}-retrain")
    outcome = kfp_deploy.schedule(client, uploaded, kfp.schedule_name, cron, _params(params))
    replaced = f", replacing {len(outcome['replaced'])}" if outcome["replaced"] else ""
    click.echo(f"recurring run {outcome['recurring_run_id']} ({cron}){replaced}")


def main() -> int:
    try:
        cli.main(prog_name="python -m pipelines", standalone_mode=False)
    except FersynthError as error:
        click.echo(f"pipelines: error: {error}", err=True)
        return 2
    except click.exceptions.Abort:
        return 130
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
