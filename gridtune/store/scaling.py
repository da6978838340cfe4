"""Data-scaling queries on the project file (schema migration 4): one row per
`finetune --scaling` run — the export and base it trains from, its settings, the two
jobs (half and all) as soon as each is created, and the finished comparison.

Plain functions over a ``Store``, like ``evaluation.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .project import Store

ARMS = ("half", "all")
_COLUMNS = ("id, export_id, base_model, settings, half_path, n_half, n_all, half_job, all_job, state, error, "
            "result_json, created_at, updated_at")


@dataclass(frozen=True)
class ScalingRun:
    id: int
    export_id: int | None
    base_model: str
    settings: dict[str, Any]
    half_path: str
    n_half: int
    n_all: int
    half_job: str | None
    all_job: str | None
    state: str  # 'training' | 'evaluating' | 'finished' | 'failed'
    error: str | None
    result: dict[str, Any] | None
    created_at: float
    updated_at: float

    def job(self, arm: str) -> str | None:
        return self.half_job if arm == "half" else self.all_job


def settings_key(settings: dict[str, Any]) -> str:
    """The canonical JSON a rerun is matched on."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def _run(row: Any) -> ScalingRun:
    return ScalingRun(row["id"], row["export_id"], row["base_model"], json.loads(row["settings"]), row["half_path"],
                      row["n_half"], row["n_all"], row["half_job"], row["all_job"], row["state"], row["error"],
                      json.loads(row["result_json"]) if row["result_json"] else None, row["created_at"],
                      row["updated_at"])


def find(store: Store, export_id: int, base_model: str, settings: dict[str, Any]) -> ScalingRun | None:
    """The newest run of this export, base and settings: what a rerun continues."""
    row = store._one(f"SELECT {_COLUMNS} FROM scaling_runs WHERE export_id = ? AND base_model = ? AND settings = ? "
                     "ORDER BY id DESC LIMIT 1", (export_id, base_model, settings_key(settings)))
    return _run(row) if row else None


def create(store: Store, *, export_id: int, base_model: str, settings: dict[str, Any], half_path: str, n_half: int,
           n_all: int) -> ScalingRun:
    now = time.time()
    with store.transaction() as c:
        cur = c.execute(
            "INSERT INTO scaling_runs (export_id, base_model, settings, half_path, n_half, n_all, state, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'training', ?, ?)",
            (export_id, base_model, settings_key(settings), half_path, n_half, n_all, now, now))
        run_id = int(cur.lastrowid or 0)
    got = get(store, run_id)
    assert got is not None
    return got


def get(store: Store, run_id: int) -> ScalingRun | None:
    row = store._one(f"SELECT {_COLUMNS} FROM scaling_runs WHERE id = ?", (run_id,))
    return _run(row) if row else None


def set_job(store: Store, run_id: int, arm: str, job_id: str) -> None:
    """Record an arm's job the moment it is created (a killed run follows it on rerun)."""
    if arm not in ARMS:
        raise ValueError(f"no arm {arm!r}")
    with store.transaction() as c:
        c.execute(f"UPDATE scaling_runs SET {arm}_job = ?, updated_at = ? WHERE id = ?", (job_id, time.time(), run_id))


def set_state(store: Store, run_id: int, state: str, *, error: str | None = None,
              result: dict[str, Any] | None = None) -> None:
    with store.transaction() as c:
        c.execute("UPDATE scaling_runs SET state = ?, error = ?, result_json = COALESCE(?, result_json), "
                  "updated_at = ? WHERE id = ?",
                  (state, error, json.dumps(result, sort_keys=True) if result is not None else None, time.time(),
                   run_id))


def latest(store: Store) -> ScalingRun | None:
    row = store._one(f"SELECT {_COLUMNS} FROM scaling_runs ORDER BY updated_at DESC, id DESC LIMIT 1")
    return _run(row) if row else None


def finished(store: Store, base_model: str | None = None) -> list[ScalingRun]:
    """Finished runs, oldest first (of one base model when given)."""
    sql = f"SELECT {_COLUMNS} FROM scaling_runs WHERE state = 'finished' AND result_json IS NOT NULL"
    params: tuple[Any, ...] = ()
    if base_model is not None:
        sql += " AND base_model = ?"
        params = (base_model,)
    return [_run(r) for r in store._query(sql + " ORDER BY id", params)]
