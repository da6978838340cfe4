"""The grid's cells and their completions in the project file: syncing a grid spec,
reading and editing completions, the review's rows, and the status counts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .base import _ACTIVE, _CUT_OFF, _PERSON_ADDED, PERSON_ORDINAL, StoreBase, _completion
from .records import CompletionRecord, StatusCounts


class CellsMixin(StoreBase):
    """Cells and completions (a part of ``Store``)."""

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
