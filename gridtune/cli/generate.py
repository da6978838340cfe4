"""`gridtune generate`, `stop` and `status`: runs that outlive the terminal.

The work is in pipeline.generate (the runner) and pipeline.runs (detach, stop,
watch); this module parses options, draws progress on stderr and maps outcomes
to exit codes: 0 all done or a requested stop, 1 some completions failed,
2 bad usage, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn

from ..pipeline.curation.coverage import plan_top_up
from ..pipeline.generation import batch as batch_api, runs
from ..pipeline.generation.generate import (
    GenerateOptions,
    RunResult,
    budget_line,
    nothing_to_generate,
    preview_run,
    run_generation,
    select_work,
)
from ..pipeline.generation.progress import RETRY_KINDS, Progress, format_duration
from ..pipeline.spec.grid_edit import save_generation_defaults
from ..pipeline.spec.options import EXPORT, GENERATION
from ..store import RunRecord, batches as stored_batches
from ..store.runlock import suspended
from .common import Failed, Problem, emit_json, handle_errors, open_store, setting_option

EXIT_INTERRUPTED = 130
PLAIN_EVERY_S = 5.0  # progress line interval when stderr is not a terminal (logs)


class ProgressDisplay:
    """A rich progress bar on stderr; plain lines every few seconds when stderr is a file."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._last_plain = 0.0
        self._bar: RichProgress | None = None
        self._task: Any = None

    def update(self, p: Progress) -> None:
        if not self.live:
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_EVERY_S or p.state not in ("running", "starting"):
                self._last_plain = now
                self.console.print(p.summary(), highlight=False, soft_wrap=True)
            return
        fields = {
            "failed": p.failed, "rate": f"{p.requests_per_s:.1f}/s {p.tokens_per_s:,.0f} tok/s",
            "eta": f"ETA {format_duration(p.eta_s)}" if p.eta_s is not None else "",
            "cost": f"${p.cost_usd:.4f}" if p.cost_usd else "",
            "note": p.phase or (p.retry_text() if p.retries else ""),
        }
        if self._bar is None:
            self._bar = RichProgress(
                TextColumn(f"run #{p.run_id}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed"), TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[cost]}"),
                TextColumn("[yellow]{task.fields[note]}"),
                console=self.console, transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("generate", total=p.total, **fields)
        self._bar.update(self._task, total=p.total, completed=p.done + p.failed, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _options(concurrency: int | None, rpm: float | None, tpm: float | None, limit: int | None, model: str | None,
             temperature: float | None, max_tokens: int | None, timeout: float, max_attempts: int,
             stream: bool | None = None, **curation: Any) -> GenerateOptions:
    options = GenerateOptions(concurrency=concurrency, rpm=rpm, tpm=tpm, limit=limit, model=model,
                              temperature=temperature, max_tokens=max_tokens, timeout_s=timeout,
                              max_attempts=max_attempts, stream=stream, **curation)
    options.check()
    return options


def _preview(project: Path, options: GenerateOptions) -> None:
    """Before a run: the time estimate and any note on the settings, on stderr. It
    starts the local server when the run will need it (with its own progress lines)."""
    plan, estimate = preview_run(project, options)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    _curation_note(project, options)
    how = f"concurrency {plan.concurrency}" + (", streaming" if plan.stream else "")
    click.echo(f"estimate: {estimate.text} [{how}]", err=True)
    if options.max_cost is not None:
        with open_store(project) as store:
            click.echo(budget_line(store, plan, options), err=True)


def _curation_note(project: Path, options: GenerateOptions) -> None:
    """What a redo or a top-up is about to do, on stderr, before it starts."""
    if options.redo_cut_off:
        with open_store(project) as store:
            n = len(select_work(store, options))
            cut = store.status_counts().cut_off
        skipped = f"; {cut - n:,} already redone with {options.max_tokens:,}" if cut > n else ""
        click.echo(f"redo: {n:,} cut-off completion(s) with max_tokens {options.max_tokens:,}"
                   f" (each keeps its text until the new one arrives){skipped}", err=True)
    elif options.top_up is not None:
        with open_store(project) as store:
            plan = plan_top_up(store, options.top_up, min_grade=options.min_grade)
        click.echo(plan.summary(), err=True)
        if plan.unreachable:
            click.echo(f"note: no cell of the grid holds {', '.join(plan.unreachable[:3])}", err=True)


def _run_here(project: Path, options: GenerateOptions, *, run_id: int | None, detached: bool,
              batch: batch_api.BatchOptions | None = None) -> tuple[RunResult, int | None]:
    """Run in this process until done or stopped; returns the result and the signal that stopped it."""
    display = ProgressDisplay()
    got: list[int] = []

    async def go() -> RunResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            got.append(sig)
            stop.set()

        # SIGHUP: a detached run ignores it; a foreground run whose terminal went away stops cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM) + (() if detached else (signal.SIGHUP,)):
            loop.add_signal_handler(sig, on_signal, sig)
        if batch is not None:
            return await batch_api.run_batch(project, batch, on_progress=display.update, stop_event=stop,
                                             run_id=run_id)
        return await run_generation(project, options, on_progress=display.update, stop_event=stop, run_id=run_id)

    try:
        result = asyncio.run(go())
    finally:
        display.close()
    return result, got[0] if got else None


def _report(project: Path, result: RunResult, stopped_by: int | None) -> int:
    p = result.progress
    line = (f"run #{result.run_id} {result.state}: {p.done:,} done, {p.failed:,} failed of {p.total:,} "
            f"in {format_duration(p.elapsed_s)}")
    if p.cost_usd:
        line += f", ${p.cost_usd:.4f}"
    with open_store(project) as store:
        counts = store.status_counts()
        failures = store.failure_reasons(run_id=result.run_id, limit=3)
    click.echo(line + f"; project: {counts.done:,} done, {counts.failed:,} failed, "
               f"{counts.pending + counts.running:,} pending")
    for error, n in failures:
        click.echo(f"  {n:,} x {error}", err=True)
    if result.budget_reached:
        click.echo(f"stopped before spending more than --max-cost (spent about ${result.spent or 0:.4f}); "
                   f"run it again to go on", err=True)
    if result.state == "stopped" and stopped_by == signal.SIGINT:
        return EXIT_INTERRUPTED
    return result.exit_code


@click.command("generate")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@setting_option(GENERATION["concurrency"])
@setting_option(GENERATION["rpm"])
@setting_option(GENERATION["tpm"])
@setting_option(GENERATION["limit"])
@setting_option(GENERATION["model"])
@setting_option(GENERATION["temperature"], default=None, show_default=False,
                help="this run's temperature (within 0..2; default: the spec's)")
@setting_option(GENERATION["max_tokens"], default=None, show_default=False,
                help="this run's max tokens (default: the spec's)")
@click.option("--save-defaults", is_flag=True,
              help="also save --model, --temperature and --max-tokens as the grid's defaults (the spec's [generation])")
@setting_option(GENERATION["timeout"])
@click.option("--stream/--no-stream", default=None,
              help="stream replies (default: yes for the local and compatible servers, no for OpenAI)")
@setting_option(GENERATION["max_attempts"])
@setting_option(GENERATION["max_cost"], metavar="USD",
                help="stop cleanly before the run could spend more than USD (a priced model; the bound is shown first)")
@click.option("--detach", is_flag=True, help="run in the background, immune to the terminal closing")
@click.option("--batch", "use_batch", is_flag=True,
              help="through the provider's Batch API: half the price, results within 24 h; run it again (or "
                   "`gridtune status`) to pick up a batch in progress")
@click.option("--redo-cut-off", is_flag=True,
              help="regenerate the completions cut off at max tokens, with --max-tokens N (required)")
@setting_option(GENERATION["top_up"], metavar="N")
@setting_option(EXPORT["min_grade"],
                help="with --top-up: count only examples graded at least N (0..5) as kept (as export --min-grade)")
@handle_errors
def generate_cmd(project: Path, concurrency: int | None, rpm: float | None, tpm: float | None, limit: int | None,
                 model: str | None, temperature: float | None, max_tokens: int | None, save_defaults: bool,
                 timeout: float, stream: bool | None, max_attempts: int, detach: bool, use_batch: bool,
                 redo_cut_off: bool, top_up: int | None, min_grade: int | None, max_cost: float | None) -> None:
    """Generate every pending or failed completion of PROJECT with the teacher model.

    Each completion is saved the moment it arrives; run it again to resume.
    Ctrl-C stops cleanly (exit 130). Exit 0 when all is done, 1 when some failed.

    --redo-cut-off --max-tokens N regenerates exactly the completions cut off at
    max tokens (generated with fewer than N); each keeps its text until the new
    one arrives, whose grades start afresh. --top-up N adds new samples (new
    seeds) to the cells the thin values and pairs of `gridtune coverage` need.

    --model, --temperature and --max-tokens apply to this run (it records them);
    the spec's [generation] keeps its defaults unless --save-defaults saves them
    there too. The TUI's generate screen follows the same rule (ctrl+s in its
    options saves them as the defaults). A project with nothing left to generate
    says so and starts no run.

    --batch sends the pending cells as batches (split at 50,000 requests or
    200 MB a file) and follows them until their results are in the cells; errors
    are retried by a new batch (up to --max-attempts batches a cell). Killed or
    detached, it loses nothing: `generate --batch` again (or `status`) picks up
    the batches in progress.
    """
    if min_grade is not None and top_up is None:
        raise Problem("--min-grade applies to --top-up only")
    options = _options(concurrency, rpm, tpm, limit, model, temperature, max_tokens, timeout, max_attempts, stream,
                       redo_cut_off=redo_cut_off, top_up=top_up, min_grade=min_grade, max_cost=max_cost)
    if use_batch:
        if redo_cut_off or top_up is not None:
            raise Problem("--batch generates pending cells only; run --redo-cut-off or --top-up without --batch")
        if max_cost is not None:  # a batch is sent whole: nothing could stop it part-way
            raise Problem("--max-cost applies to live runs, not --batch (a batch is sent whole; its estimate "
                          "gives the price first)")
        _batch(project, options, detach=detach, max_attempts=max_attempts)
        return
    with open_store(project) as store:  # a missing or broken project is exit 2 before anything starts
        if note := batch_api.open_batch_note(store):
            raise Problem(note)
        if save_defaults:
            if save_generation_defaults(store, model=model, temperature=temperature, max_tokens=max_tokens):
                given = {"model": model, "temperature": temperature, "max_tokens": max_tokens}
                click.echo("saved as the grid's defaults: "
                           + ", ".join(f"{k} {v}" for k, v in given.items() if v is not None), err=True)
        if nothing := nothing_to_generate(store, options):
            click.echo(nothing)  # not an error: no run is started, exit 0
            return
    _preview(project, options)
    if detach:
        run_id = runs.start_detached(project, options)
        click.echo(f"run #{run_id} started in the background (log: {runs.log_path(project)})")
        click.echo(f"follow it with `gridtune status {project} --watch`; stop it with `gridtune stop {project}`",
                   err=True)
        return
    result, stopped_by = _run_here(project, options, run_id=None, detached=False)
    sys.exit(_report(project, result, stopped_by))


def _batch_options(options: GenerateOptions, max_attempts: int) -> batch_api.BatchOptions:
    bopts = batch_api.BatchOptions(generate=options, max_attempts=min(max_attempts, 3))
    bopts.check()
    return bopts


def _batch(project: Path, options: GenerateOptions, *, detach: bool, max_attempts: int) -> None:
    """`generate --batch`: the estimate at the batch price, then follow (here or detached)."""
    bopts = _batch_options(options, max_attempts)
    with open_store(project) as store:
        open_ = stored_batches.open_batches(store)
        if not open_ and (nothing := nothing_to_generate(store, options)):
            click.echo(nothing)
            return
    if open_:
        click.echo(f"picking up {len(open_)} batch(es) in progress: "
                   + ", ".join(b.batch_id or f"#{b.id} (not yet sent)" for b in open_), err=True)
    else:
        plan, _estimate = preview_run(project, options)
        with open_store(project) as store:
            click.echo(f"estimate: {batch_api.estimate_text(store, plan, bopts)}", err=True)
    if detach:
        run_id = batch_api.start_detached_batch(project, bopts)
        click.echo(f"batch run #{run_id} following in the background (log: {runs.log_path(project)})")
        click.echo(f"follow it with `gridtune status {project} --watch`; stop following with `gridtune stop "
                   f"{project}` (the batch goes on at the provider; `generate --batch` picks it up)", err=True)
        return
    result, stopped_by = _run_here(project, options, run_id=None, detached=False, batch=bopts)
    sys.exit(_report(project, result, stopped_by))


@click.command("_batch", hidden=True)
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-id", type=int, required=True)
@click.option("--options", "options_json", required=True)
@handle_errors
def detached_batch_cmd(project: Path, run_id: int, options_json: str) -> None:
    """The process behind `generate --batch --detach`: adopts the recorded run and follows the batches."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    bopts = batch_api.BatchOptions.from_json(options_json)
    result, stopped_by = _run_here(project, bopts.generate, run_id=run_id, detached=True, batch=bopts)
    sys.exit(_report(project, result, stopped_by))


@click.command("_run", hidden=True)
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-id", type=int, required=True)
@click.option("--options", "options_json", required=True)
@handle_errors
def detached_run_cmd(project: Path, run_id: int, options_json: str) -> None:
    """The process behind `generate --detach`: adopts the recorded run and runs it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal that started us may close
    options = GenerateOptions.from_json(options_json)
    result, stopped_by = _run_here(project, options, run_id=run_id, detached=True)
    sys.exit(_report(project, result, stopped_by))


@click.command("stop")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--wait", "wait_s", type=float, default=30.0, show_default=True,
              help="seconds to wait for the run to stop")
@handle_errors
def stop_cmd(project: Path, wait_s: float) -> None:
    """Ask the generation running on PROJECT to stop cleanly, and wait for it."""
    if wait_s < 0:
        raise Problem(f"--wait must be 0 or more, not {wait_s}")
    open_store(project).close()
    run = runs.request_stop(project, wait_s=wait_s)
    if run is None:
        click.echo(f"no run in progress on {project}")
    elif run.state == "died":
        click.echo(f"run #{run.id} had died (pid {run.pid} on {run.host}); its cells are pending again")
    elif run.active and wait_s == 0:
        click.echo(f"asked run #{run.id} to stop (pid {run.pid} on {run.host})")
    elif run.active:
        hint = (f"; its process is suspended (Ctrl-Z, SIGSTOP): it stops once resumed (`kill -CONT {run.pid}`)"
                if suspended(run) else "")
        raise Failed(f"run #{run.id} asked to stop but still {run.state} after {wait_s:g}s "
                     f"(pid {run.pid} on {run.host}){hint}")
    else:
        p = runs.progress_of(run)
        counts = f": {p.done:,} done, {p.failed:,} failed" if run.progress else ""
        click.echo(f"run #{run.id} {run.state}{counts}")


def _run_dict(run: RunRecord | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"id": run.id, "state": run.state, "active": run.active, "pid": run.pid, "host": run.host,
            "model": run.model, "started_at": run.started_at, "heartbeat_at": run.heartbeat_at,
            "ended_at": run.ended_at, "error": run.error, "progress": run.progress}


def _batch_lines(records: list[stored_batches.BatchRecord]) -> list[str]:
    lines = []
    for b in records:
        c = b.counts
        done = f" {c.get('completed', 0) + c.get('failed', 0):,}/{c.get('total') or b.requests:,}" if c else ""
        state = "open" if b.open else "results written"
        lines.append(f"  batch {b.batch_id or '#' + str(b.id)} {b.status}{done} ({b.requests:,} requests, "
                     f"{state})" + (f": {b.error}" if b.error else ""))
    return lines


def _status_text(project: Path, counts: dict[str, Any], run: RunRecord | None,
                 batches: list[stored_batches.BatchRecord] | None = None) -> str:
    grades = " ".join(f"{g}:{n}" for g, n in counts["grades"].items())
    lines = [
        f"{project}: {counts['cells']:,} cells, {counts['completions']:,} completions",
        f"  done {counts['done']:,}  failed {counts['failed']:,}  pending {counts['pending']:,}"
        f"  running {counts['running']:,}",
        f"  graded {counts['graded']:,} ({grades})  rejected {counts['rejected']:,}"
        + (f"  cut off {counts['cut_off']:,} (hit max tokens)" if counts.get("cut_off") else ""),
    ]
    if run is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
        lines.append(f"  run #{run.id} {run.state} (pid {run.pid} on {run.host}, started {when})")
        if run.progress:
            progress = runs.progress_of(run)
            lines.append("    " + progress.summary())
            if progress.estimate:
                lines.append(f"    estimated at its start: {progress.estimate}")
        if run.error:
            lines.append(f"    error: {run.error}")
    lines += _batch_lines(batches or [])
    return "\n".join(lines)


@click.command("status")
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--watch", is_flag=True, help="follow the run in progress until it ends (Ctrl-C detaches)")
@handle_errors
def status_cmd(project: Path, as_json: bool, watch: bool) -> None:
    """Counts of PROJECT's cells, completions and grades, and its generation run."""
    with open_store(project) as store:
        active = runs.reconcile(store)  # a run whose process died is marked so here
    note = None
    if active is None or not active.active:  # a batch nobody follows: write what has arrived
        note = batch_api.sync_open_batches(project)
    if watch and active is not None and active.active:
        _watch(project, active.id)
    with open_store(project) as store:
        counts = store.status_counts().to_dict()
        run = store.active_run() or store.latest_run()
        batches = stored_batches.open_batches(store) or stored_batches.latest_batches(store, 1)
    if as_json:
        progress = runs.progress_of(run) if run is not None and run.progress else None
        reasons = {kind: 0 for kind in RETRY_KINDS}
        if progress is not None:
            reasons.update(progress.retry_reasons)
        emit_json({**counts, "retries": progress.retries if progress else 0, "retry_reasons": reasons,
                   "run": _run_dict(run), "batches": stored_batches.batch_dicts(batches)})
    else:
        click.echo(_status_text(project, counts, run, batches))
    if note:
        click.echo(note, err=True)


def _watch(project: Path, run_id: int) -> None:
    display = ProgressDisplay()

    async def follow() -> None:
        async for _run, progress in runs.watch(project, run_id=run_id):
            display.update(progress)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        display.close()
        click.echo(f"detached from run #{run_id}; it goes on (stop it with `gridtune stop {project}`)", err=True)
    finally:
        display.close()


def register(group: click.Group) -> None:
    """Add this module's commands to the ``gridtune`` group."""
    for command in (generate_cmd, detached_batch_cmd, detached_run_cmd, stop_cmd, status_cmd):
        group.add_command(command)
