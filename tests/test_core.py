"""gridtune.core: the small helpers every layer shares, on real files and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridtune.core import serverstate
from gridtune.core.chat import chat_messages
from gridtune.core.errors import fold, one_line
from gridtune.core.files import private_dir, write_atomic, write_json
from gridtune.core.hyperparams import default_epochs
from gridtune.core.net import is_loopback
from gridtune.core.proc import is_suspended, pid_alive, process_start_time, process_state


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- errors ---------------------------------------------------------------------------

def test_one_line_keeps_the_first_line_and_names_a_bare_type():
    assert one_line(ValueError("bad value\n  at line 3\n")) == "bad value"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(RuntimeError("   ")) == "RuntimeError"
    assert one_line(KeyError("x"), with_type=True) == "KeyError: 'x'"
    assert one_line(OSError(), with_type=True) == "OSError"


def test_one_line_whole_folds_every_line():
    exc = RuntimeError("database disk image is malformed\n\n  (page 3)\t end")
    assert one_line(exc, whole=True) == "database disk image is malformed (page 3) end"
    assert one_line(exc, whole=True, with_type=True).startswith("RuntimeError: database")
    assert fold("  a\n b\t\tc ") == "a b c"


# -- processes ------------------------------------------------------------------------

def test_pid_alive_follows_a_real_process_through_stop_death_and_reaping():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(proc.pid) and not is_suspended(proc.pid)
        started = process_start_time(proc.pid)
        assert started is not None and abs(started - time.time()) < 30
        os.kill(proc.pid, signal.SIGSTOP)
        _wait(lambda: is_suspended(proc.pid))
        assert pid_alive(proc.pid)  # stopped is still alive
        os.kill(proc.pid, signal.SIGKILL)
        _wait(lambda: process_state(proc.pid) == "Z")
        assert not pid_alive(proc.pid)  # a zombie runs nothing
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid) and process_state(proc.pid) is None and process_start_time(proc.pid) is None


def test_pid_alive_takes_anything_from_a_state_file():
    assert pid_alive(os.getpid())
    for junk in (None, "123", 0, -1, True, 1.5):
        assert not pid_alive(junk)


# -- network --------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("example.com", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# -- files ----------------------------------------------------------------------------

def test_write_json_is_whole_private_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "state.json"
    target.write_text("old")
    target.chmod(0o644)
    write_json(target, {"a": 1, "b": [1, 2]})
    assert json.loads(target.read_text()) == {"a": 1, "b": [1, 2]}
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "data.bin"
    write_atomic(target, b"first", mode=0o640)
    assert target.read_bytes() == b"first" and target.stat().st_mode & 0o777 == 0o640

    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_write_atomic_never_writes_through_a_link(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    write_json(link, {"x": 1})
    assert victim.read_text() == "keep" and not link.is_symlink()


def test_private_dir_creates_and_tightens(tmp_path: Path):
    made = private_dir(tmp_path / "a" / "b")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    assert private_dir(loose).stat().st_mode & 0o777 == 0o700


# -- the server's state file ----------------------------------------------------------

def test_server_state_round_trip_and_removal_only_by_its_owner(tmp_path: Path):
    state = {"pid": os.getpid(), "base_url": "http://127.0.0.1:1/v1", "token": "t"}
    serverstate.write_state(tmp_path, state)
    path = tmp_path / serverstate.STATE_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert serverstate.read_state(tmp_path) == state
    serverstate.remove_state(tmp_path, pid=os.getpid() + 1)  # another process's: stays
    assert path.exists()
    serverstate.remove_state(tmp_path)
    assert not path.exists() and serverstate.read_state(tmp_path) is None
    serverstate.remove_state(tmp_path)  # nothing there: no error


def test_server_state_that_others_could_have_written_is_not_read(tmp_path: Path):
    serverstate.write_state(tmp_path, {"base_url": "http://evil/v1"})
    (tmp_path / serverstate.STATE_FILE).chmod(0o666)
    assert serverstate.read_state(tmp_path) is None
    (tmp_path / serverstate.STATE_FILE).unlink()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"base_url": "http://evil/v1"}')
    (tmp_path / serverstate.STATE_FILE).symlink_to(elsewhere)
    assert serverstate.read_state(tmp_path) is None
    (tmp_path / serverstate.STATE_FILE).unlink()
    (tmp_path / serverstate.STATE_FILE).write_text("[1, 2]")
    assert serverstate.read_state(tmp_path) is None


def test_server_phase():
    assert serverstate.phase({"phase": "loading\n the model"}) == "loading the model"
    assert serverstate.phase({"phase": "  "}) is None
    assert serverstate.phase({"phase": 3}) is None
    assert serverstate.phase(None) is None
    assert len(serverstate.phase({"phase": "x" * 500}) or "") == 80


# -- rules and shapes -----------------------------------------------------------------

@pytest.mark.parametrize("n, epochs", [(0, 3), (1, 25), (3, 25), (5, 20), (12, 8), (34, 3), (100, 3),
                                       (8333, 3), (8334, 2), (30_000, 1)])
def test_default_epochs(n, epochs):
    assert default_epochs(n) == epochs


def test_the_trainer_and_the_estimate_share_one_epochs_rule():
    from gridtune.pipeline.format import cost
    from gridtune.server import jobs

    assert cost.default_epochs is default_epochs
    assert jobs._resolve_hparams({}, 12)["n_epochs"] == default_epochs(12)


def test_chat_messages():
    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]
    assert chat_messages("hi", "be brief") == [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi"}]
    assert chat_messages("hi", "") == [{"role": "user", "content": "hi"}]


def test_core_imports_nothing_else_of_gridtune():
    code = ("import sys, importlib, pkgutil, gridtune.core as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('gridtune.core.' + m.name)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('gridtune'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(m == "gridtune" or m.startswith("gridtune.core") for m in out.stdout.split())
