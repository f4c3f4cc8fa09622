"""`fersynth`: one subcommand per stage. Defaults come from params.yaml; options override them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fersynth import __version__
from fersynth.errors import FersynthError
from fersynth.settings import DEFAULT_PARAMS, Settings, load_settings, resolved_dict


class _Context:
    def __init__(self, params: Path | None, overrides: tuple[str, ...]) -> None:
        self.params = params
        self.overrides = list(overrides)

    def settings(self, extra: list[str] | None = None) -> Settings:
        path = self.params
        if path is None and DEFAULT_PARAMS.is_file():
            path = DEFAULT_PARAMS
        return load_settings(path, self.overrides + (extra or []))


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


@cli.command("params")
@click.pass_obj
def params_command(obj: _Context) -> None:
    """Validate params.yaml and print the resolved settings as JSON."""
    click.echo(json.dumps(resolved_dict(obj.settings()), indent=2, default=str))


@cli.command("demo-data")
@click.option("--output", type=click.Path(path_type=Path), help="Output folder [demo.output].")
@click.option("--seed", type=int, help="Random seed [demo.seed].")
@click.option("--train-size", type=int, help="Training images [demo.train_size].")
@click.option("--test-size", type=int, help="Test images [demo.test_size].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.pass_obj
def demo_data_command(obj: _Context, output, seed, train_size, test_size, force: bool) -> None:
    """Draw procedural demo faces in RAF-DB's folder layout (deterministic by seed)."""
    from fersynth.demo import write_demo_data

    settings = obj.settings(
        _option_overrides(
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
    type=click.Choice(["rafdb", "affectnet", "fer2013", "ferplus", "folder"]),
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
    workers,
    force: bool,
    quiet: bool,
) -> None:
    """Read RAF-DB, AffectNet, FER2013, FER+ or a split/class folder into a dataset folder.

    Writes manifest.csv, images/, the ingest report (Markdown, JSON, rejected inputs and
    duplicate groups as CSV) and the resolved settings.
    """
    from fersynth.ingest import run_ingest
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
                "ingest.workers": workers,
            }
        )
    )
    report = run_ingest(settings.ingest, seed=settings.seed, force=force, progress=not quiet)
    click.echo(markdown(report, figures=False))
    click.echo(f"report: {Path(report.output) / REPORT_MD}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes end as one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="fersynth", standalone_mode=False)
    except FersynthError as exc:
        click.echo(f"fersynth: error: {exc}", err=True)
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
