"""Grades and what curation asks of the completions: the current grade's rule, undo,
the cut-off ones, kept examples per cell, redo and top-up, and a person's own answer."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .base import _ACTIVE, _CURRENT_GRADE_SQL, _CUT_OFF, _RUN_IS_ACTIVE, PERSON_ORDINAL, _dumps, _new_id
from .cells import CellsMixin
from .records import GradeRecord, WorkItem


class GradesMixin(CellsMixin):
    """Grades and curation (a part of ``Store``; it reads cells)."""

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
