"""Batch API queries on the project file (schema migration "batches"): each batch a
project sent to a provider's /v1/batches, and which completions it carries.

A batch row is recorded (with its completions) *before* anything is uploaded, and
its provider ids are filled in as they are known, so a process killed at any point
finds the batch again: one still 'preparing' is created at the provider (or found
there by its ``tag`` in the batch's metadata), one in flight is followed, one
finished is read into its cells. A row is open until ``closed_at``: every result
of its output and error files written, once.

Statuses: 'preparing' (not yet created at the provider), then the provider's own
(validating, in_progress, finalizing, completed, failed, expired, cancelling,
cancelled). Item states: 'sent', then 'done', 'failed' (the error file named it) or
'missing' (the batch ended without a line for it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .project import Store
from .records import WorkItem

ENDED = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class BatchRecord:
    id: int
    tag: str  # this row's mark in the provider's batch metadata (finds a batch created before a crash)
    batch_id: str | None
    input_file_id: str | None
    base_url: str | None  # which backend; never its key
    model: str
    params: dict[str, Any]
    status: str
    requests: int
    output_file_id: str | None
    error_file_id: str | None
    counts: dict[str, int]  # the provider's request_counts: total, completed, failed
    error: str | None
    created_at: float
    updated_at: float
    closed_at: float | None

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def ended(self) -> bool:
        """The provider is done with it (its files hold every result there will be)."""
        return self.status in ENDED


def _record(row: Any) -> BatchRecord:
    return BatchRecord(
        id=row["id"], tag=row["tag"], batch_id=row["batch_id"], input_file_id=row["input_file_id"],
        base_url=row["base_url"], model=row["model"], params=json.loads(row["params_json"] or "{}"),
        status=row["status"], requests=row["requests"], output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"], counts=json.loads(row["counts_json"] or "{}"), error=row["error"],
        created_at=row["created_at"], updated_at=row["updated_at"], closed_at=row["closed_at"])


def record_batch(store: Store, *, tag: str, base_url: str | None, model: str, params: dict[str, Any],
                 completion_ids: Sequence[int]) -> int:
    """Record a batch about to be sent, with its completions; returns its row id."""
    now = time.time()
    with store.transaction() as c:
        cur = c.execute(
            "INSERT INTO batches (tag, base_url, model, params_json, status, requests, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, 'preparing', ?, ?, ?)",
            (tag, base_url, model, json.dumps(params, sort_keys=True), len(completion_ids), now, now))
        row_id = int(cur.lastrowid or 0)
        c.executemany("INSERT INTO batch_items (batch_row, completion_id) VALUES (?, ?)",
                      [(row_id, cid) for cid in completion_ids])
    return row_id


def update_batch(store: Store, row_id: int, **fields: Any) -> None:
    """Set provider facts: batch_id, input_file_id, status, output_file_id, error_file_id,
    counts (a dict), error."""
    allowed = {"batch_id", "input_file_id", "status", "output_file_id", "error_file_id", "error"}
    sets: list[str] = ["updated_at = ?"]
    values: list[Any] = [time.time()]
    for key, value in fields.items():
        if key == "counts":
            sets.append("counts_json = ?")
            values.append(json.dumps(value or {}, sort_keys=True))
        elif key in allowed:
            sets.append(f"{key} = ?")
            values.append(value)
        else:
            raise ValueError(f"unknown batch field {key!r}")
    with store.transaction() as c:
        c.execute(f"UPDATE batches SET {', '.join(sets)} WHERE id = ?", (*values, row_id))


def forget_batch(store: Store, row_id: int) -> None:
    """Drop a row that never reached the provider (its upload was refused)."""
    with store.transaction() as c:
        c.execute("DELETE FROM batches WHERE id = ? AND batch_id IS NULL", (row_id,))


def get_batch(store: Store, row_id: int) -> BatchRecord | None:
    row = store._one("SELECT * FROM batches WHERE id = ?", (row_id,))
    return _record(row) if row else None


def open_batches(store: Store) -> list[BatchRecord]:
    return [_record(r) for r in store._query("SELECT * FROM batches WHERE closed_at IS NULL ORDER BY id")]


def latest_batches(store: Store, limit: int = 5) -> list[BatchRecord]:
    return [_record(r) for r in store._query("SELECT * FROM batches ORDER BY id DESC LIMIT ?", (limit,))]


def sent_items(store: Store, row_id: int) -> dict[int, WorkItem]:
    """The completions of a batch still waiting for their result, by id (with the
    values and sample their request was rendered from, and their attempts so far)."""
    rows = store._query(
        "SELECT c.id, c.cell_id, c.sample, c.attempts, cells.values_json FROM batch_items i "
        "JOIN completions c ON c.id = i.completion_id JOIN cells ON cells.id = c.cell_id "
        "WHERE i.batch_row = ? AND i.state = 'sent' ORDER BY cells.ordinal, c.sample", (row_id,))
    return {r[0]: WorkItem(r[0], r[1], r[2], json.loads(r[4]), r[3]) for r in rows}


def item_ids(store: Store, row_id: int) -> list[int]:
    return [r[0] for r in store._query(
        "SELECT completion_id FROM batch_items WHERE batch_row = ? ORDER BY completion_id", (row_id,))]


def in_open_batches(store: Store) -> set[int]:
    """Completions an open batch is generating (a live run should leave them alone)."""
    return {r[0] for r in store._query(
        "SELECT i.completion_id FROM batch_items i JOIN batches b ON b.id = i.batch_row "
        "WHERE b.closed_at IS NULL AND i.state = 'sent'")}


def item_counts(store: Store, row_id: int) -> dict[str, int]:
    counts = {"sent": 0, "done": 0, "failed": 0, "missing": 0}
    for state, n in store._query("SELECT state, count(*) FROM batch_items WHERE batch_row = ? GROUP BY state",
                                 (row_id,)):
        counts[state] = n
    return counts


def save_item_done(store: Store, row_id: int, completion_id: int, *, run_id: int | None,
                   **done: Any) -> bool:
    """Write one result into its cell (``done``: Store.save_done's fields) and mark the
    item, in one transaction; False (nothing written) when it was written already."""
    with store.transaction() as c:
        cur = c.execute("UPDATE batch_items SET state = 'done' WHERE batch_row = ? AND completion_id = ? "
                        "AND state = 'sent'", (row_id, completion_id))
        if cur.rowcount != 1:
            return False
        store.save_done(completion_id, run_id=run_id, **done)
    return True


def save_item_failed(store: Store, row_id: int, completion_id: int, *, state: str = "failed",
                     run_id: int | None, **failed: Any) -> bool:
    """Record one request's error on its cell (``failed``: Store.save_failed's fields);
    ``state`` 'missing' when the batch had no line for it. False when already recorded."""
    with store.transaction() as c:
        cur = c.execute("UPDATE batch_items SET state = ? WHERE batch_row = ? AND completion_id = ? "
                        "AND state = 'sent'", (state, row_id, completion_id))
        if cur.rowcount != 1:
            return False
        store.save_failed(completion_id, run_id=run_id, **failed)
    return True


def close_batch(store: Store, row_id: int) -> None:
    with store.transaction() as c:
        c.execute("UPDATE batches SET closed_at = ?, updated_at = ? WHERE id = ? AND closed_at IS NULL",
                  (time.time(), time.time(), row_id))


def batch_dicts(records: Iterable[BatchRecord]) -> list[dict[str, Any]]:
    """For `status --json`: what a person (or a script) needs of each batch."""
    return [{"row": b.id, "batch_id": b.batch_id, "status": b.status, "open": b.open, "model": b.model,
             "requests": b.requests, "counts": b.counts, "error": b.error, "created_at": b.created_at}
            for b in records]
