"""`gridtune eval`: the tuned model against its base on held-out prompts.

The work is in pipeline.evaluate; this module parses options, prints the table and
maps the outcome to an exit code: 0 the tuned model is not worse; 1 it is worse
on stop rate or consistency, or answers are missing (so a script can gate on it);
2 bad usage or bad input, nothing asked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..pipeline.client.request_pool import PoolOptions
from ..pipeline.evaluation import evaluate as ev
from ..pipeline.spec.options import GENERATION
from ..pipeline.spec.project import load_project_spec
from ..pipeline.training.holdout import HoldOutError
from .common import Problem, emit_json, handle_errors, open_store, setting_option


@click.command("eval")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", help="the tuned model to evaluate")
@click.option("--against", help="the model to compare with (default: the base model of the job that made --model)")
@click.option("--samples", "-n", type=click.IntRange(1, 100), default=ev.DEFAULT_SAMPLES, show_default=True,
              help="answers per prompt and model")
@setting_option(GENERATION["temperature"], default=None, show_default=False,
                help="sampling temperature (within 0..2; default: the grid's)")
@setting_option(GENERATION["max_tokens"], default=None, show_default=False,
                help="per answer (default: twice the longest training answer, 64..1024)")
@click.option("--case", "cases", multiple=True, metavar="'VAR=VALUE ...'",
              help="add an evaluation prompt with these values (new values welcome); repeatable")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@setting_option(GENERATION["rpm"], help="requests per minute at most")
@setting_option(GENERATION["tpm"], help="tokens per minute at most")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def eval_cmd(project: Path, model: str | None, against: str | None, samples: int, temperature: float | None,
             max_tokens: int | None, cases: tuple[str, ...], concurrency: int, rpm: float | None, tpm: float | None,
             as_json: bool) -> None:
    """Ask the tuned model and its base every held-out prompt of PROJECT and compare
    stop rate, length and format consistency, repetition and faithfulness."""
    if cases:
        with open_store(project) as store:
            try:
                added = ev.add_person_cases(store, load_project_spec(store), list(cases))
            except (HoldOutError, ValueError) as exc:
                raise Problem(str(exc)) from None
        if not as_json or not model:
            click.echo(f"added {added} evaluation prompt(s) ({len(cases) - added} already there)", err=bool(model))
        if not model:
            return
    if not model:
        raise Problem("--model must name the tuned model to evaluate")
    options = ev.EvalOptions(model=model, against=against, samples=samples, temperature=temperature,
                             max_tokens=max_tokens, pool=PoolOptions(concurrency=concurrency, rpm=rpm, tpm=tpm))

    def progress(done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty():
            click.echo(f"\r  {done}/{total} answers", nl=False, err=True)

    report = ev.evaluate(project, options, on_progress=progress)
    if not as_json and sys.stderr.isatty():
        click.echo("", err=True)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.summary())
    sys.exit(report.exit_code)


def register(group: click.Group) -> None:
    """Add this module's commands to the ``gridtune`` group."""
    for command in (eval_cmd,):
        group.add_command(command)
