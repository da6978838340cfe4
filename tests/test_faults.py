"""Faults that lost money or changed files (issue 20), each done the real way: real
foreign SQLite files compared byte for byte, a real second process holding the
write lock, a real HTTP server on 127.0.0.1 sending huge bodies, a real full
filesystem (a small tmpfs, when this machine lets the test mount one)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridtune.store import Store, StoreError
from gridtune.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from tests.test_robustness import one_line_error  # the CLI's answer to bad input, checked one way

GRIDTUNE = [sys.executable, "-c", "from gridtune.cli.main import main; main()"]

SPEC = """
name = "faults"
[prompt]
generation = "Write about {a} and {b}."
[variables]
a = [1, 2, 3, 4]
b = ["p", "q"]
[generation]
model = "gpt-4o-mini"
max_tokens = 50
"""


def gridtune(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTUNE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder``, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def new_project(folder: Path, name: str = "p.gridtune") -> Path:
    spec = folder / "spec.toml"
    spec.write_text(SPEC)
    path = folder / name
    result = gridtune("new", str(path), "--spec", str(spec))
    assert result.returncode == 0, result.stderr
    spec.unlink()
    return path


# -- 1. foreign SQLite files are never changed -------------------------------------------


def _sqlite(path: Path, *statements: str, wal: bool = False) -> None:
    c = sqlite3.connect(path, isolation_level=None)
    if wal:
        c.execute("PRAGMA journal_mode = WAL")
    for statement in statements:
        c.execute(statement)
    c.close()


def foreign_files(folder: Path) -> list[Path]:
    """Other applications' SQLite files, each alone in its folder: the shapes that
    fooled the old Store.open, and near-copies of a gridtune project."""
    made: list[Path] = []

    def make(name: str, *statements: str, wal: bool = False) -> Path:
        (folder / name).mkdir()
        path = folder / name / "f.db"
        _sqlite(path, *statements, wal=wal)
        made.append(path)
        return path

    for version in (1, 2, 3, 4):  # user_version 1-4 used to be "migrated"
        make(f"v{version}", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
             "INSERT INTO notes (body) VALUES ('keep me')", f"PRAGMA user_version = {version}")
    make("v99-wal", "CREATE TABLE t (x)", "PRAGMA user_version = 99", wal=True)  # used to be switched to WAL
    make("rollback-v99", "CREATE TABLE t (x)", "PRAGMA user_version = 99")
    make("no-tables-v3", "PRAGMA user_version = 3")
    make("other-app-id", *[s for script in MIGRATIONS for s in _statements(script)],
         f"PRAGMA user_version = {SCHEMA_VERSION}", "PRAGMA application_id = 42")  # gridtune's tables, another app
    make("one-extra-table", *[s for script in MIGRATIONS for s in _statements(script)],
         "CREATE TABLE extra (x)", f"PRAGMA user_version = {SCHEMA_VERSION}")
    make("one-table-short", *[s for script in MIGRATIONS for s in _statements(script)],
         "DROP TABLE batch_items", f"PRAGMA user_version = {SCHEMA_VERSION}")
    make("a-column-short", *[s for script in MIGRATIONS[:3] for s in _statements(script)],
         "ALTER TABLE exports DROP COLUMN holdout_json", "PRAGMA user_version = 3")
    # A WAL file with committed pages still in its -wal (its application crashed):
    # reading it through a writable connection would checkpoint them into the file.
    (folder / "wal-pending").mkdir()
    pending = folder / "wal-pending" / "f.db"
    c = sqlite3.connect(pending, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("PRAGMA wal_autocheckpoint = 0")
    c.execute("CREATE TABLE t (x)")
    c.execute("PRAGMA user_version = 2")
    shutil.copy(pending, folder / "wal-pending" / "copy.db")
    shutil.copy(f"{pending}-wal", folder / "wal-pending" / "copy.db-wal")
    c.close()
    pending.unlink()
    (folder / "wal-pending" / "copy.db").rename(pending)
    (folder / "wal-pending" / "copy.db-wal").rename(f"{pending}-wal")
    made.append(pending)
    return made


def _statements(script: str) -> list[str]:
    from gridtune.store.project import _split_sql

    return _split_sql(script)


def test_foreign_sqlite_files_are_refused_in_one_line_and_left_byte_for_byte(tmp_path):
    for path in foreign_files(tmp_path):
        before = snapshot(path.parent)
        with pytest.raises(StoreError, match="not a gridtune project") as caught:
            Store.open(path)
        assert "\n" not in str(caught.value)
        assert "no such table" not in str(caught.value)
        assert snapshot(path.parent) == before, path.parent.name
    # And through the command line, as the fault hunt found it ("even status"); each
    # gridtune process costs seconds here, so the commands that write go to one file.
    (tmp_path / "cli").mkdir()
    for path in foreign_files(tmp_path / "cli"):
        if path.parent.name not in ("v1", "v99-wal", "other-app-id", "one-extra-table", "wal-pending"):
            continue
        before = snapshot(path.parent)
        commands = [("status", str(path))]
        if path.parent.name == "v1":
            commands += [("grade", str(path), "--by-length"), ("generate", str(path)),
                         ("export", str(path), "-o", str(path.parent / "out.jsonl"))]
        for args in commands:
            line = one_line_error(gridtune(*args))
            assert "not a gridtune project" in line and str(path) in line, line
        assert snapshot(path.parent) == before, path.parent.name


def test_a_file_marked_by_a_newer_gridtune_is_refused_untouched(tmp_path):
    newer = tmp_path / "newer.gridtune"
    _sqlite(newer, "CREATE TABLE spec (id)", f"PRAGMA application_id = {APPLICATION_ID}",
            f"PRAGMA user_version = {SCHEMA_VERSION + 1}", wal=True)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="newer gridtune"):
        Store.open(newer)
    assert snapshot(tmp_path) == before


def test_a_new_project_carries_the_marker_in_the_file_itself(tmp_path):
    path = new_project(tmp_path)
    header = path.read_bytes()[:100]  # not only in the WAL: the main file's own header
    assert int.from_bytes(header[68:72], "big") == APPLICATION_ID
    assert int.from_bytes(header[60:64], "big") == SCHEMA_VERSION


def _old_project(folder: Path, version: int) -> Path:
    """A project as an older gridtune left it: schema ``version``, WAL, no marker."""
    if version == SCHEMA_VERSION:  # the last unmarked release wrote exactly this schema
        path = new_project(folder, f"old{version}.gridtune")
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA application_id = 0")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        return path
    path = folder / f"old{version}.gridtune"
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    for target in range(1, version + 1):
        c.execute("BEGIN IMMEDIATE")
        for statement in _statements(MIGRATIONS[target - 1]):
            c.execute(statement)
        c.execute(f"PRAGMA user_version = {target}")
        c.execute("COMMIT")
    c.execute("INSERT INTO cells (key, values_json, ordinal) VALUES ('k', '{}', 0)")
    c.close()
    return path


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
def test_a_project_of_an_older_gridtune_opens_migrated_and_marked(tmp_path, version):
    path = _old_project(tmp_path, version)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA application_id").fetchone()[0] == 0
    raw.close()
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.cell_count() >= 1  # its data is still there
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    raw.close()
    if version == 1:  # the command line opens it too (once: a process costs seconds here)
        status = gridtune("status", str(path), "--json")
        assert status.returncode == 0, status.stderr


def test_two_processes_opening_an_old_project_at_once_migrate_it_once(tmp_path):
    path = _old_project(tmp_path, 1)
    code = f"from gridtune.store import Store; Store.open({str(path)!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION


def test_opening_a_project_leaves_this_process_s_other_connections_their_locks(tmp_path):
    """Store.open reads the file through SQLite alone: a descriptor of its own, once
    closed, would drop every POSIX lock this process holds on the file; another process
    closing after it would then think itself the last, and delete the -wal and -shm
    under a connection still open here (the next read: "disk I/O error")."""
    path = new_project(tmp_path)
    raw = sqlite3.connect(path)  # another connection of this process, left open
    assert raw.execute("SELECT count(*) FROM cells").fetchone()[0] == 8
    for _ in range(2):
        Store.open(path).close()
        writer = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                  "c.execute('UPDATE cells SET ordinal = ordinal'); c.commit(); c.close()")
        subprocess.run([sys.executable, "-c", writer, str(path)], check=True)
        assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
        assert raw.execute("SELECT count(*) FROM completions").fetchone()[0] == 8
        with Store.open(path) as store:
            assert store.status_counts().cells == 8
    raw.close()


# -- 2. a held write lock: nothing paid twice, nothing lost --------------------------------

HOLDER = """
import sqlite3, sys, time
path, after, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while True:
    c = sqlite3.connect(path, timeout=30, isolation_level=None)
    if c.execute("SELECT count(*) FROM completions WHERE status = 'done'").fetchone()[0] >= after:
        break
    c.close()
    time.sleep(0.02)
c.execute("BEGIN IMMEDIATE")  # another process in the middle of a long write
print("HELD", time.time(), flush=True)
time.sleep(hold)
c.execute("ROLLBACK")
print("LET GO", time.time(), flush=True)
"""


def grid_project(folder: Path, cells_a: int = 8, cells_b: int = 8, name: str = "p.gridtune") -> Path:
    spec = folder / "grid.toml"
    spec.write_text(SPEC.replace("a = [1, 2, 3, 4]", f"a = {list(range(1, cells_a + 1))}")
                    .replace('b = ["p", "q"]', "b = " + json.dumps([f"v{i}" for i in range(cells_b)])))
    path = folder / name
    result = gridtune("new", str(path), "--spec", str(spec))
    assert result.returncode == 0, result.stderr
    spec.unlink()
    return path


def answered(server) -> int:
    """Answers the server gave (each one paid for)."""
    return sum(r.status == 200 for r in server.requests)


def test_a_held_write_lock_pauses_the_run_and_no_answer_is_paid_twice(tmp_path, fake_openai):
    path = grid_project(tmp_path)  # 64 cells
    fake_openai.set(latency=0.1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "10", "5"], stdout=subprocess.PIPE, text=True)
    env = {"GRIDTUNE_BUSY_TIMEOUT_S": "1", "GRIDTUNE_WRITE_WAIT_S": "60"}
    result = gridtune("generate", str(path), "--concurrency", "2", env=env, timeout=120)
    out, _ = holder.communicate(timeout=30)
    held, let_go = (float(line.split()[-1]) for line in out.splitlines())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # One line when it pauses (and one when it goes on), not one a write.
    assert sum("locked" in line for line in result.stderr.splitlines()) == 1, result.stderr
    with Store.open(path) as store:
        counts = store.status_counts()
    assert counts.done == 64 and counts.pending == 0
    assert answered(fake_openai) == 64  # every answer paid once, none asked again
    # Paused: once the writer found the lock (busy timeout 1 s), no new request went out
    # until it was let go; only the two in flight then came back.
    sent_while_held = [r for r in fake_openai.requests if held + 1.5 < r.t < let_go - 0.2]
    assert len(sent_while_held) <= 2, len(sent_while_held)


def test_a_lock_held_longer_than_the_wait_still_loses_nothing(tmp_path, fake_openai):
    """A lock is always let go in the end: the run waits for it, however long, while
    it runs (GRIDTUNE_WRITE_WAIT_S bounds only a full disk, and an ending run)."""
    path = grid_project(tmp_path, 4, 4)  # 16 cells
    fake_openai.set(latency=0.1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "3", "4"], stdout=subprocess.PIPE, text=True)
    env = {"GRIDTUNE_BUSY_TIMEOUT_S": "0.5", "GRIDTUNE_WRITE_WAIT_S": "1"}
    result = gridtune("generate", str(path), "--concurrency", "2", env=env, timeout=120)
    holder.communicate(timeout=30)
    assert result.returncode == 0, result.stderr
    assert counts_done(path) == 16 and answered(fake_openai) == 16


def test_a_run_stopped_while_the_lock_is_held_ends_in_one_line_and_a_resume_pays_only_what_it_lost(
        tmp_path, fake_openai):
    path = grid_project(tmp_path, 4, 4)  # 16 cells
    fake_openai.set(latency=0.2)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "3", "8"], stdout=subprocess.PIPE, text=True)
    env = {**os.environ, "GRIDTUNE_BUSY_TIMEOUT_S": "0.5", "GRIDTUNE_WRITE_WAIT_S": "1"}
    run = subprocess.Popen([*GRIDTUNE, "generate", str(path), "--concurrency", "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None
    assert holder.stdout.readline().startswith("HELD")
    time.sleep(1.5)  # the run has found the lock and paused
    run.send_signal(signal.SIGTERM)  # an operator stops it: now it waits only GRIDTUNE_WRITE_WAIT_S
    out, err = run.communicate(timeout=60)
    line = one_line_error(subprocess.CompletedProcess(run.args, run.returncode, out, err))
    assert "locked" in line and "could not be saved" in line, line
    lost = int(line.split(" answer(s) received could not be saved")[0].rsplit(" ", 1)[1])
    assert lost <= 4  # in flight when the lock was found (2), and within 0.1 s of it
    holder.communicate(timeout=30)
    assert answered(fake_openai) == counts_done(path) + lost
    again = gridtune("generate", str(path), env={"GRIDTUNE_BUSY_TIMEOUT_S": "0.5"}, timeout=120)
    assert again.returncode == 0, again.stderr
    assert answered(fake_openai) == 16 + lost  # the resume asked only for what was never saved


def counts_done(path: Path) -> int:
    with Store.open(path) as store:
        return store.status_counts().done


# -- 3. replies bigger than max_tokens can explain -----------------------------------------


@pytest.mark.parametrize("how", ["plain", "plain-openai-client", "streamed"])
def test_a_huge_reply_is_refused_as_malformed_before_it_is_read_whole(tmp_path, fake_openai, monkeypatch, how):
    import asyncio
    import tracemalloc

    from gridtune.pipeline.generation.generate import GenerateOptions, run_generation
    from tests.fakeserver import Fault

    if how == "plain-openai-client":
        monkeypatch.setenv("GRIDTUNE_LEAN_HTTP", "0")
    path = grid_project(tmp_path, 2, 2)  # 4 cells, max_tokens 50
    fake_openai.set(faults=[Fault(kind="huge", size=50 * 2**20)])
    tracemalloc.start()
    try:
        result = asyncio.run(run_generation(path, GenerateOptions(
            stream=how == "streamed", max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02,
            progress_interval_s=0.1)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.progress.failed == 4 and result.progress.done == 0
    with Store.open(path) as store:
        errors = {c.error for c in store.completions()}
    assert len(errors) == 1 and "malformed response: the reply is larger than" in errors.pop()
    assert peak < 16 * 2**20, peak  # 8 replies of 50 MB were sent at it
    assert path.stat().st_size < 2**20
    assert fake_openai.huge_sent < 8 * 50 * 2**20 / 4  # the rest of each reply was never taken


def test_a_reply_of_ordinary_size_is_read_whole(tmp_path, fake_openai):
    """The bound refuses only what max_tokens cannot explain: a reply with 200 KB of
    text and max_tokens 50000 goes through, plain and streamed."""
    import asyncio

    from gridtune.pipeline.generation.generate import GenerateOptions, run_generation

    path = grid_project(tmp_path, 1, 2)
    big = " ".join(["word"] * 40_000)  # 200 KB, 40 000 words: within max_tokens
    fake_openai.set(replies=[("Write", big)])
    for stream in (False, True):
        options = GenerateOptions(stream=stream, max_tokens=50_000, redo_ids=[1, 2] if stream else None)
        result = asyncio.run(run_generation(path, options))
        assert result.progress.done == 2, result
    with Store.open(path) as store:
        assert {len(c.text) for c in store.completions()} == {len(big)}


# -- 4. a full disk mid-run ----------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int):
    """A real filesystem of ``size_kb`` KiB (tmpfs), mounted at ``folder``; skips when
    this machine does not let the test mount one (not root, no mount namespace)."""
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root; bench/faults.py covers a full disk where it can")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave_kb: int) -> Path:
    """A file that takes all the space of ``folder``'s filesystem but ``leave_kb`` KiB."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, free - leave_kb * 1024))
    return filler


def test_a_full_disk_mid_run_is_one_line_recorded_in_the_run_and_a_resume_finishes(tmp_path, fake_openai):
    with small_disk(tmp_path / "disk", 4096) as disk:
        path = grid_project(disk, 8, 8)  # 64 cells
        fake_openai.set(latency=0.02, replies=[("Write", "x" * 20_000)])  # 20 KB an answer
        filler = fill(disk, 300)
        env = {"GRIDTUNE_WRITE_WAIT_S": "2"}
        result = gridtune("generate", str(path), "--concurrency", "2", env=env, timeout=120)
        line = one_line_error(result)
        assert "disk is full" in line and str(path) in line, line
        # The pause, then the end; not a line a write.
        assert sum("disk is full" in x for x in result.stderr.splitlines()) <= 2, result.stderr
        filler.unlink()
        status = gridtune("status", str(path), "--json")
        assert status.returncode == 0, status.stderr
        run = json.loads(status.stdout)["run"]
        assert run["state"] == "failed" and "disk is full" in run["error"], run
        lost = int(line.split(" answer(s) received could not be saved")[0].rsplit(" ", 1)[1]) \
            if "could not be saved" in line else 0
        assert lost <= 4  # the answers of the write that met the full disk, and those in flight (2)
        again = gridtune("generate", str(path), env=env, timeout=120)
        assert again.returncode == 0, again.stderr
        with Store.open(path) as store:
            assert store.status_counts().done == 64
        assert answered(fake_openai) == 64 + lost


def test_space_freed_while_the_run_waits_loses_nothing(tmp_path, fake_openai):
    with small_disk(tmp_path / "disk", 4096) as disk:
        path = grid_project(disk, 8, 8)
        fake_openai.set(latency=0.02, replies=[("Write", "x" * 20_000)])
        filler = fill(disk, 300)
        proc = subprocess.Popen([*GRIDTUNE, "generate", str(path), "--concurrency", "2"], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, env={**os.environ, "GRIDTUNE_WRITE_WAIT_S": "60"})
        lines = []
        for err_line in proc.stderr:  # the run says it waits, once; then space comes back
            lines.append(err_line)
            if "disk is full" in err_line:
                filler.unlink()
                break
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=120) == 0, "".join(lines)
        assert any("disk is full" in x for x in lines)
        with Store.open(path) as store:
            assert store.status_counts().done == 64
        assert answered(fake_openai) == 64  # nothing lost, nothing asked twice


def test_the_judge_and_eval_pool_bounds_each_reply_by_its_own_max_tokens(fake_openai):
    """The one-shot requests (a judge's grade, an evaluation's answer) get the same bound,
    from each request's own max_tokens."""
    import asyncio

    from gridtune.pipeline.client.request_pool import Pool, PoolOptions, Request
    from gridtune.pipeline.client.resolve import resolve_backend
    from tests.fakeserver import Fault

    fake_openai.set(faults=[Fault(kind="huge", size=50 * 2**20, match="big")])
    results = {}

    async def on_result(item, reply, error, latency):
        results[item] = error if reply is None else reply.text

    def request(item: str) -> Request:
        return Request("/chat/completions", {"model": "m", "max_tokens": 10,
                                             "messages": [{"role": "user", "content": item}]}, 10)

    pool: Pool[str] = Pool(resolve_backend(), PoolOptions(max_attempts=2, backoff_initial_s=0.01))
    asyncio.run(pool.run(["big one", "small one"], request, on_result, None))
    assert "malformed response: the reply is larger than" in results["big one"]
    assert results["small one"].startswith("On: small one")
    assert fake_openai.huge_sent < 2 * 50 * 2**20 / 4
