"""The `gridtune` command line. Every step a screen can do, a command does too."""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.curation import grading
from ..pipeline.spec.grid import load_spec
from ..pipeline.spec.project import create_project
from . import curation, data, eval as eval_cmds, generate, local, promote
from .common import emit_json, handle_errors, open_store


class _Main(click.Group):
    """`gridtune PROJECT` opens the TUI on PROJECT; `gridtune CMD ...` runs CMD."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["open", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Main, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gridtune")
@click.pass_context
def main(ctx: click.Context) -> None:
    """gridtune: build fine-tuning data on a grid, grade it, export, fine-tune, try it.

    With no command, opens the TUI on the demo project (created on first run).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(open_cmd, project=None)


@main.command("open", hidden=True)
@click.argument("project", required=False, type=click.Path(dir_okay=False, path_type=Path))
@handle_errors
def open_cmd(project: Path | None) -> None:
    """Open the TUI on PROJECT (default: the demo project)."""
    from ..tui.app import run_app

    run_app(project)


@main.command("new")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the grid spec (TOML)")
@handle_errors
def new_cmd(project: Path, spec_path: Path) -> None:
    """Create a project file PROJECT from a grid spec."""
    spec = load_spec(spec_path)
    with create_project(project, spec) as store:
        counts = store.status_counts()
    click.echo(
        f"created {project}: {spec.name}, {counts.cells:,} cells x {spec.settings.samples} "
        f"sample(s) = {counts.completions:,} completions to generate"
    )


@main.command("grade")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--by-length", is_flag=True, required=True, help="grade ungraded completions 1-5 by length quintile")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def grade_cmd(project: Path, by_length: bool, as_json: bool) -> None:
    """Grade completions automatically (a person's grade is never overwritten)."""
    with open_store(project) as store:
        result = grading.grade_by_length(store)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(result.summary())


# Each area keeps its commands in its own module and adds them to the group here.
for _area in (curation, data, eval_cmds, generate, local, promote):
    _area.register(main)

# `python -m gridtune` is the way to run it as a module (gridtune/__main__.py); run as
# __main__, this module would register its commands on a second copy of `main`.
