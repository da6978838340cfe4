"""Runs that outlive the terminal: real `gridtune` processes, killed, stopped,
detached, and the project file read afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridtune.core.proc import pid_alive, process_start_time
from gridtune.pipeline.generation import runs
from gridtune.store import RunRecord, Store, runlock
from tests.fakeserver import TEST_KEY, Fault
from tests.test_generate import make_project

GRIDTUNE = [sys.executable, "-c", "from gridtune.cli.main import main; main()"]


@pytest.fixture
def procs():
    """Start `gridtune` subprocesses; any still running at teardown are killed."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*GRIDTUNE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture
def detached_pids():
    """Detached runs are not our children: kill any left by a failing test."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gridtune(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTUNE, *args], capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def done_texts(path: Path) -> dict[int, str]:
    with Store.open(path) as store:
        return {c.id: c.text for c in store.completions(status="done")}


def statuses(path: Path) -> set[str]:
    with Store.open(path) as store:
        return {c.status for c in store.completions()}


def latest(path: Path) -> RunRecord:
    with Store.open(path) as store:
        run = store.latest_run()
    assert run is not None
    return run


def test_sigkill_mid_run_loses_nothing_and_the_next_run_repeats_no_finished_cell(tmp_path, fake_openai, procs):
    path = make_project(tmp_path, n_a=6, n_b=5)
    fake_openai.set(latency=0.2)
    proc = procs("generate", str(path), "--concurrency", "4")
    wait_for(lambda: len(done_texts(path)) >= 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    saved = done_texts(path)
    assert 8 <= len(saved) < 30
    killed = latest(path)
    assert killed.state == "running" and not runlock.is_alive(killed)  # recorded alive, but its process is gone
    asked_before = len(fake_openai.chat_requests())

    result = gridtune("generate", str(path), "--concurrency", "8")
    assert result.returncode == 0, result.stderr
    after = done_texts(path)
    assert len(after) == 30
    assert all(after[cid] == text for cid, text in saved.items())  # every saved completion intact
    with Store.open(path) as store:
        saved_prompts = {_prompt(store, cid) for cid in saved}
        runs_ = [store.get_run(1), store.get_run(2)]
    second = [r.prompt for r in fake_openai.chat_requests()[asked_before:]]
    assert len(second) == 30 - len(saved) and not saved_prompts & set(second)
    assert (runs_[0].state, runs_[1].state) == ("died", "finished")


def _prompt(store: Store, completion_id: int) -> str:
    values = store.get_completion(completion_id).values
    return f"Write about {values['a']} and {values['b']}."


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_cleanly(tmp_path, fake_openai, procs, sig, code):
    path = make_project(tmp_path, n_a=6, n_b=5)
    fake_openai.set(latency=0.3)
    proc = procs("generate", str(path), "--concurrency", "4")
    wait_for(lambda: len(done_texts(path)) >= 4)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert "stopped" in out
    assert statuses(path) == {"done", "pending"}  # nothing left running or half-written
    with Store.open(path) as store:
        for c in store.completions():
            assert (c.text is not None and c.completion_tokens is not None) == (c.status == "done")
    assert latest(path).state == "stopped"


def test_detached_run_outlives_the_process_that_started_it(tmp_path, fake_openai, detached_pids):
    path = make_project(tmp_path, n_a=5, n_b=4)
    fake_openai.set(latency=0.25)
    started = time.monotonic()
    result = gridtune("generate", str(path), "--detach", "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run #1 started in the background")
    run = latest(path)
    detached_pids.append(run.pid)
    assert run.state == "running" and pid_alive(run.pid)
    assert os.getsid(run.pid) == run.pid  # its own session: no controlling terminal to lose
    os.kill(run.pid, signal.SIGHUP)  # the SSH connection drops
    finished = wait_for(lambda: (r := latest(path)).state == "finished" and r, timeout=30)
    assert time.monotonic() - started > 2.0  # it ran on well after `generate --detach` returned
    assert statuses(path) == {"done"} and finished.progress["done"] == 20
    assert "run #1 finished" in runs.log_path(path).read_text()


def test_a_key_the_server_echoes_reaches_neither_the_project_nor_the_log(tmp_path, fake_openai, detached_pids):
    path = make_project(tmp_path, n_a=2, n_b=2)
    fake_openai.set(faults=[Fault(status=401, code="invalid_api_key",
                                  message=f"Incorrect API key provided: {TEST_KEY}.")])
    assert gridtune("generate", str(path), "--detach").returncode == 0
    detached_pids.append(latest(path).pid)
    wait_for(lambda: not latest(path).active)
    log = runs.log_path(path).read_text()
    assert "4 x HTTP 401 [invalid_api_key]: Incorrect API key provided: sk-...89." in log
    with Store.open(path) as store:
        assert {c.status for c in store.completions()} == {"failed"}
    for f in tmp_path.iterdir():  # the database, its WAL, the run's log
        assert TEST_KEY.encode() not in f.read_bytes(), f


def test_second_run_is_refused_naming_the_first_and_stop_ends_it(tmp_path, fake_openai, detached_pids):
    path = make_project(tmp_path, n_a=6, n_b=5)
    # 30 requests one at a time take 30 s: still running when `stop` comes, even when the
    # CLI calls before it are slow on a loaded machine (stop waits for 2 done only).
    fake_openai.set(latency=1.0)
    assert gridtune("generate", str(path), "--detach", "--concurrency", "1").returncode == 0
    detached_pids.append(latest(path).pid)
    second = gridtune("generate", str(path))
    assert second.returncode == 2
    assert "run #1 is already running on this project" in second.stderr
    assert gridtune("generate", str(path), "--detach").returncode == 2

    watch = subprocess.Popen([*GRIDTUNE, "status", str(path), "--watch", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(done_texts(path)) >= 2)
        stop = gridtune("stop", str(path), "--wait", "15")
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.startswith("run #1 stopped")
        out, _ = watch.communicate(timeout=20)  # --watch returns once the run has ended
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    status = json.loads(out)
    assert status["run"]["state"] == "stopped" and status["done"] + status["pending"] == 30
    assert statuses(path) == {"done", "pending"}
    assert gridtune("stop", str(path)).stdout.startswith("no run in progress")


def test_a_run_whose_process_died_is_detected_and_its_cells_return_to_pending(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store.open(path) as store:
        run_id = store.start_run(pid=dead.pid, host=socket.gethostname(), model="m", params=None,
                                 is_alive=runlock.is_alive)
        for item in store.pending_work(limit=3):
            store.mark_running(item.completion_id, run_id)
        assert store.status_counts().running == 3
    result = gridtune("status", str(path), "--json")
    data = json.loads(result.stdout)
    assert data["run"]["state"] == "died" and data["running"] == 0 and data["pending"] == 4
    assert "died" in gridtune("status", str(path)).stdout
    with Store.open(path) as store:
        assert runs.read_progress(store).state == "died" and runs.read_progress(store).run_id == run_id
    assert gridtune("generate", str(path)).returncode == 0
    assert statuses(path) == {"done"}


def test_liveness_uses_the_process_on_this_host_and_the_heartbeat_only_elsewhere():
    now = time.time()

    def run(pid, host, beat):
        return RunRecord(id=1, pid=pid, host=host, started_at=now, heartbeat_at=beat, ended_at=None,
                         state="running", model=None, params=None, stop_requested=False, progress=None, error=None)

    here = socket.gethostname()
    assert runlock.is_alive(run(os.getpid(), here, now))
    # Stopped (Ctrl-Z, SIGSTOP) or busy: no heartbeat for long, but its process lives: alive.
    born = process_start_time(os.getpid())
    assert born is not None and born <= now
    assert now - (born + 1) >= 0 and runlock.is_alive(run(os.getpid(), here, born + 1))
    assert runlock.is_alive(run(999_999_999, "elsewhere", now - 1))  # can't see its pid: trust the heartbeat
    assert not runlock.is_alive(run(999_999_999, "elsewhere", now - runlock.STALE_AFTER_S - 1))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: open(f"/proc/{zombie.pid}/stat").read().split(")")[1].split()[0] == "Z")
    assert not runlock.is_alive(run(zombie.pid, here, now))  # killed but not yet reaped
    zombie.wait()
    # A pid reused by a process younger than the run's last heartbeat is not the runner.
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        wait_for(lambda: process_start_time(newer.pid) is not None)
        assert runlock.is_alive(run(newer.pid, here, time.time()))
        assert not runlock.is_alive(run(newer.pid, here, process_start_time(newer.pid) - 10))
    finally:
        newer.kill()
        newer.wait()


def test_heartbeat_window_comes_from_the_environment(monkeypatch):
    assert runlock.stale_after_s() == runlock.STALE_AFTER_S
    monkeypatch.setenv(runlock.STALE_ENV, "1.5")
    assert runlock.stale_after_s() == 1.5
    monkeypatch.setenv(runlock.STALE_ENV, "junk")
    assert runlock.stale_after_s() == runlock.STALE_AFTER_S
