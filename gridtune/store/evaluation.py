"""Evaluation queries on the project file (schema migration 3): the export's held-out
choice, the cases an evaluation asks, each model's answers and finished comparisons.

Plain functions over a ``Store`` (its connection, lock and transactions), like
``curation.py``, so ``project.py`` stays about generation and grades.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .project import Store


@dataclass(frozen=True)
class EvalCase:
    id: int
    key: str
    values: dict[str, Any]
    source: str  # 'held-out' | 'person'
    note: str | None


@dataclass(frozen=True)
class EvalAnswer:
    case_id: int
    sample: int
    text: str | None
    finish_reason: str | None
    completion_tokens: int | None
    latency_s: float | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


# -- the held-out choice of an export ----------------------------------------------------
def set_holdout(store: Store, export_id: int, holdout: dict[str, Any]) -> None:
    with store.transaction() as c:
        c.execute("UPDATE exports SET holdout_json = ? WHERE id = ?", (json.dumps(holdout, sort_keys=True), export_id))


def holdout_of(store: Store, export_id: int) -> dict[str, Any] | None:
    row = store._one("SELECT holdout_json FROM exports WHERE id = ?", (export_id,))
    return json.loads(row[0]) if row and row[0] else None


# -- cases ---------------------------------------------------------------------------------
def add_cases(store: Store, cases: Iterable[tuple[str, dict[str, Any], str, str | None]]) -> int:
    """Add (key, values, source, note) cases; one already there is kept as it is.
    Returns how many were new."""
    now = time.time()
    with store.transaction() as c:
        before = c.total_changes
        c.executemany(
            "INSERT OR IGNORE INTO eval_cases (key, values_json, source, note, created_at) VALUES (?, ?, ?, ?, ?)",
            [(key, json.dumps(values, sort_keys=True), source, note, now) for key, values, source, note in cases],
        )
        return c.total_changes - before


def remove_case(store: Store, case_id: int) -> bool:
    with store.transaction() as c:
        return c.execute("DELETE FROM eval_cases WHERE id = ?", (case_id,)).rowcount > 0


def cases(store: Store) -> list[EvalCase]:
    return [EvalCase(r["id"], r["key"], json.loads(r["values_json"]), r["source"], r["note"])
            for r in store._query("SELECT id, key, values_json, source, note FROM eval_cases ORDER BY id")]


# -- answers -------------------------------------------------------------------------------
def answers(store: Store, model: str, setup: str) -> dict[tuple[int, int], EvalAnswer]:
    """Every stored answer of ``model`` under ``setup``, by (case id, sample)."""
    rows = store._query(
        "SELECT case_id, sample, text, finish_reason, completion_tokens, latency_s, error FROM eval_answers "
        "WHERE model = ? AND setup = ?", (model, setup))
    return {(r["case_id"], r["sample"]): EvalAnswer(r["case_id"], r["sample"], r["text"], r["finish_reason"],
                                                    r["completion_tokens"], r["latency_s"], r["error"])
            for r in rows}


def save_answer(store: Store, *, case_id: int, model: str, setup: str, sample: int, text: str | None,
                finish_reason: str | None, completion_tokens: int | None, latency_s: float | None,
                error: str | None) -> None:
    """Store one answer the moment it arrives; a later success replaces a failure."""
    with store.transaction() as c:
        c.execute(
            "INSERT INTO eval_answers (case_id, model, setup, sample, text, finish_reason, completion_tokens, "
            "latency_s, error, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(case_id, model, setup, sample) DO UPDATE SET text = excluded.text, "
            "finish_reason = excluded.finish_reason, completion_tokens = excluded.completion_tokens, "
            "latency_s = excluded.latency_s, error = excluded.error, created_at = excluded.created_at",
            (case_id, model, setup, sample, text, finish_reason, completion_tokens, latency_s, error, time.time()),
        )


# -- finished comparisons ---------------------------------------------------------------------
def record_run(store: Store, *, export_id: int | None, model: str, against: str | None, setup: str,
               result: dict[str, Any]) -> int:
    with store.transaction() as c:
        cur = c.execute(
            "INSERT INTO eval_runs (export_id, model, against, setup, result_json, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (export_id, model, against, setup, json.dumps(result, sort_keys=True), time.time()))
        return int(cur.lastrowid or 0)


def latest_run(store: Store) -> dict[str, Any] | None:
    row = store._one("SELECT id, export_id, model, against, setup, result_json, created_at FROM eval_runs "
                     "ORDER BY id DESC LIMIT 1")
    if row is None:
        return None
    return {"id": row["id"], "export_id": row["export_id"], "model": row["model"], "against": row["against"],
            "setup": row["setup"], "result": json.loads(row["result_json"]), "created_at": row["created_at"]}
