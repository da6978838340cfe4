"""The project file: one SQLite database per project.

WAL mode so the TUI and the command line can use one file at the same time;
every write is its own short transaction, so a killed process loses nothing
that was committed and never leaves a half-written row.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ..core.errors import GridtuneError, one_line
from .records import (
    ACTIVE_RUN_STATES,
    CompletionRecord,
    ExportRecord,
    GradeRecord,
    JobRecord,
    RunRecord,
    StatusCounts,
    WorkItem,
)
from .runlock import Holder, RunLock, holder as run_lock_holder
from .schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, shape, shape_of_version


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


class Store:
    """A handle on one project file. Safe to share between threads."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._run_lock = RunLock(path)  # held while this handle runs a generation

    # -- opening -----------------------------------------------------------
    @staticmethod
    def check_new(path: str | os.PathLike[str]) -> None:
        """Refuse as ``open(path, create=True)`` would (it exists; no folder can be
        made for it), without creating the file."""
        path = Path(path)
        try:
            if path.exists() or path.is_symlink():
                raise StoreError(f"{path}: already exists; not overwriting it")
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None

    def checkpoint(self) -> None:
        """Move everything committed from the WAL into the main file."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> Store:
        path = Path(path)
        try:
            exists = path.exists()
            if create and not exists:
                path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        if not create and not exists:
            raise StoreError(f"{path}: no such project (create one with `gridtune new {path} --spec SPEC.toml`)")
        if create and exists:
            raise StoreError(f"{path}: already exists; not overwriting it")
        if not create:
            _identify(path)  # read-only: a file that is not a project is never written to
        busy_s = busy_timeout_s()
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, timeout=busy_s, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_s * 1000)}")
            store = cls(path, conn)
            if create:
                # The schema and the marker go in before WAL, in rollback mode, so the
                # marker is in the main file itself from the first commit.
                store._migrate(create=True)
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL: a commit survives the process being killed (it is in the
            # WAL file), without an fsync per completion.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            if not create:
                store._migrate()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            kind = sqlite_error_kind(exc)
            if create or kind == "notadb" or (kind == "other" and not isinstance(exc, sqlite3.OperationalError)):
                what = "cannot create the project" if create else "not a gridtune project"
                raise StoreError(f"{path}: {what} ({exc})") from None
            raise StoreError(describe_sqlite_error(exc, path)) from None
        except StoreError:
            if conn is not None:
                conn.close()
            raise
        return store

    def _migrate(self, *, create: bool = False) -> None:
        """Bring the file to SCHEMA_VERSION and mark it, one migration per transaction.

        Each step reads the version inside its write lock, so two processes opening
        an old project at once migrate it once. An old unmarked project gets the
        marker with its first step (or alone, when it needs no migration)."""
        with self._lock:  # the usual case takes no write lock: a read-only project still opens
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            if version == SCHEMA_VERSION and app_id == APPLICATION_ID:
                return
        while True:
            with self.transaction() as c:
                version = c.execute("PRAGMA user_version").fetchone()[0]
                marked = c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
                if not create and not marked and not _is_old_project(c, version):
                    raise StoreError(f"{self.path}: not a gridtune project")
                if version > SCHEMA_VERSION:
                    raise StoreError(_newer(self.path, version))
                if version == SCHEMA_VERSION and marked:
                    return
                if version < SCHEMA_VERSION:
                    for statement in _split_sql(MIGRATIONS[version]):
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version = {version + 1}")
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def close(self) -> None:
        with self._lock:
            self._run_lock.release()
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # -- spec and cells ----------------------------------------------------
    def spec_json(self) -> str | None:
        row = self._one("SELECT json FROM spec WHERE id = 1")
        return row["json"] if row else None

    def sync_grid(self, spec_json: str, cells: Iterable[tuple[str, str]], samples: int) -> dict[str, int]:
        """Store the spec and make the cells exactly ``cells`` (key, values_json).

        Cells that left the grid are deactivated, not deleted: their completions
        come back if the cell does. A cell that holds an answer a person added stays
        active, as a person cell (see PERSON_ORDINAL). Each grid cell gets ``samples``
        completions; person cells get none from here.
        """
        now = time.time()
        with self.transaction() as c:
            before = {r[0] for r in c.execute("SELECT key FROM cells WHERE active = 1")}
            c.execute(
                "INSERT INTO spec (id, json, updated_at) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET json = excluded.json, updated_at = excluded.updated_at",
                (spec_json, now),
            )
            c.execute("UPDATE cells SET active = 0")
            keys: list[str] = []

            def rows() -> Iterator[tuple[str, str, int]]:
                for ordinal, (key, values_json) in enumerate(cells):
                    keys.append(key)
                    yield key, values_json, ordinal

            c.executemany(
                "INSERT INTO cells (key, values_json, ordinal, active) VALUES (?, ?, ?, 1) "
                "ON CONFLICT(key) DO UPDATE SET ordinal = excluded.ordinal, active = 1, "
                "values_json = excluded.values_json",
                rows(),
            )
            # A cell out of the grid that holds a person's answer stays, as a person cell.
            c.execute(
                "UPDATE cells SET active = 1, ordinal = ? + id WHERE active = 0 AND id IN "
                f"(SELECT cell_id FROM completions WHERE {_PERSON_ADDED})", (PERSON_ORDINAL,))
            kept_by_person = [r[0] for r in c.execute("SELECT key FROM cells WHERE active = 1 AND ordinal >= ?",
                                                      (PERSON_ORDINAL,))]
            # Unfinished samples beyond the new count are dropped; finished ones are data.
            c.execute("DELETE FROM completions WHERE sample >= ? AND status != 'done'", (samples,))
            c.execute(
                """
                WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n + 1 < ?)
                INSERT INTO completions (cell_id, sample, status, created_at, updated_at)
                SELECT cells.id, s.n, 'pending', ?, ? FROM cells, s WHERE cells.active = 1 AND cells.ordinal < ?
                ON CONFLICT (cell_id, sample) DO NOTHING
                """,
                (samples, now, now, PERSON_ORDINAL),
            )
        after = set(keys) | set(kept_by_person)
        return {
            "cells": len(after),
            "added": len(after - before),
            "kept": len(after & before),
            "removed": len(before - after),
        }

    def has_done(self) -> bool:
        """Whether any completion is finished: an index probe, not a count."""
        return self._one("SELECT 1 FROM completions WHERE status = 'done' LIMIT 1") is not None

    def cell_count(self) -> int:
        return self._row("SELECT count(*) FROM cells WHERE active = 1")[0]

    def cells(self) -> list[tuple[int, dict[str, Any]]]:
        rows = self._query("SELECT id, values_json FROM cells WHERE active = 1 ORDER BY ordinal")
        return [(r["id"], json.loads(r["values_json"])) for r in rows]

    # -- generation work ---------------------------------------------------
    def pending_work(self, limit: int | None = None) -> list[WorkItem]:
        """Completions still to generate (pending or failed), in grid order."""
        sql = (
            "SELECT c.id, c.cell_id, c.sample, c.attempts, cells.values_json FROM completions c "
            "JOIN cells ON cells.id = c.cell_id "
            "WHERE cells.active = 1 AND c.status IN ('pending', 'failed', 'running') "
            "ORDER BY cells.ordinal, c.sample"
        )
        params: tuple[Any, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        return [
            WorkItem(r["id"], r["cell_id"], r["sample"], json.loads(r["values_json"]), r["attempts"])
            for r in self._query(sql, params)
        ]

    def save_done(
        self,
        completion_id: int,
        *,
        text: str,
        model: str | None,
        params: dict[str, Any] | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        latency_s: float | None,
        finish_reason: str | None,
        attempts: int,
        run_id: int | None = None,
    ) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "UPDATE completions SET status = 'done', text = ?, original_text = NULL, length = ?, "
                "model = ?, params_json = ?, prompt_tokens = ?, completion_tokens = ?, latency_s = ?, "
                "finish_reason = ?, attempts = ?, error = NULL, error_kind = NULL, run_id = ?, "
                f"updated_at = ? WHERE id = ? AND status != 'done' AND {_RUN_IS_ACTIVE}",
                (
                    text, len(text), model, _dumps(params), prompt_tokens, completion_tokens,
                    latency_s, finish_reason, attempts, run_id, now, completion_id, run_id, run_id,
                ),
            )

    def save_failed(
        self,
        completion_id: int,
        *,
        error: str,
        error_kind: str,
        attempts: int,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        run_id: int | None = None,
    ) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE completions SET status = 'failed', error = ?, error_kind = ?, attempts = ?, "
                "model = COALESCE(?, model), params_json = COALESCE(?, params_json), run_id = ?, "
                f"updated_at = ? WHERE id = ? AND status != 'done' AND {_RUN_IS_ACTIVE}",
                (error, error_kind, attempts, model, _dumps(params), run_id, time.time(), completion_id,
                 run_id, run_id),
            )

    def mark_running(self, completion_id: int, run_id: int) -> None:
        """A request for this completion is in flight (finish_run puts it back to pending)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE completions SET status = 'running', run_id = ?, updated_at = ? "
                f"WHERE id = ? AND status != 'done' AND {_RUN_IS_ACTIVE}",
                (run_id, time.time(), completion_id, run_id, run_id),
            )

    def release_running(self, completion_id: int, run_id: int | None = None) -> None:
        """An in-flight request was cancelled: its completion is pending again
        (given ``run_id``: only while that run still holds it and is active)."""
        with self.transaction() as c:
            sql = "UPDATE completions SET status = 'pending' WHERE id = ? AND status = 'running'"
            params: tuple[Any, ...] = (completion_id,)
            if run_id is not None:
                sql += f" AND run_id = ? AND {_RUN_IS_ACTIVE}"
                params = (completion_id, run_id, run_id, run_id)
            c.execute(sql, params)

    def failure_reasons(self, run_id: int | None = None, limit: int = 5) -> list[tuple[str, int]]:
        """The commonest errors of failed completions (of one run, or all): (error, count)."""
        sql = ("SELECT coalesce(error, 'unknown error'), count(*) FROM completions "
               f"WHERE status = 'failed' AND {_ACTIVE}")
        params: tuple[Any, ...] = ()
        if run_id is not None:
            sql += " AND run_id = ?"
            params = (run_id,)
        sql += " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?"
        return [(r[0], r[1]) for r in self._query(sql, (*params, limit))]

    def reset_running(self) -> int:
        """Return completions left 'running' by a dead process to pending."""
        with self.transaction() as c:
            return c.execute("UPDATE completions SET status = 'pending' WHERE status = 'running'").rowcount

    # -- runs ----------------------------------------------------------------
    def start_run(
        self,
        *,
        pid: int,
        host: str,
        model: str | None,
        params: dict[str, Any] | None,
        is_alive: Callable[[RunRecord], bool],
        state: str = "running",
    ) -> int:
        """Record a new run, refusing if another live run holds the project.

        A run started to run here (``state`` 'running') takes the project's run
        lock first and holds it until ``finish_run`` or ``close``; one recorded
        for another process to adopt (``state`` 'starting') only checks it.
        A run recorded as active whose process is gone is marked 'died' and its
        work returned to pending, so the new run picks it up.
        """
        claiming = state != "starting"
        if self._run_lock.held or self._run_lock.run_id is not None:  # one run per handle
            raise RunConflict(self.active_run())
        if claiming:
            other = self._run_lock.acquire()
            if other is not None:
                raise RunConflict(self.active_run(), other)
        else:
            other = run_lock_holder(self.path)
            if other is not None:
                raise RunConflict(self.active_run(), other)
        now = time.time()
        try:
            with self.transaction() as c:
                for row in c.execute(
                    f"SELECT * FROM runs WHERE state IN ({','.join('?' * len(ACTIVE_RUN_STATES))})",
                    ACTIVE_RUN_STATES,
                ).fetchall():
                    run = RunRecord.from_row(row)
                    if is_alive(run):
                        raise RunConflict(run)
                    c.execute(
                        "UPDATE runs SET state = 'died', ended_at = ?, error = COALESCE(error, ?) WHERE id = ?",
                        (now, "its process ended without finishing", run.id),
                    )
                c.execute("UPDATE completions SET status = 'pending' WHERE status = 'running'")
                cur = c.execute(
                    "INSERT INTO runs (pid, host, started_at, heartbeat_at, state, model, params_json) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (pid, host, now, now, state, model, _dumps(params)),
                )
                run_id = _new_id(cur)
        except BaseException:
            if claiming:
                self._run_lock.release()
            raise
        if claiming:
            self._run_lock.claim(run_id)
        return run_id

    def adopt_run(self, run_id: int, *, pid: int, host: str) -> bool:
        """A detached process takes over a run recorded (state 'starting') by its
        parent, taking the project's run lock for it. False if the run is gone or
        already ended; a stop requested meanwhile is kept (state stays 'stopping').
        RunConflict if another process holds the run lock."""
        if self._run_lock.held or self._run_lock.run_id is not None:
            raise RunConflict(self.active_run())
        other = self._run_lock.acquire(run_id)
        if other is not None:
            raise RunConflict(self.active_run(), other)
        try:
            with self.transaction() as c:
                cur = c.execute(
                    "UPDATE runs SET pid = ?, host = ?, heartbeat_at = ?, "
                    "state = CASE WHEN state = 'starting' THEN 'running' ELSE state END "
                    "WHERE id = ? AND state IN ('starting', 'stopping')",
                    (pid, host, time.time(), run_id),
                )
                adopted = cur.rowcount == 1
        except BaseException:
            self._run_lock.release()
            raise
        if not adopted:
            self._run_lock.release()
        return adopted

    @property
    def holds_run_lock(self) -> bool:
        """Whether this handle holds the project's run lock (it is running a generation)."""
        return self._run_lock.held

    def update_run(self, run_id: int, **fields: Any) -> None:
        allowed = {"pid", "host", "state", "model", "error", "ended_at", "heartbeat_at"}
        sets, values = [], []
        for key, value in fields.items():
            if key == "progress":
                sets.append("progress_json = ?")
                values.append(_dumps(value))
            elif key == "params":
                sets.append("params_json = ?")
                values.append(_dumps(value))
            elif key in allowed:
                sets.append(f"{key} = ?")
                values.append(value)
            else:
                raise ValueError(f"unknown run field {key!r}")
        if not sets:
            return
        with self.transaction() as c:
            c.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*values, run_id))

    def heartbeat(self, run_id: int, progress: dict[str, Any]) -> bool:
        """Save the latest progress; returns whether a stop was requested.

        Raises RunLost when the run is no longer this process's to write: it
        ended or was declared dead meanwhile, or (held here) another process
        owns it now. Nothing is written then."""
        with self.transaction() as c:
            row = c.execute("SELECT state, pid, stop_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row["state"] not in ACTIVE_RUN_STATES or (
                self._run_lock.run_id == run_id and row["pid"] != os.getpid()
            ):
                raise RunLost(run_id, row["state"] if row else None)
            c.execute(
                "UPDATE runs SET heartbeat_at = ?, progress_json = ? WHERE id = ?",
                (time.time(), _dumps(progress), run_id),
            )
        return bool(row["stop_requested"])

    def finish_run(self, run_id: int, state: str, error: str | None = None,
                   progress: dict[str, Any] | None = None) -> None:
        """End a run: its in-flight completions back to pending, its final state.
        A run that already ended (declared dead by another process) is left as it
        is: its former runner writes nothing more. Releases the run lock."""
        try:
            with self.transaction() as c:
                row = c.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None or row["state"] not in ACTIVE_RUN_STATES:
                    return
                c.execute("UPDATE completions SET status = 'pending' WHERE status = 'running' AND run_id = ?",
                          (run_id,))
                c.execute(
                    "UPDATE runs SET state = ?, ended_at = ?, error = ?, "
                    "progress_json = COALESCE(?, progress_json) WHERE id = ?",
                    (state, time.time(), error, _dumps(progress), run_id),
                )
        finally:
            if self._run_lock.run_id == run_id:
                self._run_lock.release()

    def request_stop(self, run_id: int) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET stop_requested = 1, "
                "state = CASE WHEN state IN ('starting', 'running') THEN 'stopping' ELSE state END "
                "WHERE id = ?",
                (run_id,),
            )

    def get_run(self, run_id: int) -> RunRecord | None:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        return RunRecord.from_row(row) if row else None

    def active_run(self) -> RunRecord | None:
        row = self._one(
            f"SELECT * FROM runs WHERE state IN ({','.join('?' * len(ACTIVE_RUN_STATES))}) "
            "ORDER BY id DESC LIMIT 1",
            ACTIVE_RUN_STATES,
        )
        return RunRecord.from_row(row) if row else None

    def latest_run(self) -> RunRecord | None:
        row = self._one("SELECT * FROM runs ORDER BY id DESC LIMIT 1")
        return RunRecord.from_row(row) if row else None

    # -- completions ---------------------------------------------------------
    def get_completion(self, completion_id: int) -> CompletionRecord | None:
        row = self._one(
            "SELECT c.*, cells.values_json FROM completions c JOIN cells ON cells.id = c.cell_id WHERE c.id = ?",
            (completion_id,),
        )
        return _completion(row) if row else None

    def completions(self, status: str | None = None, limit: int | None = None,
                    newest_first: bool = False) -> list[CompletionRecord]:
        sql = ("SELECT c.*, cells.values_json FROM completions c JOIN cells ON cells.id = c.cell_id "
               "WHERE cells.active = 1")
        params: list[Any] = []
        if status:
            sql += " AND c.status = ?"
            params.append(status)
        sql += " ORDER BY c.updated_at DESC, c.id DESC" if newest_first else " ORDER BY cells.ordinal, c.sample"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_completion(r) for r in self._query(sql, params)]

    def review_rows(
        self,
        *,
        where: str = "all",
        min_grade: int | None = None,
        search: str | None = None,
        sort: str = "length",
        descending: bool = False,
    ) -> list[tuple[int, int, int | None, str]]:
        """Light rows for the review list: (id, length, grade, status).

        ``where``: all | done | ungraded | failed | graded | cut_off (see
        ``cut_off_among`` to mark cut-off rows in a list). Cheap enough at
        100,000 rows that the list can be rebuilt on every filter change.
        """
        clauses = ["cells.active = 1"]
        params: list[Any] = []
        if where == "done":
            clauses.append("c.status = 'done'")
        elif where == "ungraded":
            clauses.append("c.status = 'done' AND c.grade IS NULL")
        elif where == "graded":
            clauses.append("c.grade IS NOT NULL")
        elif where == "failed":
            clauses.append("c.status = 'failed'")
        elif where == "cut_off":
            clauses.append(f"c.status = 'done' AND {_CUT_OFF}")
        elif where != "all":
            raise ValueError(f"unknown filter {where!r}")
        if min_grade is not None:
            clauses.append("c.grade >= ?")
            params.append(min_grade)
        if search:
            clauses.append("(c.text LIKE ? ESCAPE '\\' OR cells.values_json LIKE ? ESCAPE '\\')")
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params += [pattern, pattern]
        order = {
            "length": "COALESCE(c.length, -1)",
            "grade": "COALESCE(c.grade, -1)",
            "grid": "cells.ordinal",
            "time": "c.updated_at",
        }[sort]
        direction = "DESC" if descending else "ASC"
        sql = (
            "SELECT c.id, COALESCE(c.length, 0), c.grade, c.status FROM completions c "
            f"JOIN cells ON cells.id = c.cell_id WHERE {' AND '.join(clauses)} "
            f"ORDER BY {order} {direction}, cells.ordinal, c.sample"
        )
        with self._lock:
            return [tuple(r) for r in self._conn.execute(sql, params)]

    def review_previews(self, ids: Sequence[int], chars: int = 160) -> dict[int, tuple[dict[str, Any], str]]:
        """Short previews for the review list's visible rows: id -> (values, text head).

        Read-only; one query for a screenful of ids. A completion without text
        previews as its error (failed) or an empty string (pending).
        """
        out: dict[int, tuple[dict[str, Any], str]] = {}
        ids = list(ids)
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            marks = ",".join("?" * len(chunk))
            for r in self._query(
                "SELECT c.id, cells.values_json, substr(COALESCE(c.text, c.error, ''), 1, ?) "
                f"FROM completions c JOIN cells ON cells.id = c.cell_id WHERE c.id IN ({marks})",
                (chars, *chunk),
            ):
                out[r[0]] = (json.loads(r[1]), r[2])
        return out

    def data_version(self) -> int:
        """SQLite's data_version: changes when *another* connection commits to the file."""
        return self._row("PRAGMA data_version")[0]

    def edit_text(self, completion_id: int, text: str) -> None:
        """A person's edit; the model's own text is kept in original_text."""
        with self.transaction() as c:
            c.execute(
                "UPDATE completions SET original_text = COALESCE(original_text, text), text = ?, "
                "length = ?, updated_at = ? WHERE id = ? AND status = 'done'",
                (text, len(text), time.time(), completion_id),
            )

    # -- grades ----------------------------------------------------------------
    def set_grade(self, completion_id: int, grade: int, source: str = "person") -> int | None:
        """Record a grade; returns the completion's current grade afterwards."""
        return self.set_grades([(completion_id, grade)], source)[0]

    def set_grades(self, pairs: Sequence[tuple[int, int]], source: str) -> list[int | None]:
        for _, grade in pairs:
            if not 0 <= grade <= 5:
                raise ValueError(f"grade must be 0..5, not {grade}")
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO grades (completion_id, grade, source, created_at) VALUES (?, ?, ?, ?)",
                [(cid, g, source, now) for cid, g in pairs],
            )
            c.executemany(_CURRENT_GRADE_SQL, [(cid,) for cid, _ in pairs])
            if len(pairs) > 50:
                return []
            return [
                c.execute("SELECT grade FROM completions WHERE id = ?", (cid,)).fetchone()[0]
                for cid, _ in pairs
            ]

    def undo_grade(self, completion_id: int) -> int | None:
        """Withdraw the newest grade of a completion; returns its grade afterwards."""
        return self.undo_grades([completion_id])[0]

    def undo_grades(self, completion_ids: Sequence[int]) -> list[int | None]:
        with self.transaction() as c:
            for cid in completion_ids:
                c.execute(
                    "UPDATE grades SET undone = 1 WHERE id = (SELECT max(id) FROM grades "
                    "WHERE completion_id = ? AND undone = 0)",
                    (cid,),
                )
                c.execute(_CURRENT_GRADE_SQL, (cid,))
            return [
                c.execute("SELECT grade FROM completions WHERE id = ?", (cid,)).fetchone()[0]
                for cid in completion_ids
            ]

    def grade_history(self, completion_id: int) -> list[GradeRecord]:
        rows = self._query("SELECT * FROM grades WHERE completion_id = ? ORDER BY id", (completion_id,))
        return [
            GradeRecord(r["id"], r["completion_id"], r["grade"], r["source"], r["created_at"], bool(r["undone"]))
            for r in rows
        ]

    def gradable(self, *, include_auto: bool = True) -> list[tuple[int, int]]:
        """(id, length) of finished completions that no person has graded."""
        sql = (
            "SELECT c.id, c.length FROM completions c JOIN cells ON cells.id = c.cell_id "
            "WHERE cells.active = 1 AND c.status = 'done' AND "
            + ("(c.grade_source IS NULL OR c.grade_source != 'person')" if include_auto else "c.grade IS NULL")
        )
        return [(r[0], r[1]) for r in self._query(sql)]

    def current_grades(self, ids: Sequence[int]) -> Iterator[tuple[int, int | None, str | None]]:
        """(id, grade, grade_source) of these completions, a chunk of ids per query."""
        ids = list(ids)
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT id, grade, grade_source FROM completions WHERE id IN ({marks})", chunk):
                yield r[0], r[1], r[2]

    def done_lengths(self, *, finished_only: bool = False) -> list[int]:
        """Lengths of finished completions; ``finished_only``: without the cut-off ones."""
        extra = f" AND NOT {_CUT_OFF}" if finished_only else ""
        return [r[0] for r in self._query(
            f"SELECT length FROM completions c WHERE status = 'done' AND {_ACTIVE}{extra} ORDER BY length"
        )]

    def ids_at_or_below(self, grade: int) -> list[int]:
        return [r[0] for r in self._query(
            f"SELECT id FROM completions WHERE grade IS NOT NULL AND grade BETWEEN 1 AND ? AND {_ACTIVE}",
            (grade,),
        )]

    # -- counts ----------------------------------------------------------------
    def status_counts(self) -> StatusCounts:
        row = self._row(
            f"""
            SELECT count(*) AS completions,
                   coalesce(sum(status = 'done'), 0) AS done,
                   coalesce(sum(status = 'failed'), 0) AS failed,
                   coalesce(sum(status = 'pending'), 0) AS pending,
                   coalesce(sum(status = 'running'), 0) AS running,
                   coalesce(sum(grade IS NOT NULL), 0) AS graded,
                   coalesce(sum(grade = 0), 0) AS rejected,
                   coalesce(sum(status = 'done' AND finish_reason = 'length'), 0) AS cut_off
            FROM completions WHERE {_ACTIVE}
            """
        )
        grades = {str(g): 0 for g in range(1, 6)}
        for r in self._query(
            f"SELECT grade, count(*) FROM completions WHERE grade BETWEEN 1 AND 5 AND {_ACTIVE} GROUP BY grade"
        ):
            grades[str(r[0])] = r[1]
        return StatusCounts(
            cells=self.cell_count(), completions=row["completions"], done=row["done"],
            failed=row["failed"], pending=row["pending"], running=row["running"],
            graded=row["graded"], rejected=row["rejected"], grades=grades, cut_off=row["cut_off"],
        )

    def usage_totals(self) -> dict[str, int]:
        row = self._row(
            "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
            "FROM completions WHERE status = 'done'"
        )
        return {"prompt_tokens": row[0], "completion_tokens": row[1]}

    # -- export rows ----------------------------------------------------------
    def iter_export_rows(self, min_grade: int | None, batch: int = 1000, *,
                         include_cut_off: bool = False) -> Generator[tuple[int, dict[str, Any], str, int | None]]:
        """(id, values, text, grade) of finished completions to export, in grid order.

        Rejected completions (grade 0) are never exported; ``min_grade`` keeps
        only completions graded at least that (ungraded ones are then left out);
        cut-off ones (finish_reason "length") only with ``include_cut_off``.
        Streams in batches so memory stays flat on large projects.
        """
        sql = (
            "SELECT c.id, cells.values_json, c.text, c.grade FROM completions c "
            "JOIN cells ON cells.id = c.cell_id WHERE cells.active = 1 AND c.status = 'done' "
            "AND c.text IS NOT NULL AND (c.grade IS NULL OR c.grade > 0)"
            + ("" if include_cut_off else f" AND NOT {_CUT_OFF}")
        )
        params: tuple[Any, ...] = ()
        if min_grade is not None and min_grade > 0:
            sql += " AND c.grade >= ?"
            params = (min_grade,)
        sql += " ORDER BY cells.ordinal, c.sample"
        # A separate connection: the read runs while the caller may write elsewhere.
        conn = sqlite3.connect(self.path, timeout=busy_timeout_s())
        try:
            cur = conn.execute(sql, params)
            while rows := cur.fetchmany(batch):
                for cid, values_json, text, grade in rows:
                    yield cid, json.loads(values_json), text, grade
        finally:
            conn.close()

    # -- exports and jobs -----------------------------------------------------
    def record_export(self, *, path: str, valid_path: str | None, format: str, min_grade: int | None,
                      separator: str | None, stop: str | None, validation_fraction: float,
                      n_train: int, n_valid: int, report: dict[str, Any] | None) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO exports (path, valid_path, format, min_grade, separator, stop, "
                "validation_fraction, n_train, n_valid, report_json, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (path, valid_path, format, min_grade, separator, stop, validation_fraction,
                 n_train, n_valid, _dumps(report), time.time()),
            )
            return _new_id(cur)

    def exports(self) -> list[ExportRecord]:
        return [
            ExportRecord(
                r["id"], r["path"], r["valid_path"], r["format"], r["min_grade"], r["separator"],
                r["stop"], r["validation_fraction"], r["n_train"], r["n_valid"],
                json.loads(r["report_json"]) if r["report_json"] else None, r["created_at"],
            )
            for r in self._query("SELECT * FROM exports ORDER BY id")
        ]

    def latest_export(self) -> ExportRecord | None:
        exports = self.exports()
        return exports[-1] if exports else None

    def record_job(self, *, id: str, base_url: str | None, model: str, training_file: str | None,
                   validation_file: str | None, export_id: int | None, status: str) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO jobs (id, base_url, model, training_file, validation_file, export_id, status, "
                "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "status = excluded.status, updated_at = excluded.updated_at",
                (id, _without_credentials(base_url), model, training_file, validation_file, export_id,
                 status, now, now),
            )

    def update_job(self, job_id: str, *, status: str, fine_tuned_model: str | None = None,
                   error: str | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE jobs SET status = ?, fine_tuned_model = COALESCE(?, fine_tuned_model), "
                "error = COALESCE(?, error), updated_at = ? WHERE id = ?",
                (status, fine_tuned_model, error, time.time(), job_id),
            )

    def jobs(self) -> list[JobRecord]:
        return [
            JobRecord(
                r["id"], r["base_url"], r["model"], r["training_file"], r["validation_file"],
                r["export_id"], r["status"], r["fine_tuned_model"], r["error"], r["created_at"], r["updated_at"],
            )
            for r in self._query("SELECT * FROM jobs ORDER BY created_at")
        ]

    # -- curation: cut-off completions, kept examples, redo, top-up (issue 9) -------
    def cut_off_among(self, ids: Sequence[int]) -> set[int]:
        """Which of ``ids`` are finished completions cut off at max tokens: one query
        per 900 ids, for marking the visible rows of a list."""
        out: set[int] = set()
        ids = list(ids)
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            marks = ",".join("?" * len(chunk))
            out.update(r[0] for r in self._query(
                f"SELECT id FROM completions c WHERE id IN ({marks}) AND status = 'done' AND {_CUT_OFF}", chunk))
        return out

    def redo_items(self, *, ids: Sequence[int] | None = None,
                   below_max_tokens: int | None = None) -> list[WorkItem]:
        """Completions to generate again, in grid order.

        ``ids`` given: exactly those (in active cells, any status). Otherwise the
        finished cut-off ones whose recorded max_tokens is below ``below_max_tokens``
        (or unknown): those already redone with as many tokens are not redone again,
        so repeating an interrupted redo finishes it instead of starting over.
        """
        base = ("SELECT c.id, c.cell_id, c.sample, c.attempts, cells.values_json, c.params_json "
                "FROM completions c JOIN cells ON cells.id = c.cell_id WHERE cells.active = 1")
        if ids is not None:
            rows: list[sqlite3.Row] = []
            ids = list(ids)
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                rows += self._query(base + f" AND c.id IN ({','.join('?' * len(chunk))})", chunk)
        else:
            rows = self._query(base + f" AND c.status = 'done' AND {_CUT_OFF}")
        items = []
        for r in sorted(rows, key=lambda r: r["id"]):
            if ids is None and below_max_tokens is not None:
                used = (json.loads(r["params_json"]) if r["params_json"] else {}).get("max_tokens")
                if isinstance(used, int) and used >= below_max_tokens:
                    continue
            items.append(WorkItem(r["id"], r["cell_id"], r["sample"], json.loads(r["values_json"]), r["attempts"]))
        order = {cid: i for i, (cid, _v) in enumerate(self.cells())}
        return sorted(items, key=lambda w: (order.get(w.cell_id, 0), w.sample))

    def save_redone(self, completion_id: int, *, text: str, model: str | None, params: dict[str, Any] | None,
                    prompt_tokens: int | None, completion_tokens: int | None, latency_s: float | None,
                    finish_reason: str | None, attempts: int, run_id: int | None = None) -> None:
        """A new generation replaces a completion's text, whatever its status.

        The grades given to the old text (a person's too: they judged a text that
        is gone) are withdrawn, kept in the history as undone; a person's edit of
        the old text goes with it. One transaction, only while ``run_id`` is active.
        """
        now = time.time()
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE completions SET status = 'done', text = ?, original_text = NULL, length = ?, "
                "model = ?, params_json = ?, prompt_tokens = ?, completion_tokens = ?, latency_s = ?, "
                "finish_reason = ?, attempts = ?, error = NULL, error_kind = NULL, run_id = ?, "
                f"updated_at = ? WHERE id = ? AND {_RUN_IS_ACTIVE}",
                (text, len(text), model, _dumps(params), prompt_tokens, completion_tokens, latency_s,
                 finish_reason, attempts, run_id, now, completion_id, run_id, run_id),
            )
            if cur.rowcount:
                c.execute("UPDATE grades SET undone = 1 WHERE completion_id = ? AND undone = 0", (completion_id,))
                c.execute(_CURRENT_GRADE_SQL, (completion_id,))

    def kept_by_cell(self, min_grade: int | None = None) -> dict[int, int]:
        """Kept examples per active cell (cells with none are absent).

        Kept (pipeline/coverage.py documents it): finished, with non-blank text, not
        rejected (grade 0), not cut off, and graded at least ``min_grade`` when one
        is given (ungraded ones are kept without it), as the export keeps them.
        """
        sql = (
            "SELECT c.cell_id, count(*) FROM completions c JOIN cells ON cells.id = c.cell_id "
            "WHERE cells.active = 1 AND c.status = 'done' AND c.text IS NOT NULL "
            "AND length(trim(c.text, ' ' || char(9, 10, 11, 12, 13))) > 0 "
            f"AND (c.grade IS NULL OR c.grade > 0) AND NOT {_CUT_OFF}"
        )
        params: tuple[Any, ...] = ()
        if min_grade is not None and min_grade > 0:
            sql += " AND c.grade >= ?"
            params = (min_grade,)
        return {r[0]: r[1] for r in self._query(sql + " GROUP BY c.cell_id", params)}

    def unfinished_by_cell(self) -> dict[int, int]:
        """Completions not generated yet (pending, running or failed) per active cell."""
        return {r[0]: r[1] for r in self._query(
            "SELECT c.cell_id, count(*) FROM completions c JOIN cells ON cells.id = c.cell_id "
            "WHERE cells.active = 1 AND c.status IN ('pending', 'running', 'failed') GROUP BY c.cell_id"
        )}

    def add_samples(self, counts: dict[int, int]) -> list[int]:
        """Add ``n`` new pending samples (the next sample numbers, so new seeds) to
        each cell ``cell_id -> n``, in one transaction; returns the new completion ids.
        A grid edit (sync_grid) drops those still unfinished beyond the spec's samples."""
        now = time.time()
        new: list[int] = []
        with self.transaction() as c:
            for cell_id, n in sorted(counts.items()):
                top = c.execute("SELECT coalesce(max(sample), -1) FROM completions WHERE cell_id = ?",
                                (cell_id,)).fetchone()[0]
                for sample in range(top + 1, top + 1 + n):
                    cur = c.execute(
                        "INSERT INTO completions (cell_id, sample, status, created_at, updated_at) "
                        "VALUES (?, ?, 'pending', ?, ?)", (cell_id, sample, now, now))
                    new.append(_new_id(cur))
        return new

    # -- what a person adds (pipeline/promote.py) ------------------------------
    def add_person_completion(self, key: str, values_json: str, *, text: str, model: str | None, grade: int,
                              params: dict[str, Any] | None = None,
                              finish_reason: str | None = None) -> tuple[int, str]:
        """A finished completion a person adds with these values, graded by them, in
        one transaction. It goes on the cell with ``key`` (the next sample number) when
        the project has one, else on a new person cell (see PERSON_ORDINAL); an inactive
        cell (its values left the grid) becomes an active person cell again. Returns
        (completion id, where): "grid", "person" (an existing person cell), "new" or
        "revived". ``params`` is recorded with ``added_by: person``, the mark sync_grid
        keeps such cells by."""
        if not 0 <= grade <= 5:
            raise ValueError(f"grade must be 0..5, not {grade}")
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT id, active, ordinal FROM cells WHERE key = ?", (key,)).fetchone()
            if row is None:
                cur = c.execute("INSERT INTO cells (key, values_json, ordinal, active) VALUES (?, ?, ?, 1)",
                                (key, values_json, PERSON_ORDINAL))
                cell_id, where = _new_id(cur), "new"
                c.execute("UPDATE cells SET ordinal = ? + id WHERE id = ?", (PERSON_ORDINAL, cell_id))
            else:
                cell_id = row["id"]
                where = "grid" if row["active"] and row["ordinal"] < PERSON_ORDINAL else "person"
                if not row["active"]:
                    c.execute("UPDATE cells SET active = 1, ordinal = ? + id WHERE id = ?", (PERSON_ORDINAL, cell_id))
                    where = "revived"
            sample = c.execute("SELECT coalesce(max(sample), -1) + 1 FROM completions WHERE cell_id = ?",
                               (cell_id,)).fetchone()[0]
            cur = c.execute(
                "INSERT INTO completions (cell_id, sample, status, text, length, model, params_json, finish_reason, "
                "attempts, created_at, updated_at) VALUES (?, ?, 'done', ?, ?, ?, ?, ?, 0, ?, ?)",
                (cell_id, sample, text, len(text), model, _dumps({**(params or {}), "added_by": "person"}),
                 finish_reason, now, now))
            completion_id = _new_id(cur)
            self.set_grades([(completion_id, grade)], "person")  # joins this transaction
        return completion_id, where

    def update_export_report(self, export_id: int, **fields: Any) -> None:
        """Merge ``fields`` into an export's recorded report (e.g. a measure computed
        after the export, such as its diversity)."""
        with self.transaction() as c:
            row = c.execute("SELECT report_json FROM exports WHERE id = ?", (export_id,)).fetchone()
            if row is None:
                raise StoreError(f"no export #{export_id} in {self.path}")
            report = json.loads(row[0]) if row[0] else {}
            report.update(fields)
            c.execute("UPDATE exports SET report_json = ? WHERE id = ?", (_dumps(report), export_id))


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


def _identify(path: Path) -> None:
    """Refuse, in one line, a file that is not a gridtune project this gridtune can open,
    without writing anything: not to the file, not beside it.

    A project carries APPLICATION_ID; one made before the marker has exactly the tables
    of its schema version. Read through SQLite alone (a file descriptor of our own,
    closed, would drop this process's locks on the file: POSIX), read-only: where a
    -journal, or a -wal and a -shm, are there (a connection may be writing), through a
    read-only connection, which creates nothing then; else the file itself is all
    there is to read (a -wal without -shm is a copy, as of its last checkpoint, which
    says whose file it is as well), read as immutable: nothing created, nothing locked.
    """
    try:
        if path.stat().st_size == 0:
            raise StoreError(f"{path}: not a gridtune project (empty file)")
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
    live = Path(f"{path}-journal").exists() or all(Path(f"{path}{end}").exists() for end in ("-wal", "-shm"))
    uri = "file:" + quote(str(path.absolute())) + ("?mode=ro" if live else "?mode=ro&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s(), isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(describe_sqlite_error(exc, path)) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s() * 1000)}")
        conn.execute("BEGIN")  # one snapshot for every read
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        ours = app_id == APPLICATION_ID or (app_id == 0 and _is_old_project(conn, version))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        kind = sqlite_error_kind(exc)
        if kind == "notadb" or (kind == "other" and not isinstance(exc, sqlite3.OperationalError)):
            raise StoreError(f"{path}: not a gridtune project ({exc})") from None
        raise StoreError(describe_sqlite_error(exc, path)) from None
    finally:
        conn.close()
    if not ours:
        raise StoreError(f"{path}: not a gridtune project (a SQLite database of another application); "
                         "left as it was")
    if version > SCHEMA_VERSION:
        raise StoreError(_newer(path, version))


def _is_old_project(conn: sqlite3.Connection, version: int) -> bool:
    """A project made before the marker: a known version and exactly its schema."""
    return 1 <= version <= SCHEMA_VERSION and shape(conn) == shape_of_version(version)


def _newer(path: Path, version: int) -> str:
    return (f"{path}: made by a newer gridtune (schema {version}, this one knows {SCHEMA_VERSION}); "
            "upgrade gridtune")


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements (sqlite3's executescript commits)."""
    statements, buf = [], []
    for line in script.splitlines():
        buf.append(line)
        joined = "\n".join(buf)
        if line.rstrip().endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined.strip())
            buf = []
    tail = "\n".join(buf).strip()
    if tail:
        statements.append(tail)
    return [s for s in statements
            if s and not all(ln.strip().startswith("--") or not ln.strip() for ln in s.splitlines())]
