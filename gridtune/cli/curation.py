"""`gridtune dedup`, `stats` and `judge`: curation beyond length.

The work is in pipeline.dedup, pipeline.diversity and pipeline.judge; this module
parses options, prints and maps outcomes to exit codes (0 done, 1 some judge
calls failed, 2 bad usage or bad input with nothing written).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..pipeline.client.resolve import resolve_backend
from ..pipeline.curation import dedup as dedup_mod, diversity as diversity_mod, judge as judge_mod
from ..pipeline.spec.options import EXPORT
from ..pipeline.spec.project import load_project_spec
from .common import Failed, Problem, emit_json, handle_errors, open_store, setting_option


@click.command("dedup")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--threshold", "-t", type=float, default=dedup_mod.DEFAULT_THRESHOLD, show_default=True,
              help=f"Jaccard similarity on {dedup_mod.SHINGLE_WORDS}-word shingles at which two completions "
                   "are near-copies (0.8: the same text with about one word in 27 changed)")
@click.option("--drop", is_flag=True, help="keep the best-graded completion of each group and reject the others "
                                           "(grade 0, source 'dedup'; a person's grade is left alone)")
@click.option("--undo-drop", is_flag=True, help="withdraw every rejection an earlier --drop made")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def dedup_cmd(project: Path, threshold: float, drop: bool, undo_drop: bool, as_json: bool) -> None:
    """Group near-duplicate completions of PROJECT (MinHash/LSH over word shingles)."""
    if drop and undo_drop:
        raise Problem("--drop and --undo-drop do opposite things; give one")
    threshold = dedup_mod.check_threshold(threshold)
    with open_store(project) as store:
        if undo_drop:
            ids = dedup_mod.undo_drop(store)
            if as_json:
                emit_json({"undone": len(ids), "ids": ids})
            else:
                click.echo(f"withdrew the dedup rejection of {len(ids):,} completion(s)")
            return
        result = dedup_mod.find_duplicates(store, threshold)
        if drop:
            result.drop = dedup_mod.drop_duplicates(store, result.groups)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(result.summary())


@click.command("stats")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@setting_option(EXPORT["min_grade"],
                help="the kept set as the export's: finished, not cut off, not rejected, and graded at least N "
                     "(0..5; default: ungraded ones kept too)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def stats_cmd(project: Path, min_grade: int | None, as_json: bool) -> None:
    """Lexical diversity of the kept set vs all finished completions of PROJECT:
    compression ratio, distinct-n and Self-BLEU."""
    with open_store(project) as store:
        stats = diversity_mod.diversity_stats(store, min_grade)
    if as_json:
        emit_json(stats.to_dict())
    else:
        click.echo(stats.summary())


@click.command("judge")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help="the judge model (on the backend the environment selects)")
@click.option("--rubric", "rubric_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="a text file with the grading rubric; kept in the project for later passes "
                   "(default: the project's rubric, else one about detail and completeness)")
@click.option("--calibrate", is_flag=True,
              help="judge only what a person graded, then print the judge's agreement with the person "
                   "(Spearman, quadratic-weighted kappa, n)")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="at most N judge calls in this pass")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=4, show_default=True,
              help="judge requests in flight at once")
@click.option("--rpm", type=float, default=None, help="at most N requests in any minute")
@click.option("--tpm", type=float, default=None, help="at most N tokens in any minute")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
@handle_errors
def judge_cmd(project: Path, model: str, rubric_path: Path | None, calibrate: bool, limit: int | None,
              concurrency: int, rpm: float | None, tpm: float | None, as_json: bool) -> None:
    """Grade PROJECT's finished completions 1-5 with a judge model and a rubric.

    Grades are kept with source "judge:MODEL" and never replace a person's grade;
    completions this model graded before are skipped (a pass can be resumed).
    """
    options = judge_mod.JudgeOptions(model=model, concurrency=concurrency, rpm=rpm, tpm=tpm, limit=limit,
                                     only_person_graded=calibrate)
    options.check()
    rubric = judge_mod.read_rubric_file(rubric_path) if rubric_path is not None else None
    with open_store(project) as store:
        try:
            load_project_spec(store)
        except ValueError as exc:
            raise Problem(str(exc)) from None
        backend = resolve_backend()  # a BackendError is exit 2, before anything is written
        if rubric is not None:
            judge_mod.set_rubric(store, rubric)
    live = sys.stderr.isatty() and not as_json

    def progress(judged: int, failed: int, total: int) -> None:
        if live:
            click.echo(f"\rjudged {judged + failed:,}/{total:,} ({failed:,} failed)", err=True, nl=False)

    result = judge_mod.judge(project, options, backend=backend, on_progress=progress)
    if live:
        click.echo("", err=True)
    out = result.to_dict()
    calibration = None
    if calibrate:
        with open_store(project) as store:
            calibration = judge_mod.calibrate(store, model)
        out["calibration"] = calibration.to_dict()
    if as_json:
        emit_json(out)
    else:
        click.echo(result.summary())
        if calibration is not None:
            click.echo(calibration.summary())
    if result.exit_code:
        raise Failed(result.stopped or f"{result.failed:,} judge call(s) failed; run again to retry them")


def register(group: click.Group) -> None:
    """Add this module's commands to the ``gridtune`` group."""
    for command in (dedup_cmd, stats_cmd, judge_cmd):
        group.add_command(command)
