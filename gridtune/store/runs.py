"""Generation runs in the project file: the work a run takes and saves, and the run's
own record (start, adopt, heartbeat, stop, finish) under the run lock."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from .base import _ACTIVE, _RUN_IS_ACTIVE, RunConflict, RunLost, StoreBase, _dumps, _new_id
from .records import ACTIVE_RUN_STATES, RunRecord, WorkItem
from .runlock import holder as run_lock_holder


class RunsMixin(StoreBase):
    """Runs and the work they do (a part of ``Store``)."""

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
