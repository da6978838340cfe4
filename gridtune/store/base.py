"""The project file's handle underneath the ``Store`` façade: the connection, its lock,
transactions and plain queries, the store's errors, and the SQL and helpers the parts
(cells.py, runs.py, grades.py, exports.py) share. ``project.Store`` puts the parts
together; nothing outside store/ needs this module."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..core.errors import GridtuneError, one_line
from .records import CompletionRecord, RunRecord
from .runlock import Holder, RunLock


class StoreError(GridtuneError):
    """A problem with the project file, with a one-line message."""


BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's transaction
BUSY_ENV = "GRIDTUNE_BUSY_TIMEOUT_S"  # overrides it (tests shorten it)


def busy_timeout_s() -> float:
    try:
        value = float(os.environ.get(BUSY_ENV, ""))
    except ValueError:
        return BUSY_TIMEOUT_S
    return value if 0 <= value < 86400 else BUSY_TIMEOUT_S


def sqlite_error_kind(exc: BaseException) -> str:
    """A SQLite error's family: locked, readonly, full, corrupt, notadb, cantopen, io or other."""
    name = (getattr(exc, "sqlite_errorname", "") or "").upper()
    text = str(exc).lower()
    for kind, names, words in (
        ("locked", ("SQLITE_BUSY", "SQLITE_LOCKED"), ("database is locked", "database table is locked")),
        ("readonly", ("SQLITE_READONLY",), ("readonly database", "read-only")),
        ("full", ("SQLITE_FULL",), ("disk is full", "database or disk is full")),
        ("corrupt", ("SQLITE_CORRUPT",), ("malformed", "corrupt")),
        ("notadb", ("SQLITE_NOTADB",), ("not a database",)),
        ("cantopen", ("SQLITE_CANTOPEN",), ("unable to open",)),
        ("io", ("SQLITE_IOERR",), ("disk i/o error",)),
    ):
        if any(name.startswith(n) for n in names) or any(w in text for w in words):
            return kind
    return "other"


def describe_sqlite_error(exc: BaseException, path: str | os.PathLike[str] | None = None) -> str:
    """One line for a person: what went wrong with the project file and what to do."""
    detail = one_line(exc, whole=True)
    head = f"{path}: " if path is not None else "the project file: "
    what = {
        "locked": f"the project is locked by another process (busy longer than {busy_timeout_s():g} s); "
                  "try again when it is done",
        "readonly": "the project file (or its folder) is read-only; nothing was changed",
        "full": "the disk is full; nothing more was saved (free some space and try again)",
        "corrupt": "the project file is damaged; restore it from a copy",
        "notadb": "not a gridtune project (not a SQLite database)",
        "cantopen": "cannot open the project file (check that it and its folder are readable and writable)",
        "io": "the disk failed to read or write the project file",
    }.get(sqlite_error_kind(exc))
    return head + (f"{what} ({detail})" if what else f"database error: {detail}")


class RunLost(StoreError):
    """This process's run is no longer its own: another process declared it dead
    (or took the project over). The runner must stop at once, writing nothing."""

    def __init__(self, run_id: int, state: str | None):
        self.run_id, self.state = run_id, state
        now = f"was marked {state} by another process" if state else "is gone from the project"
        super().__init__(f"run #{run_id} {now}; stopped at once without saving more")


class RunConflict(StoreError):
    """Another generation run is active on this project."""

    def __init__(self, run: RunRecord | None, holder: Holder | None = None):
        self.run = run
        if run is None:  # a process holds the run lock but has not recorded its run yet
            who = f"pid {holder.pid}" if holder and holder.pid else "another process"
            super().__init__(f"another gridtune process ({who}) is starting a run on this project; "
                             f"wait for it or stop it with `gridtune stop`")
            return
        where = f"pid {run.pid} on {run.host}" if run.pid else "another process"
        super().__init__(
            f"run #{run.id} is already {run.state} on this project ({where}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run.started_at))}); "
            f"stop it with `gridtune stop` or wait for it"
        )


_CURRENT_GRADE_SQL = """
UPDATE completions SET (grade, grade_source) = (
    SELECT g.grade, g.source FROM grades g
    WHERE g.completion_id = completions.id AND g.undone = 0
    ORDER BY (g.source = 'person') DESC, (g.source = 'dedup' AND g.grade = 0) DESC, g.id DESC LIMIT 1)
WHERE id = ?
"""
# A near-duplicate dropped by `dedup --drop` stays rejected when another automatic
# grader (by length, a judge) grades it later; a person's grade still decides, and
# undoing the drop brings the automatic grade back.

_ACTIVE = "cell_id IN (SELECT id FROM cells WHERE active = 1)"
# Cells a person added (a playground answer promoted into the data, `gridtune add`)
# are numbered from PERSON_ORDINAL on, after every grid cell (sync_grid numbers those
# 0..N-1, and a grid is far smaller). sync_grid never fills them with teacher work,
# and a cell holding a person's answer stays active when a grid edit drops its values:
# the answer is data a person chose, and is never lost to an edit.
PERSON_ORDINAL = 1 << 40
_PERSON_ADDED = "json_extract(params_json, '$.added_by') = 'person' AND status = 'done'"
_CUT_OFF = "coalesce(c.finish_reason, '') = 'length'"  # records.CUT_OFF_REASON; needs the alias c
# A runner's write, given its run id (twice), lands only while its run is active: a
# run declared dead by another process (which may have taken the project over)
# writes nothing more. No run id (tests, imports): no condition.
_RUN_IS_ACTIVE = (
    "(? IS NULL OR EXISTS (SELECT 1 FROM runs WHERE runs.id = ? "
    "AND runs.state IN ('starting', 'running', 'stopping')))"
)


class StoreBase:
    """The connection and its lock; the parts of ``Store`` derive from this."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._run_lock = RunLock(path)  # held while this handle runs a generation

    def checkpoint(self) -> None:
        """Move everything committed from the WAL into the main file."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: a write lock up front, so no deadlock on upgrade.

        Nested use joins the open transaction (the generation runner's group
        commit wraps many single writes in one); an error inside a nested block
        is raised to the outer one, which decides.
        """
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                # SQLite rolls back by itself on some errors (disk full, I/O): then there
                # is nothing to roll back, and the original error is what to report.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self._conn.execute("COMMIT")
                except BaseException:  # a full disk at commit: leave no transaction open behind
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def _row(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row:
        """The row of a query that always has one (an aggregate, a pragma)."""
        row = self._one(sql, params)
        if row is None:
            raise StoreError(f"{self.path}: the project file answered nothing to {sql.split()[0]}")
        return row

    @property
    def schema_version(self) -> int:
        return self._row("PRAGMA user_version")[0]


def _completion(row: sqlite3.Row) -> CompletionRecord:
    return CompletionRecord(
        id=row["id"], cell_id=row["cell_id"], sample=row["sample"],
        values=json.loads(row["values_json"]), status=row["status"], text=row["text"],
        original_text=row["original_text"], length=row["length"], model=row["model"],
        params=json.loads(row["params_json"]) if row["params_json"] else None,
        prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
        latency_s=row["latency_s"], finish_reason=row["finish_reason"], attempts=row["attempts"],
        error=row["error"], error_kind=row["error_kind"], grade=row["grade"],
        grade_source=row["grade_source"], updated_at=row["updated_at"],
    )


def _without_credentials(url: str | None) -> str | None:
    """A backend URL as the project may keep it: no user:password@, no query (?api-key=)."""
    if not url:
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _new_id(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just added."""
    if cur.lastrowid is None:  # only after a statement that inserted nothing
        raise StoreError("the project file did not add the row")
    return cur.lastrowid


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)
