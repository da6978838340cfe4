"""The project's run lock: a file beside the project that the process running a
generation holds locked (flock) for the run's whole life.

The lock is what says, on this host, that a run is alive: the kernel releases it
when its process ends however it ends (killed, crashed), and keeps it while the
process is only stopped (Ctrl-Z, SIGSTOP) or too busy to write a heartbeat. The
file holds ``pid run_id`` of its holder, for messages and for liveness checks
by other processes.

Checking a lock takes it shared for a moment (``holder``); taking it for a run
(``RunLock.acquire``) retries for a short while so a check in progress never
looks like a run. Where the file cannot be made (a read-only folder) there is no
lock and liveness falls back to the process id and its start time.

``is_alive(run)`` is the liveness rule itself: the store needs it to refuse a second
run, the runner and the batch poller to recognise a dead one.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.proc import is_suspended, pid_alive, process_start_time
from .records import RunRecord

try:
    import fcntl
except ImportError:  # no flock here (Windows): no lock; liveness falls back to the pid
    fcntl = None  # type: ignore[assignment]

ACQUIRE_WAIT_S = 1.0  # how long a check by another process may delay taking the lock


def lock_path(project: str | os.PathLike[str]) -> Path:
    project = Path(project)
    return project.with_name(project.name + ".run.lock")


@dataclass(frozen=True)
class Holder:
    """Who holds a project's run lock: its process and (once claimed) its run."""

    pid: int | None
    run_id: int | None


def _read_holder(fd: int) -> Holder:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    except OSError:
        text = []

    def num(i: int) -> int | None:
        try:
            return int(text[i])
        except (IndexError, ValueError):
            return None

    return Holder(num(0), num(1))


def holder(project: str | os.PathLike[str]) -> Holder | None:
    """The process holding the run lock of ``project``, or None when nobody does
    (or there is no lock file, or it cannot be checked)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_path(project), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:  # ENOLCK on some network file systems: no answer here
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The run lock of one project, as taken by the process that runs it."""

    def __init__(self, project: str | os.PathLike[str]):
        self.path = lock_path(project)
        self._fd: int | None = None
        self.run_id: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, run_id: int | None = None, wait_s: float = ACQUIRE_WAIT_S) -> Holder | None:
        """Take the lock. Returns None when taken (or when no lock can be made here:
        then ``held`` stays False), else the process that holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held for run #{self.run_id}")
        self.run_id = run_id
        if fcntl is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None  # a read-only folder: no lock; the pid check still works
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = _read_holder(fd)
                # A run's holder names itself; an unnamed holder may be a liveness check.
                if (other.pid is not None and other.pid != os.getpid()) or time.monotonic() >= deadline:
                    os.close(fd)
                    self.run_id = None
                    return other
                time.sleep(0.02)
            except OSError as exc:
                os.close(fd)
                self.run_id = None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    return None
                raise
        self._fd = fd
        self.claim(run_id)
        return None

    def claim(self, run_id: int | None) -> None:
        """Name the run this lock is held for (written into the file)."""
        self.run_id = run_id
        if self._fd is None:
            return
        text = f"{os.getpid()} {run_id if run_id is not None else '-'}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text, 0)
        except OSError:
            pass  # the lock still holds; only messages lose the holder's name

    def release(self) -> None:
        self.run_id = None
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no stale name for the next reader
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


STALE_AFTER_S = 30.0  # another host's run this long without a heartbeat is dead (it beats every ~0.5 s)
STALE_ENV = "GRIDTUNE_STALE_AFTER_S"  # overrides STALE_AFTER_S (tests shrink it)
START_SLACK_S = 2.0  # clock granularity when comparing a process's start with a heartbeat


def stale_after_s() -> float:
    try:
        value = float(os.environ.get(STALE_ENV, ""))
    except ValueError:
        return STALE_AFTER_S
    return value if value > 0 else STALE_AFTER_S


def is_alive(run: RunRecord, project: str | os.PathLike[str] | None = None, *, now: float | None = None) -> bool:
    """Whether the process recorded for ``run`` is still running it.

    On this host the process decides, never the heartbeat's age: a run whose
    runner holds the project's run lock (given ``project``) is alive, even
    stopped with Ctrl-Z or SIGSTOP; otherwise its pid must be a live process
    (not a zombie) that started before the run's last heartbeat, so a pid reused
    by a newer process does not count. Only a run on another host (a project on
    a shared file system) is judged by its heartbeat, stale after
    ``stale_after_s()``.
    """
    if project is not None:
        held = holder(project)
        if held is not None and held.run_id == run.id:
            return True
    if run.host != socket.gethostname():
        now = time.time() if now is None else now
        return run.heartbeat_at is None or now - run.heartbeat_at <= stale_after_s()
    if run.pid is None or not pid_alive(run.pid):
        return False
    started = process_start_time(run.pid)
    since = run.heartbeat_at if run.heartbeat_at is not None else run.started_at
    return started is None or since is None or started <= since + START_SLACK_S


def suspended(run: RunRecord) -> bool:
    """Whether the run's process (on this host) is stopped by a signal (Ctrl-Z,
    SIGSTOP): alive, but it acts on nothing, a stop request included, until resumed."""
    return run.pid is not None and run.host == socket.gethostname() and is_suspended(run.pid)
