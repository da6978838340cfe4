"""The fault hunt of issue 20, in one go: what operators and hostile servers do to a
run, each done the real way, and what it cost.

    python bench/faults.py            # < 5 min; prints one table

Real processes (`gridtune generate` as a user runs it), a real OpenAI-compatible
server on 127.0.0.1 (tests/fakeserver.py) that can hang, cut a stream, answer a
web page, invalid UTF-8 or 50 MB, a real second process holding the project's
write lock, real SIGKILLs, real foreign SQLite files compared byte for byte, and a
real full filesystem (a small tmpfs: needs root; the row says so otherwise).

Columns: *answers lost* are well-formed answers the server gave during the faulted
run that were not saved by its end; *answers paid twice* are well-formed answers
beyond one per cell over the run and its resume; *files changed* are files other
than the project's own that the run or command changed. Zeros are expected
everywhere except where a fault cannot be avoided (a kill loses the answers in
flight; a disk that stays full loses those the run had received when it filled).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec  # noqa: E402
from gridtune.pipeline.spec.project import create_project  # noqa: E402
from gridtune.store import Store, StoreError  # noqa: E402
from gridtune.store.project import _split_sql  # noqa: E402
from gridtune.store.schema import MIGRATIONS, SCHEMA_VERSION  # noqa: E402
from tests.fakeserver import TEST_KEY, FakeOpenAI, Fault  # noqa: E402

# The CLI, reporting its peak memory (KiB) as its last stderr line.
GRIDTUNE = [sys.executable, "-c",
            "import atexit, resource, sys; atexit.register(lambda: sys.stderr.write("
            "f'MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')); "
            "from gridtune.cli.main import main; main()"]
ROWS: list[tuple[str, str, str, str, str]] = []


def row(fault: str, outcome: str, lost: int | str = 0, twice: int | str = 0, changed: int | str = 0) -> None:
    ROWS.append((fault, outcome, str(lost), str(twice), str(changed)))
    print(f"  {fault}: {outcome}", file=sys.stderr, flush=True)


def gridtune(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTUNE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("gridtune: error: ")]


def maxrss_mb(result: subprocess.CompletedProcess) -> float:
    lines = [x for x in result.stderr.splitlines() if x.startswith("MAXRSS ")]
    return int(lines[-1].split()[1]) / 1024 if lines else float("nan")


def project(folder: Path, a: int, b: int, name: str = "p.gridtune", max_tokens: int = 50) -> Path:
    spec = GridSpec(name="faults", system="You are terse.", generation="Write about {a} and {b}.",
                    variables={"a": list(range(1, a + 1)), "b": [f"v{i}" for i in range(b)]},
                    settings=GenerationSettings(model="gpt-4o-mini", temperature=0.7, max_tokens=max_tokens))
    path = folder / name
    create_project(path, spec).close()
    return path


def counts(path: Path) -> tuple[int, int]:
    with Store.open(path) as store:
        c = store.status_counts()
    return c.done, c.failed


def stray(folder: Path) -> int:
    """Files in ``folder`` that are neither a project nor its own (-wal, -shm, run lock
    and log beside it) nor the bench's filler: what a run should never leave."""
    projects = [p.name for p in folder.glob("*.gridtune")]
    return sum(1 for p in folder.iterdir()
               if p.name != "filler" and not any(p.name.startswith(name) for name in projects)
               and not p.name.startswith("."))


def answered(server: FakeOpenAI) -> int:
    """Well-formed answers the server gave (each paid for)."""
    return sum(r.status == 200 and r.fault is None for r in server.requests)


def first_line(result: subprocess.CompletedProcess) -> str:
    e = errors(result)
    return e[-1].removeprefix("gridtune: error: ") if e else ""


# -- foreign SQLite files ------------------------------------------------------------------


def foreign(folder: Path) -> None:
    statements = [s for script in MIGRATIONS for s in _split_sql(script)]
    shapes = {
        **{f"user_version {v}": ["CREATE TABLE notes (x)", f"PRAGMA user_version = {v}"] for v in (1, 2, 3, 4)},
        "user_version 99, WAL": ["PRAGMA journal_mode = WAL", "CREATE TABLE t (x)", "PRAGMA user_version = 99"],
        "gridtune's tables, another app id": [*statements, f"PRAGMA user_version = {SCHEMA_VERSION}",
                                              "PRAGMA application_id = 42"],
        "gridtune's tables + one": [*statements, "CREATE TABLE extra (x)", f"PRAGMA user_version = {SCHEMA_VERSION}"],
        "no tables, user_version 3": ["PRAGMA user_version = 3"],
    }
    changed = refused = cli_wrong = 0
    for n, sql in enumerate(shapes.values()):
        where = folder / f"f{n}"
        where.mkdir()
        path = where / "other.db"
        c = sqlite3.connect(path, isolation_level=None)
        for s in sql:
            c.execute(s)
        c.close()
        before = {p.name: p.read_bytes() for p in where.iterdir()}
        try:
            Store.open(path).close()
        except StoreError as exc:
            refused += "not a gridtune project" in str(exc) and "\n" not in str(exc)
        if n < 3:  # and the command line, as the hunt found it ("even status")
            for args in (("status", str(path)), ("grade", str(path), "--by-length")):
                result = gridtune(*args)
                cli_wrong += not (result.returncode == 2 and len(errors(result)) == 1
                                  and "not a gridtune project" in first_line(result))
        changed += {p.name: p.read_bytes() for p in where.iterdir()} != before
    ok = refused == len(shapes) and not cli_wrong
    row(f"{len(shapes)} foreign SQLite files (status, grade)",
        f"refused in one line, untouched: {'all' if ok else 'NOT all'}", 0, 0, changed)


# -- a held write lock ---------------------------------------------------------------------

HOLDER = """
import sqlite3, sys, time
path, after, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while True:
    c = sqlite3.connect(path, timeout=30, isolation_level=None)
    if c.execute("SELECT count(*) FROM completions WHERE status = 'done'").fetchone()[0] >= after:
        break
    c.close()
    time.sleep(0.02)
c.execute("BEGIN IMMEDIATE")
time.sleep(hold)
c.execute("ROLLBACK")
"""


def lock(folder: Path, server: FakeOpenAI, *, hold: float, wait: float) -> None:
    server.reset()
    server.set(latency=0.05)
    path = project(folder, 16, 16)  # 256 cells
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "40", str(hold)])
    env = {"GRIDTUNE_BUSY_TIMEOUT_S": "2", "GRIDTUNE_WRITE_WAIT_S": str(wait)}
    t0 = time.monotonic()
    result = gridtune("generate", str(path), "--concurrency", "8", env=env)
    took = time.monotonic() - t0
    holder.wait(timeout=60)
    done, _ = counts(path)
    lost = answered(server) - done
    lines = sum("locked" in x for x in result.stderr.splitlines())
    if result.returncode == 0:
        outcome = f"paused, then finished {done}/256 in {took:.0f} s ({lines} line about the lock)"
    else:
        again = gridtune("generate", str(path), env=env)
        outcome = (f"ended in {len(errors(result))} line after {wait:g} s; resume: {counts(path)[0]}/256 "
                   f"(exit {again.returncode})")
    row(f"write lock held {hold:g} s mid-run (busy timeout 2 s, GRIDTUNE_WRITE_WAIT_S {wait:g})", outcome, lost,
        answered(server) - 256, stray(folder))


# -- replies bigger than max_tokens can explain --------------------------------------------


def huge(folder: Path, server: FakeOpenAI, stream: bool) -> None:
    server.reset()
    server.set(faults=[Fault(kind="huge", size=50 * 2**20)])
    path = project(folder, 2, 4, name=f"huge{int(stream)}.gridtune")  # 8 cells, max_tokens 50
    result = gridtune("generate", str(path), "--max-attempts", "1", "--stream" if stream else "--no-stream")
    done, failed = counts(path)
    with Store.open(path) as store:
        reasons = {c.error.split(":")[0] for c in store.completions() if c.error}
    size_kb = sum(p.stat().st_size for p in folder.glob(path.name + "*")) / 1024
    row(f"8 replies of 50 MB for max_tokens 50 ({'streamed' if stream else 'plain'})",
        f"{failed}/8 refused as {'/'.join(sorted(reasons)) or '?'}; project {size_kb:.0f} KB, "
        f"peak {maxrss_mb(result):.0f} MB; server pushed {server.huge_sent / 2**20:.0f} of 400 MB before "
        "the client hung up", 0, 0, stray(folder))


# -- a full disk ---------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size_kb: int):
    folder.mkdir()
    if os.geteuid() != 0:
        yield None
        return
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                        capture_output=True).returncode == 0
    try:
        yield folder if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave_kb: int) -> Path:
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_kb * 1024))
    return filler


def disk_full(folder: Path, server: FakeOpenAI, *, freed_while_waiting: bool) -> None:
    label = "disk full mid-run, " + ("space freed while the run waits" if freed_while_waiting else "never freed")
    with tmpfs(folder, 4096) as disk:
        if disk is None:
            row(label, "skipped: mounting a small filesystem needs root", "-", "-", "-")
            return
        server.reset()
        server.set(latency=0.02, replies=[("Write", "x" * 20_000)])  # 20 KB an answer
        path = project(disk, 8, 8)  # 64 cells
        filler = fill(disk, 300)
        env = {**os.environ, "GRIDTUNE_WRITE_WAIT_S": "60" if freed_while_waiting else "2"}
        proc = subprocess.Popen([*GRIDTUNE, "generate", str(path), "--concurrency", "2"], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, env=env)
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if freed_while_waiting and "disk is full" in line:
                filler.unlink()
        code = proc.wait(timeout=120)
        done, _ = counts(path) if code == 0 or not freed_while_waiting else (0, 0)
        full_lines = sum("disk is full" in x for x in lines)
        if freed_while_waiting:
            outcome = f"paused ({full_lines} line), finished {done}/64 once space came back (exit {code})"
            lost = answered(server) - done
        else:
            filler.unlink()
            with Store.open(path) as store:
                run = store.latest_run()
                done = store.status_counts().done
            lost = answered(server) - done
            recorded = "the run's record names the disk" if run and run.error and "disk is full" in run.error \
                else f"run record: {run.error if run else None}"
            again = gridtune("generate", str(path))
            outcome = (f"ended in {sum(x.startswith('gridtune: error') for x in lines)} line (exit {code}), "
                       f"{recorded}; resume: {counts(path)[0]}/64")
            if again.returncode != 0:
                outcome += f" (resume exit {again.returncode})"
        row(label, outcome, lost, answered(server) - 64, stray(disk))


# -- SIGKILL, five times in a row ----------------------------------------------------------


def kills(folder: Path, server: FakeOpenAI) -> None:
    server.reset()
    server.set(latency=0.05)
    path = project(folder, 16, 16)  # 256 cells
    for _ in range(5):
        before = counts(path)[0]
        proc = subprocess.Popen([*GRIDTUNE, "generate", str(path), "--concurrency", "8"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while counts(path)[0] < before + 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = gridtune("generate", str(path))
    done, _ = counts(path)
    # Every cell is answered once in the end; what was paid beyond that is what the
    # kills lost: the answers in flight (8 at a time) or not yet committed (~10 ms).
    lost = answered(server) - 256
    row("SIGKILL x5 during a 256-cell run, then resume",
        f"{done}/256 after the resume (exit {result.returncode}); each kill lost ~{lost / 5:.0f} answers "
        "in flight (concurrency 8)", lost, lost, stray(folder))


# -- hostile servers -----------------------------------------------------------------------


def hostile(folder: Path, server: FakeOpenAI) -> None:
    cases = {
        "hangs 30 s (timeout 2 s)": (Fault(kind="stall", stall_s=30), ["--timeout", "2"]),
        "cuts the stream": (Fault(kind="malformed"), ["--stream"]),
        "answers a web page": (Fault(kind="html"), []),
        "answers invalid UTF-8": (Fault(kind="bad-utf8"), []),
    }
    for n, (name, (fault, extra)) in enumerate(cases.items()):
        server.reset()
        server.set(faults=[fault])
        path = project(folder, 2, 2, name=f"hostile{n}.gridtune")
        result = gridtune("generate", str(path), "--max-attempts", "2", *extra)
        done, failed = counts(path)
        traceback = "Traceback" in result.stderr
        with Store.open(path) as store:
            reason = next((c.error for c in store.completions() if c.error), "")
        row(f"server {name}", f"{failed}/4 failed, exit {result.returncode}"
            + (", TRACEBACK" if traceback else "") + f": {reason.split(' (after')[0][:60]}", 0, 0, stray(folder))


def main() -> None:
    t0 = time.monotonic()
    server = FakeOpenAI().start()
    # A client killed or hung up mid-request is the point here, not the fake server's error
    # (after start: uvicorn configures its loggers as it starts).
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    home = Path(tempfile.mkdtemp(prefix="gridtune-faults-"))
    os.environ.update({"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": TEST_KEY,
                       "GRIDTUNE_HOME": str(home / "home")})
    try:
        for step, (name, fn) in enumerate([
            ("foreign", foreign),
            ("lock", lambda d: lock(d, server, hold=8, wait=60)),
            ("lock-past", lambda d: lock(d, server, hold=15, wait=3)),
            ("huge-plain", lambda d: huge(d, server, stream=False)),
            ("huge-stream", lambda d: huge(d, server, stream=True)),
            ("disk-freed", lambda d: disk_full(d / "disk", server, freed_while_waiting=True)),
            ("disk-full", lambda d: disk_full(d / "disk", server, freed_while_waiting=False)),
            ("kills", lambda d: kills(d, server)),
            ("hostile", lambda d: hostile(d, server)),
        ]):
            folder = home / f"{step}-{name}"
            folder.mkdir()
            fn(folder)
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    headers = ("fault", "outcome", "answers lost", "answers paid twice", "files changed")
    widths = [max(len(r[i]) for r in [headers, *ROWS]) for i in range(5)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\n{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
