"""`gridtune add`: an answer a person likes, added to the training data with its values.

The command-line twin of the playground's `a` key (pipeline.promote): a finished
completion marked as written by ``--model`` and graded by the person, on a new
cell (kept through grid edits) when the values are not in the grid. The
playground's `w` key is `gridtune eval PROJECT --case 'VAR=VALUE ...'`.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.evaluation.promote import DEFAULT_GRADE, PromoteError, parse_values, promote_answer
from ..pipeline.spec.project import load_project_spec
from .common import Problem, emit_json, handle_errors, open_store


@click.command("add")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--values", "values_text", required=True, metavar="'VAR=VALUE ...'",
              help="every variable's value (new values welcome: they make a new cell)")
@click.option("--text-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="the answer's text (UTF-8)")
@click.option("--model", "-m", required=True, help="the model that wrote it")
@click.option("--grade", type=click.IntRange(1, 5), default=DEFAULT_GRADE, show_default=True,
              help="your grade")
@click.option("--finish-reason", default="stop", show_default=True,
              help="how the answer ended ('length': cut off at max tokens, left out of exports by default)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def add_cmd(project: Path, values_text: str, text_file: Path, model: str, grade: int, finish_reason: str,
            as_json: bool) -> None:
    """Add an answer to PROJECT's training data, graded by you."""
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Problem(f"{text_file}: cannot read it as UTF-8 text: {exc}") from None
    with open_store(project) as store:
        try:
            spec = load_project_spec(store)
            done = promote_answer(store, spec, parse_values(spec, values_text), text, model=model, grade=grade,
                                  finish_reason=finish_reason or None, source="cli")
        except (PromoteError, ValueError) as exc:
            raise Problem(str(exc)) from None
    if as_json:
        emit_json({"completion_id": done.completion_id, "values": done.values, "model": done.model,
                   "grade": done.grade, "where": done.where, "cut_off": done.cut_off})
    else:
        click.echo(done.summary())


def register(group: click.Group) -> None:
    """Add this module's commands to the ``gridtune`` group."""
    for command in (add_cmd,):
        group.add_command(command)
