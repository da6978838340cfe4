"""Processes on this machine, by pid: alive or not, stopped or not, started when.

Linux's /proc answers the finer questions; where it cannot, the answers lean to
"alive" and "unknown" so that nobody declares a live process dead.
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (the state letter) on; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (R, S, D, T, t, Z, …), None where /proc cannot tell."""
    fields = _stat_fields(pid)
    return fields[0].decode() if fields else None


def pid_alive(pid: object) -> bool:
    """Whether ``pid`` names a running process (someone else's counts; a zombie,
    killed but not yet reaped by its parent, does not). Anything but a positive
    int is not a process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return process_state(pid) != "Z"


def is_suspended(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (Ctrl-Z, SIGSTOP, a tracer)."""
    return process_state(pid) in ("T", "t")


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds, within a second or so), from
    /proc/<pid>/stat field 22; None where /proc cannot tell."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        ticks = int(fields[19])  # field 22: fields here start at field 3 (state)
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None
