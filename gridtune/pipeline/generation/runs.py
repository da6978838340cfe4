"""Runs that outlive the terminal: detaching, liveness, stopping and watching.

A run lives in the project file (pid, host, heartbeat, progress), so any process
can find it: the TUI and ``status --watch`` follow it from the store, ``gridtune
stop`` asks it to stop through the store, and a run whose process died is
recognised by its process (same host: the run lock its runner holds, else its pid
and start time) or, on another host only, by its stale heartbeat.

    start_detached(project, options) -> run id   blocks ~1-2 s: call from a thread
    request_stop(project, wait_s) -> RunRecord | None
    watch(project) -> async iterator of (RunRecord, Progress) until the run ends
    read_progress(store) -> Progress | None; reconcile(store); is_alive(run)
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ...store import RunRecord, Store
from ...store.runlock import is_alive
from .generate import GenerateError, GenerateOptions, NothingToDo, nothing_to_generate, plan_run, run_params
from .progress import Progress

ADOPT_TIMEOUT_S = 30.0


def reconcile(store: Store) -> RunRecord | None:
    """The active run, after marking it 'died' (its cells back to pending) if its
    process is gone. Returns the run as it now stands, or None if there is none."""
    run = store.active_run()
    if run is None or is_alive(run, store.path):
        return run
    store.update_run(run.id, state="died", ended_at=time.time(), error="its process ended without finishing")
    store.reset_running()
    return store.get_run(run.id)


def progress_of(run: RunRecord) -> Progress:
    """A run's last saved progress, its state taken from the run row (which knows
    about stops, deaths and failures the progress snapshot may predate)."""
    progress = Progress.from_dict(run.progress) if run.progress else Progress(run_id=run.id, model=run.model)
    progress.state = run.state
    if not run.active:  # a run that ended has nothing in flight and no time left, whatever its last heartbeat said
        progress.eta_s = None
        progress.in_flight = 0
    return progress


def read_progress(store: Store) -> Progress | None:
    """The progress of the active run, else of the latest one; None if no run yet."""
    run = store.active_run() or store.latest_run()
    return progress_of(run) if run is not None else None


def log_path(project: str | os.PathLike[str]) -> Path:
    """Where a detached run of ``project`` writes its log: beside the project."""
    project = Path(project)
    return project.with_name(project.name + ".log")


def start_detached(project: str | os.PathLike[str], options: GenerateOptions) -> int:
    """Start a run in its own session (immune to the terminal closing); return its id
    once the new process has taken it over. Problems that would stop the run
    (bad options, no model, another run active) are raised here, before it starts."""
    project = Path(project).resolve()
    with Store.open(project) as store:
        if nothing := nothing_to_generate(store, options):
            raise NothingToDo(nothing)  # no empty run is recorded
        plan = plan_run(store, options)
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model=plan.model,
                                 params=run_params(plan, options), is_alive=is_alive, state="starting")
        return launch_detached(store, project, run_id, ["_run", "--options", options.to_json()], what="run")


def launch_detached(store: Store, project: Path, run_id: int, args: list[str], *, what: str) -> int:
    """Start ``python -m gridtune CMD PROJECT --run-id N ...`` in its own session (immune
    to the terminal closing), logging beside the project, and wait until it adopts
    the run record. The run is marked failed, with the log's last line, if it does not."""
    log = log_path(project)
    cmd = [sys.executable, "-m", "gridtune", args[0], str(project), "--run-id", str(run_id), *args[1:]]
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what} #{run_id}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    # Reap it when it ends if this process outlives it (the TUI), so no zombie stays.
    threading.Thread(target=proc.wait, daemon=True).start()
    deadline = time.monotonic() + ADOPT_TIMEOUT_S
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run is not None and run.pid == proc.pid:
            return run_id
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
    store.finish_run(run_id, "failed", error="the detached process did not start")
    raise GenerateError(f"the detached {what} did not start: {_last_line(log) or 'no output'} (log: {log})")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def request_stop(project: str | os.PathLike[str], wait_s: float = 10.0,
                 poll_s: float = 0.1) -> RunRecord | None:
    """Ask the project's active run to stop cleanly and wait up to ``wait_s`` for it.

    Returns the run as it then stands (check ``.active``), or None if no run was
    active. A run whose process had died is marked so, its cells back to pending.
    """
    with Store.open(project) as store:
        run = reconcile(store)
        if run is None or not run.active:
            return run
        store.request_stop(run.id)
        deadline = time.monotonic() + wait_s
        run_id = run.id
        while True:
            run = store.get_run(run_id)
            if run is not None and run.active and not is_alive(run, store.path):
                run = reconcile(store)
            if run is None or not run.active or time.monotonic() >= deadline:
                return run
            time.sleep(poll_s)


async def watch(project: str | os.PathLike[str], interval_s: float = 0.5,
                run_id: int | None = None) -> AsyncIterator[tuple[RunRecord, Progress]]:
    """Follow a run from the store: yields (run, progress) about every ``interval_s``
    until the run ends (the last item is the ended run). Follows ``run_id``, else
    the active run, else yields the latest run once."""
    with Store.open(project) as store:
        if run_id is None:
            current = reconcile(store) or store.latest_run()
            if current is None:
                return
            run_id = current.id
        while True:
            run = store.get_run(run_id)
            if run is None:
                return
            if run.active and not is_alive(run, store.path):
                run = reconcile(store) or store.get_run(run_id)
                assert run is not None
            yield run, progress_of(run)
            if not run.active:
                return
            await asyncio.sleep(interval_s)
