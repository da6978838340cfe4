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
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

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
