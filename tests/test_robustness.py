"""Runs and bad input under stress, each as the fault would do it (issue 8, points
3 and 5): a run stopped with SIGSTOP past the heartbeat window, a run taken over
while stopped, a 10^9-sample grid, a read-only or locked or damaged project, a
base URL with credentials, a 40 MB one-line training file. Real SQLite files,
real processes, a real HTTP server (tests/fakeserver.py)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from gridtune.core.proc import pid_alive
from gridtune.pipeline.generation import runs
from gridtune.store import Store, runlock
from tests.fakeserver import TEST_KEY, Fault
from tests.test_generate import make_project
from tests.test_runs import GRIDTUNE, detached_pids, done_texts, latest, wait_for  # noqa: F401

WINDOW_S = 1.0  # the heartbeat window the runs under test are given


def gridtune(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTUNE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def short_window(monkeypatch):
    """Every gridtune process of the test (they inherit the environment) judges
    heartbeats by a 1 s window, so 'longer than the window' is seconds, not 30."""
    monkeypatch.setenv(runlock.STALE_ENV, str(WINDOW_S))
    monkeypatch.setenv("GRIDTUNE_BUSY_TIMEOUT_S", "0.5")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's answer to bad input: exit 2, one error line (the last on stderr), no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("gridtune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


# -- liveness: a stopped run is alive; a taken-over one writes nothing more ------------


def start_detached(tmp_path, fake_openai, detached_pids, *, latency: float, done: int):
    """A 30-cell project whose detached run (2 at a time) has finished ``done`` cells."""
    path = make_project(tmp_path, n_a=6, n_b=5)
    fake_openai.set(latency=latency)
    assert gridtune("generate", str(path), "--detach", "--concurrency", "2").returncode == 0
    first = latest(path)
    detached_pids.append(first.pid)
    wait_for(lambda: len(done_texts(path)) >= done)
    return path, first


def test_a_run_stopped_past_the_heartbeat_window_stays_alive_and_nothing_is_generated_twice(
        tmp_path, fake_openai, detached_pids, short_window):
    path, first = start_detached(tmp_path, fake_openai, detached_pids, latency=0.2, done=4)

    os.kill(first.pid, signal.SIGSTOP)  # Ctrl-Z, or a debugger, or a frozen VM
    try:
        time.sleep(3 * WINDOW_S)
        stopped = latest(path)
        assert time.time() - stopped.heartbeat_at > 2 * WINDOW_S  # no heartbeat for far longer than the window
        status = gridtune("status", str(path), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["run"]["state"] == "running"  # not "died"
        for args in (("generate", str(path)), ("generate", str(path), "--detach")):
            second = gridtune(*args)
            line = one_line_error(second)
            assert f"run #{first.id} is already running on this project (pid {first.pid}" in line
        with Store.open(path) as store:
            assert [r.id for r in (store.latest_run(),)] == [first.id]  # no second run recorded
    finally:
        os.kill(first.pid, signal.SIGCONT)

    finished = wait_for(lambda: (r := latest(path)).state == "finished" and r, timeout=60)
    assert finished.id == first.id and finished.progress["done"] == 30
    prompts = collections.Counter(r.prompt for r in fake_openai.chat_requests())
    assert len(prompts) == 30 and max(prompts.values()) == 1  # each prompt asked exactly once
    assert len(done_texts(path)) == 30


def test_stop_reaches_a_stopped_run_once_it_is_resumed(tmp_path, fake_openai, detached_pids, short_window):
    path, first = start_detached(tmp_path, fake_openai, detached_pids, latency=0.3, done=2)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        time.sleep(2 * WINDOW_S)
        stop = gridtune("stop", str(path), "--wait", "1")
        assert stop.returncode == 1, stop.stderr
        assert "suspended" in stop.stderr and f"kill -CONT {first.pid}" in stop.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stopped = wait_for(lambda: (r := latest(path)).state == "stopped" and r, timeout=30)
    assert stopped.id == first.id
    prompts = collections.Counter(r.prompt for r in fake_openai.chat_requests())
    assert max(prompts.values()) == 1
    with Store.open(path) as store:
        assert {c.status for c in store.completions()} == {"done", "pending"}


def test_a_runner_whose_run_was_taken_over_stops_at_once_and_writes_nothing_more(
        tmp_path, fake_openai, detached_pids, short_window):
    path, first = start_detached(tmp_path, fake_openai, detached_pids, latency=0.3, done=2)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        # Another host (that can only judge by the heartbeat) declares it dead and takes its cells back.
        for _ in range(20):  # the stopped runner may hold a write for a moment: retry
            try:
                with Store.open(path) as store:
                    store.update_run(first.id, state="died", ended_at=time.time(), error="declared dead elsewhere")
                    store.reset_running()
                break
            except Exception:  # noqa: BLE001 - locked: let it finish its commit
                os.kill(first.pid, signal.SIGCONT)
                time.sleep(0.05)
                os.kill(first.pid, signal.SIGSTOP)
        before = done_texts(path)
        with Store.open(path) as store:
            before_rows = {c.id: (c.status, c.updated_at) for c in store.completions()}
    finally:
        os.kill(first.pid, signal.SIGCONT)
    wait_for(lambda: not pid_alive(first.pid), timeout=15)  # it stops at once (a beat, not the whole grid)
    with Store.open(path) as store:
        after_rows = {c.id: (c.status, c.updated_at) for c in store.completions()}
        run = store.get_run(first.id)
    assert after_rows == before_rows  # not one write after it was declared dead
    assert done_texts(path) == before
    assert run.state == "died" and run.error == "declared dead elsewhere"
    assert f"run #{first.id} was marked died by another process" in runs.log_path(path).read_text()


def test_a_second_run_cannot_start_while_the_first_holds_the_run_lock(tmp_path, fake_openai, short_window):
    from gridtune.store import RunConflict

    path = make_project(tmp_path, n_a=2, n_b=2)
    with Store.open(path) as first:
        run_id = first.start_run(pid=os.getpid(), host="here", model="m", params=None, is_alive=runlock.is_alive)
        assert first.holds_run_lock and runlock.is_alive(latest(path), path)
        # Even a run record that looks dead (another host, no heartbeat for ages) is alive while its lock is held.
        first.update_run(run_id, heartbeat_at=time.time() - 3600, host="elsewhere")
        assert runlock.is_alive(latest(path), path)
        with Store.open(path) as second, pytest.raises(RunConflict, match=f"run #{run_id} is already running"):
            second.start_run(pid=os.getpid(), host="here", model="m", params=None, is_alive=lambda r: False)
        first.finish_run(run_id, "stopped")
        assert not first.holds_run_lock
    with Store.open(path) as second:
        assert second.start_run(pid=os.getpid(), host="here", model="m", params=None, is_alive=runlock.is_alive)


# -- the grid's size and atomic creation ---------------------------------------------------


def spec_file(tmp_path: Path, samples: int, max_cells: int | None = None) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        ("" if max_cells is None else f"max_cells = {max_cells}\n")
        + 'name = "big"\n[prompt]\ngeneration = "Write about {a}."\n'
        + f'[variables]\na = [1, 2, 3, 4]\n[generation]\nsamples = {samples}\n'
    )
    return spec


@pytest.mark.parametrize("samples, max_cells", [(1_000_000_000, None), (1_000_000_000, 10**12), (2_000_000, 10**9)])
def test_a_giant_grid_is_refused_at_once_and_leaves_nothing(tmp_path, samples, max_cells):
    project = tmp_path / "big.gridtune"
    started = time.monotonic()
    result = gridtune("new", str(project), "--spec", str(spec_file(tmp_path, samples, max_cells)), timeout=30)
    line = one_line_error(result)
    assert time.monotonic() - started < 20
    assert "completions" in line and "limit" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]  # no project, no temp file


def test_a_failed_new_leaves_nothing_behind(tmp_path):
    # The spec is fine; the store refuses mid-way (the folder becomes unwritable for the rename).
    from gridtune.pipeline.spec.grid import parse_spec
    from gridtune.pipeline.spec.project import create_project

    spec = parse_spec(spec_file(tmp_path, 2).read_text())
    project = tmp_path / "p.gridtune"
    project.write_text("someone else's file")
    with pytest.raises(Exception, match="already exists"):
        create_project(project, spec)
    assert project.read_text() == "someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gridtune", "spec.toml"]
    project.unlink()
    create_project(project, spec).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gridtune", "spec.toml"]
    result = gridtune("status", str(project), "--json")
    assert json.loads(result.stdout)["completions"] == 8


# -- SQLite errors: one line, exit 2 -----------------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` read-only for gridtune even when the tests run as root
    (root ignores file modes, not the immutable attribute)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a file read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def test_new_in_a_read_only_folder_is_one_line_and_leaves_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder):
        line = one_line_error(gridtune("new", str(folder / "p.gridtune"), "--spec", str(spec_file(tmp_path, 1))))
        assert f"{folder / 'p.gridtune'}: cannot create the project" in line and ".creating" not in line
        assert list(folder.iterdir()) == []


def graded_project(tmp_path: Path) -> Path:
    path = make_project(tmp_path, n_a=3, n_b=2)
    with Store.open(path) as store:
        for n, item in enumerate(store.pending_work()):
            store.save_done(item.completion_id, text="word " * (n + 1), model="m", params=None, prompt_tokens=1,
                            completion_tokens=n + 1, latency_s=0.1, finish_reason="stop", attempts=1)
    return path


def test_a_read_only_project_is_one_line_and_exit_2(tmp_path):
    path = graded_project(tmp_path)
    before = path.read_bytes()
    with read_only(path):
        line = one_line_error(gridtune("grade", str(path), "--by-length"))
        assert "read-only" in line and str(path) in line
        out = tmp_path / "train.jsonl"
        line = one_line_error(gridtune("export", str(path), "-o", str(out)))
        assert "read-only" in line
        assert sorted(p.name for p in tmp_path.iterdir() if "jsonl" in p.name) == []  # no export file, no temp
        status = gridtune("status", str(path), "--json")  # reading still works
        assert status.returncode == 0 and json.loads(status.stdout)["done"] == 6
    assert path.read_bytes() == before
    with Store.open(path) as store:
        assert store.exports() == [] and store.status_counts().graded == 0


def test_a_locked_project_is_one_line_and_exit_2(tmp_path, short_window):
    path = graded_project(tmp_path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is in the middle of a write
    try:
        line = one_line_error(gridtune("grade", str(path), "--by-length"))
        assert "locked" in line and str(path) in line
        out = tmp_path / "train.jsonl"
        line = one_line_error(gridtune("export", str(path), "-o", str(out)))
        assert "locked" in line
        assert not out.exists() and not list(tmp_path.glob(".train*"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert gridtune("grade", str(path), "--by-length").returncode == 0
    result = gridtune("export", str(path), "-o", str(tmp_path / "train.jsonl"), "--json")
    assert result.returncode == 0, result.stderr
    with Store.open(path) as store:
        assert [Path(e.path).name for e in store.exports()] == ["train.jsonl"]


def test_a_damaged_project_is_one_line_and_exit_2(tmp_path):
    path = graded_project(tmp_path)
    with Store.open(path) as store:
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(page, len(data), page):  # every page but the header's: garbage
        data[start + 8:start + 200] = b"\xff" * 192
    path.write_bytes(bytes(data))
    for args in (("status", str(path)), ("grade", str(path), "--by-length"),
                 ("export", str(path), "-o", str(tmp_path / "t.jsonl"))):
        line = one_line_error(gridtune(*args))
        assert str(path) in line


def test_a_full_disk_is_one_line(tmp_path):
    from gridtune.store import describe_sqlite_error

    path = graded_project(tmp_path)
    with Store.open(path) as store:
        pages = store._one("PRAGMA page_count")[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")  # this connection's disk is now full
        with pytest.raises(sqlite3.Error) as caught:
            store.set_grades([(c.id, 3) for c in store.completions()] * 200, "person")
    line = describe_sqlite_error(caught.value, path)
    assert "disk is full" in line and "\n" not in line


def test_an_export_that_cannot_be_recorded_leaves_no_file_and_no_record(tmp_path):
    from gridtune.pipeline.training.export import export_project

    path = graded_project(tmp_path)
    out = tmp_path / "train.jsonl"
    out.write_text("the previous export\n")
    with Store.open(path) as store:
        # The store fails at the very last step, as a full disk would: a real SQLite error from the insert.
        store._conn.execute("CREATE TEMP TRIGGER no_room BEFORE INSERT ON main.exports "
                            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        with pytest.raises(sqlite3.Error, match="disk is full"):
            export_project(store, out, validation_fraction=0.5)
        assert out.read_text() == "the previous export\n"  # untouched: no half-made export
        assert sorted(p.name for p in tmp_path.iterdir() if "train" in p.name) == ["train.jsonl"]
        assert store.exports() == []
        store._conn.execute("DROP TRIGGER no_room")
        result = export_project(store, out, validation_fraction=0.5)
        assert [e.id for e in store.exports()] == [result.export_id]
    assert out.read_text() != "the previous export\n" and (tmp_path / "train.valid.jsonl").exists()


# -- credentials in the base URL ---------------------------------------------------------------


def test_credentials_in_the_base_url_are_never_shown_or_stored(tmp_path, fake_openai, monkeypatch):
    from gridtune.pipeline.client.resolve import resolve_backend

    host = fake_openai.base_url.split("://", 1)[1]
    secret_url = f"http://alice:hunter2-pw@{host}"
    monkeypatch.setenv("OPENAI_BASE_URL", secret_url + "?api-key=qs-secret-777")
    backend = resolve_backend(start_local=False)
    for shown in (backend.label, backend.public_url, repr(backend),
                  backend.redact(f"could not reach {backend.base_url}: refused")):
        assert "hunter2" not in shown and "alice" not in shown and "qs-secret" not in shown, shown
    assert host in backend.label
    from gridtune.tui.context import ProjectContext

    context = ProjectContext.open(make_project(tmp_path, n_a=1, n_b=1, name="label.gridtune"))
    try:  # what the TUI's status line shows
        assert context.backend_label() == f"http://{host}" and "hunter2" not in context.backend_label()
    finally:
        context.close()
    for leftover in tmp_path.glob("label.gridtune*"):
        leftover.unlink()

    # Fine-tuning and prompting errors: the server's message, echoing the URL and key it was called with.
    import httpx
    import openai

    from gridtune.pipeline.client.backend import Backend
    from gridtune.pipeline.training import finetune as ft

    # openai >= 3 gives the error a copy of the request without its key: the backend redacts.
    request = httpx.Request("POST", secret_url + "/fine_tuning/jobs", headers={"Authorization": f"Bearer {TEST_KEY}"})
    body = {"error": {"message": f"no jobs at {request.url} for {TEST_KEY}"}}
    refused = openai.BadRequestError("refused", response=httpx.Response(400, request=request, json=body), body=body)
    text = str(ft._wrap("creating the job", refused, Backend("compatible", secret_url, TEST_KEY)))
    assert "no jobs at http://" in text and "hunter2" not in text and "alice" not in text and TEST_KEY not in text

    # A server that echoes the URL it was called with into its error.
    monkeypatch.setenv("OPENAI_BASE_URL", secret_url)
    fake_openai.set(faults=[Fault(status=400, code="bad", message=f"bad request to {secret_url}/chat "
                                                                     f"with key {TEST_KEY}")])
    path = make_project(tmp_path, n_a=2, n_b=1)
    result = gridtune("generate", str(path))
    assert result.returncode == 1
    status = gridtune("status", str(path))
    for text in (result.stdout, result.stderr, status.stdout, status.stderr):
        assert "hunter2" not in text and "alice:" not in text and TEST_KEY not in text, text
    assert "bad request to http://127.0.0.1" in result.stderr, result.stderr  # the echo is kept, its secrets not
    for f in tmp_path.iterdir():
        data = f.read_bytes()
        assert b"hunter2" not in data and b"alice:" not in data and TEST_KEY.encode() not in data, f


# -- the validator on a huge single line --------------------------------------------------------


def test_the_validator_streams_a_40mb_single_line_in_bounded_memory(tmp_path):
    from gridtune.pipeline.format.validate import MAX_LINE_BYTES, validate_file

    huge = tmp_path / "huge.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    with huge.open("w") as f:
        f.write(good + "\n")
        f.write('{"messages": [{"role": "user", "content": "' + "x" * (40 * 1024 * 1024) + '"}]}\n')
        f.write(good + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text(good + "\n")
    validate_file(small)  # load the tokenizer before measuring
    tracemalloc.start()
    try:
        report = validate_file(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_LINE_BYTES + 4 * 1024 * 1024, peak  # bounded by the cap, not the 40 MB line
    assert report.errors == {"line_too_long": 1} and report.error_lines["line_too_long"] == [2]
    assert report.n_examples == 2
    assert "line 2" in report.render_text() and "line_too_long" in report.render_text()

    result = gridtune("validate", str(huge))
    assert result.returncode == 1 and "line_too_long" in result.stdout
    one = tmp_path / "one.jsonl"
    one.write_bytes(b"x" * (40 * 1024 * 1024))  # one line, no newline at all
    report = validate_file(one)
    assert report.errors == {"line_too_long": 1} and report.error_lines["line_too_long"] == [1]
