"""`gridtune validate`, `export` and `coverage`: the training file, checked, and what it covers."""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.curation.coverage import DEFAULT_THIN, coverage
from ..pipeline.format.validate import validate_file
from ..pipeline.generation.estimate import backend_for_costs
from ..pipeline.spec.options import EXPORT
from ..pipeline.spec.project import load_project_spec
from ..pipeline.training.export import export_project
from ..pipeline.training.holdout import parse_hold_out
from .common import Failed, Problem, emit_json, handle_errors, open_store, setting_option


@click.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", "-m", default=None,
              help="the model to fine-tune: its tokenizer, context length and price. OpenAI still tunes "
                   "gpt-4o-mini-2024-07-18 (the default for chat files), gpt-4o-2024-08-06, gpt-4.1-2025-04-14 "
                   "and gpt-4.1-mini-2025-04-14, but takes no new jobs from 2027-01-06 and shuts them down "
                   "2027-01-14; prompt/completion files count the retired babbage-002's tokens, no cost given")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@handle_errors
def validate_cmd(file: Path, model: str | None, as_json: bool) -> None:
    """Check a fine-tuning JSONL file as OpenAI's data-preparation tools do.

    Exit 0 when it has no errors, 1 when it has, 2 when it cannot be read.
    """
    report = validate_file(file, model)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.render_text())
    if not report.ok:
        raise Failed(f"{file}: {sum(report.errors.values()):,} format error(s)")


@click.command("export")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="the training file to write (FILE.jsonl)")
@click.option("--format", "fmt", type=click.Choice(["chat", "completion"]), default="chat", show_default=True,
              help="chat messages, or the legacy prompt/completion format")
@setting_option(EXPORT["min_grade"])
@click.option("--separator", default=None,
              help="end every prompt with S (completion format; default: one absent from the data)")
@click.option("--stop", default=None,
              help="end every completion with S (completion format; default: one absent from the data)")
@setting_option(EXPORT["validation_fraction"])
@click.option("--model", "-m", default=None, help="the model to fine-tune, for token counts and the cost estimate")
@click.option("--include-cut-off", is_flag=True,
              help="keep completions cut off at max tokens (left out by default; written without the stop)")
@click.option("--hold-out", "hold_out", multiple=True, metavar="VAR=VALUE",
              help="keep every cell with this value out of training, for `gridtune eval`; repeatable")
@click.option("--hold-out-combos", type=click.IntRange(0), default=0,
              help="also keep N whole combinations out (every value keeps a training cell)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def export_cmd(project: Path, output: Path, fmt: str, min_grade: int | None, separator: str | None,
               stop: str | None, validation_fraction: float, model: str | None, include_cut_off: bool,
               hold_out: tuple[str, ...], hold_out_combos: int, as_json: bool) -> None:
    """Write the kept completions of PROJECT as a fine-tuning file, and validate it.

    Rejected completions (grade 0) are never exported; completions cut off at max
    tokens only with --include-cut-off. The cost line follows the backend in use:
    no charge and a training time on the local server, a model OpenAI still tunes.
    """
    with open_store(project) as store:
        held = parse_hold_out(load_project_spec(store), hold_out, hold_out_combos) if (
            hold_out or hold_out_combos) else None
        result = export_project(
            store, output, format=fmt, min_grade=min_grade, separator=separator, stop=stop,
            validation_fraction=validation_fraction, model=model, include_cut_off=include_cut_off,
            hold_out=held, backend=backend_for_costs(),
        )
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(result.summary())
    if not result.ok:
        raise Failed(f"{output}: the exported file has format errors")


@click.command("coverage")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@setting_option(EXPORT["min_grade"],
                help="count only examples graded at least N (0..5) as kept "
                     "(as export --min-grade; default: ungraded count)")
@click.option("--threshold", type=int, default=DEFAULT_THIN, show_default=True,
              help="a value or pair with fewer kept examples is thin")
@click.option("--json", "as_json", is_flag=True, help="print the table as one JSON object")
@handle_errors
def coverage_cmd(project: Path, min_grade: int | None, threshold: int, as_json: bool) -> None:
    """How many kept examples each variable value and each pair of values has.

    Kept: finished, not rejected, not cut off at max tokens, graded at least
    --min-grade when given. Thin (under --threshold) and empty ones are marked;
    `gridtune generate PROJECT --top-up N` fills them.
    """
    if threshold < 1:
        raise Problem(f"--threshold must be at least 1, not {threshold}")
    with open_store(project) as store:
        try:
            table = coverage(store, min_grade=min_grade, threshold=threshold)
        except ValueError as exc:
            raise Problem(str(exc)) from None
    if as_json:
        emit_json(table.to_dict())
    else:
        click.echo(table.render_text())


def register(group: click.Group) -> None:
    """Add this module's commands to the ``gridtune`` group."""
    for command in (validate_cmd, export_cmd, coverage_cmd):
        group.add_command(command)
