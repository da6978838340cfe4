"""Exports and fine-tuning jobs in the project file: the rows an export writes, the
exports recorded with their reports, and the jobs made from them."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Generator
from typing import Any

from .base import _CUT_OFF, StoreBase, StoreError, _dumps, _new_id, _without_credentials, busy_timeout_s
from .records import ExportRecord, JobRecord


class ExportsMixin(StoreBase):
    """Exports and jobs (a part of ``Store``)."""

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
