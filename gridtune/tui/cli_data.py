"""`gridtune validate` and `gridtune export`: the training file, checked."""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.export import ExportError, export_project
from ..pipeline.validate import ValidationInputError, validate_file
from .cli import main
from .cli_common import Failed, Problem, emit_json, handle_errors, open_store


@main.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", "-m", default=None,
              help="the model to fine-tune: its tokenizer, context length and price "
                   "(default gpt-4o-mini for chat files, babbage-002 for prompt/completion)")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@handle_errors
def validate_cmd(file: Path, model: str | None, as_json: bool) -> None:
    """Check a fine-tuning JSONL file as OpenAI's data-preparation tools do.

    Exit 0 when it has no errors, 1 when it has, 2 when it cannot be read.
    """
    try:
        report = validate_file(file, model)
    except ValidationInputError as exc:
        raise Problem(str(exc)) from None
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.render_text())
    if not report.ok:
        raise Failed(f"{file}: {sum(report.errors.values()):,} format error(s)")


@main.command("export")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="the training file to write (FILE.jsonl)")
@click.option("--format", "fmt", type=click.Choice(["chat", "completion"]), default="chat", show_default=True,
              help="chat messages, or the legacy prompt/completion format")
@click.option("--min-grade", type=int, default=None, help="keep only completions graded at least N (0..5)")
@click.option("--separator", default=None, help="end every prompt with S (completion format; default: one absent from the data)")
@click.option("--stop", default=None, help="end every completion with S (completion format; default: one absent from the data)")
@click.option("--validation-fraction", type=float, default=0.0, show_default=True,
              help="put this deterministic fraction in [0, 1) into FILE-stem.valid.jsonl")
@click.option("--model", "-m", default=None, help="the model to fine-tune, for token counts and the cost estimate")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def export_cmd(project: Path, output: Path, fmt: str, min_grade: int | None, separator: str | None,
               stop: str | None, validation_fraction: float, model: str | None, as_json: bool) -> None:
    """Write the kept completions of PROJECT as a fine-tuning file, and validate it.

    Rejected completions (grade 0) are never exported.
    """
    with open_store(project) as store:
        try:
            result = export_project(
                store, output, format=fmt, min_grade=min_grade, separator=separator, stop=stop,
                validation_fraction=validation_fraction, model=model,
            )
        except ExportError as exc:
            raise Problem(str(exc)) from None
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(result.summary())
    if not result.ok:
        raise Failed(f"{output}: the exported file has format errors")
