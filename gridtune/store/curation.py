"""Curation queries on the project file: near-duplicate groups, settings (the
judge's rubric), judgements and calibrations (schema migration 2).

Plain functions over a ``Store`` (the same connection, lock and transactions), so
``project.py`` stays about generation and grades. Grades themselves go through
``Store.set_grades`` with their source ('dedup', 'judge:<model>'): the store's rule
for the current grade (a person's first) holds for them like any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import _CURRENT_GRADE_SQL, _new_id
from .project import Store

_ACTIVE = "c.cell_id IN (SELECT id FROM cells WHERE active = 1)"


# -- settings ------------------------------------------------------------------
def get_setting(store: Store, key: str) -> str | None:
    row = store._one("SELECT value FROM settings WHERE key = ?", (key,))
    return row[0] if row else None


def set_setting(store: Store, key: str, value: str | None) -> None:
    """Set (or, with None, remove) a project setting."""
    with store.transaction() as c:
        if value is None:
            c.execute("DELETE FROM settings WHERE key = ?", (key,))
        else:
            c.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, time.time()),
            )


# -- texts to curate -------------------------------------------------------------
@dataclass(slots=True)
class CurationRow:
    """What curation needs of one finished completion."""

    id: int
    text: str
    grade: int | None
    grade_source: str | None
    finish_reason: str | None
    values: str  # the cell's values as stored (JSON)


def finished_rows(store: Store, ids: Sequence[int] | None = None) -> list[CurationRow]:
    """Finished completions with text in active cells, in id order (all, or ``ids``)."""
    sql = (
        "SELECT c.id, c.text, c.grade, c.grade_source, c.finish_reason, cells.values_json "
        "FROM completions c JOIN cells ON cells.id = c.cell_id "
        "WHERE cells.active = 1 AND c.status = 'done' AND c.text IS NOT NULL"
    )
    if ids is None:
        return [CurationRow(*r) for r in store._query(sql + " ORDER BY c.id")]
    out: list[CurationRow] = []
    ids = list(ids)
    for start in range(0, len(ids), 900):
        chunk = ids[start:start + 900]
        marks = ",".join("?" * len(chunk))
        out += [CurationRow(*r) for r in store._query(sql + f" AND c.id IN ({marks})", chunk)]
    return sorted(out, key=lambda r: r.id)


# -- near-duplicate groups ----------------------------------------------------------
def replace_dup_groups(store: Store, members: Iterable[tuple[int, int, float]], *, threshold: float,
                       shingle: int, num_perm: int, completions: int, seconds: float) -> int:
    """Replace the stored grouping with ``members`` (completion_id, group_id,
    similarity) in one transaction; records the pass. Returns the pass id."""
    rows = list(members)
    with store.transaction() as c:
        c.execute("DELETE FROM dup_members")
        c.executemany("INSERT INTO dup_members (completion_id, group_id, similarity) VALUES (?, ?, ?)", rows)
        cur = c.execute(
            "INSERT INTO dedup_passes (threshold, shingle, num_perm, n_completions, n_groups, n_members, "
            "seconds, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (threshold, shingle, num_perm, completions, len({g for _, g, _ in rows}), len(rows), seconds,
             time.time()),
        )
        return _new_id(cur)


def latest_dedup_pass(store: Store) -> dict[str, Any] | None:
    row = store._one("SELECT * FROM dedup_passes ORDER BY id DESC LIMIT 1")
    return dict(row) if row else None


def dup_group_id(store: Store, completion_id: int) -> int | None:
    row = store._one("SELECT group_id FROM dup_members WHERE completion_id = ?", (completion_id,))
    return row[0] if row else None


def dup_group_members(store: Store, group_id: int) -> list[int]:
    """The completion ids of one group, in id order (active cells only)."""
    return [r[0] for r in store._query(
        f"SELECT d.completion_id FROM dup_members d JOIN completions c ON c.id = d.completion_id "
        f"WHERE d.group_id = ? AND {_ACTIVE} ORDER BY d.completion_id",
        (group_id,),
    )]


def dup_groups(store: Store) -> dict[int, list[int]]:
    """Every stored group: group_id -> member ids (id order); active cells only."""
    out: dict[int, list[int]] = {}
    for gid, cid in store._query(
        f"SELECT d.group_id, d.completion_id FROM dup_members d JOIN completions c ON c.id = d.completion_id "
        f"WHERE {_ACTIVE} ORDER BY d.group_id, d.completion_id"
    ):
        out.setdefault(gid, []).append(cid)
    return {g: m for g, m in out.items() if len(m) > 1}


def dup_markers(store: Store, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """For the review list's visible rows: id -> (group_id, group size), only for
    completions in a group. One query per 900 ids."""
    out: dict[int, tuple[int, int]] = {}
    ids = list(ids)
    for start in range(0, len(ids), 900):
        chunk = ids[start:start + 900]
        marks = ",".join("?" * len(chunk))
        for cid, gid, size in store._query(
            "SELECT d.completion_id, d.group_id, (SELECT count(*) FROM dup_members e WHERE e.group_id = d.group_id) "
            f"FROM dup_members d WHERE d.completion_id IN ({marks})",
            chunk,
        ):
            out[cid] = (gid, size)
    return out


def dup_counts(store: Store) -> dict[str, int]:
    """groups, members (completions in a group) and extra copies (members - groups)."""
    row = store._row(
        f"SELECT count(DISTINCT d.group_id), count(*) FROM dup_members d JOIN completions c "
        f"ON c.id = d.completion_id WHERE {_ACTIVE}"
    )
    groups, members = row[0], row[1]
    return {"groups": groups, "members": members, "extra_copies": members - groups}


# -- grades by source -------------------------------------------------------------
def undo_source(store: Store, source: str) -> list[int]:
    """Withdraw every standing grade given by ``source`` (e.g. undo a dedup drop);
    returns the completion ids whose grades were withdrawn."""

    with store.transaction() as c:
        ids = [r[0] for r in c.execute(
            "SELECT DISTINCT completion_id FROM grades WHERE source = ? AND undone = 0", (source,)
        ).fetchall()]
        c.execute("UPDATE grades SET undone = 1 WHERE source = ? AND undone = 0", (source,))
        c.executemany(_CURRENT_GRADE_SQL, [(cid,) for cid in ids])
    return ids


def latest_grades_by_source(store: Store, source: str) -> dict[int, int]:
    """completion_id -> the newest standing grade that ``source`` gave it."""
    return {r[0]: r[1] for r in store._query(
        "SELECT g.completion_id, g.grade FROM grades g WHERE g.source = ? AND g.undone = 0 "
        "AND g.id = (SELECT max(h.id) FROM grades h WHERE h.completion_id = g.completion_id "
        "AND h.source = g.source AND h.undone = 0)",
        (source,),
    )}


def person_grades(store: Store) -> dict[int, int]:
    """completion_id -> a person's current grade 1-5 (rejections left out), active cells."""
    return {r[0]: r[1] for r in store._query(
        f"SELECT c.id, c.grade FROM completions c WHERE c.grade_source = 'person' "
        f"AND c.grade BETWEEN 1 AND 5 AND {_ACTIVE}"
    )}


# -- judgements and calibrations ----------------------------------------------------
def record_judgement(store: Store, completion_id: int, model: str, *, grade: int | None, reply: str | None,
                     error: str | None, source: str) -> None:
    """One judge outcome; with a grade, also the grade (source ``source``), in one transaction."""

    now = time.time()
    with store.transaction() as c:
        c.execute(
            "INSERT INTO judgements (completion_id, model, grade, reply, error, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (completion_id, model, grade, reply, error, now),
        )
        if grade is not None:
            c.execute("INSERT INTO grades (completion_id, grade, source, created_at) VALUES (?, ?, ?, ?)",
                      (completion_id, grade, source, now))
            c.execute(_CURRENT_GRADE_SQL, (completion_id,))


def judged_ids(store: Store, model: str) -> set[int]:
    """Completions ``model`` has already graded (a failure does not count)."""
    return {r[0] for r in store._query(
        "SELECT DISTINCT completion_id FROM judgements WHERE model = ? AND grade IS NOT NULL", (model,)
    )}


def judgement_counts(store: Store, model: str | None = None) -> dict[str, int]:
    sql = "SELECT count(DISTINCT CASE WHEN grade IS NOT NULL THEN completion_id END), " \
          "coalesce(sum(grade IS NULL), 0) FROM judgements"
    row = store._row(sql + (" WHERE model = ?" if model else ""), (model,) if model else ())
    return {"judged": row[0], "failures": row[1]}


def record_calibration(store: Store, model: str, *, n: int, spearman: float | None, kappa: float | None,
                       exact: float | None) -> int:
    with store.transaction() as c:
        cur = c.execute(
            "INSERT INTO calibrations (model, n, spearman, kappa, exact, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (model, n, spearman, kappa, exact, time.time()),
        )
        return _new_id(cur)


def latest_calibration(store: Store, model: str | None = None) -> dict[str, Any] | None:
    """The newest calibration (of ``model``, or of any judge) as a dict, or None."""
    sql = "SELECT * FROM calibrations"
    params: tuple[Any, ...] = ()
    if model:
        sql += " WHERE model = ?"
        params = (model,)
    row = store._one(sql + " ORDER BY id DESC LIMIT 1", params)
    return dict(row) if row else None
