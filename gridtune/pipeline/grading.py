"""Grading helpers: length is the cheap proxy for detail.

Auto-grades never overwrite a person's grade: the store keeps every grade with
its source, and the current grade is the newest by a person, else the newest
automatic one.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..store import Store

BY_LENGTH = "by-length"


def length_cutoffs(lengths: Sequence[int]) -> list[int]:
    """The four lengths where grades 2, 3, 4 and 5 begin (quintiles of ``lengths``)."""
    ordered = sorted(lengths)
    n = len(ordered)
    if n == 0:
        return []
    return [ordered[min(n - 1, (k * n) // 5)] for k in range(1, 5)]


def grade_for_length(length: int, cutoffs: Sequence[int]) -> int:
    """1 (shortest fifth) .. 5 (longest fifth); a length equal to a cut-off goes up."""
    if not cutoffs:
        return 3
    return 1 + bisect_right(cutoffs, length)


@dataclass
class GradeResult:
    graded: int
    unchanged: int
    skipped_person: int
    cutoffs: list[int]
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "graded": self.graded, "unchanged": self.unchanged,
            "skipped_person": self.skipped_person, "cutoffs": self.cutoffs, "grades": self.counts,
        }

    def summary(self) -> str:
        if not self.cutoffs:
            return "nothing to grade: no finished completions"
        bands = ", ".join(f"{g}: {self.counts.get(str(g), 0)}" for g in range(1, 6))
        cut = " / ".join(str(c) for c in self.cutoffs)
        return (
            f"graded {self.graded} completion(s) by length (cut-offs at {cut} characters; "
            f"{self.skipped_person} graded by a person left alone). Grades now: {bands}"
        )


def grade_by_length(store: Store) -> GradeResult:
    """Give every completion no person has graded a grade 1-5 by length quintile.

    The cut-offs are quintiles of *all* finished completions, so a person's
    grades do not shift the bands. Only changed grades are written.
    """
    lengths = store.done_lengths()
    cutoffs = length_cutoffs(lengths)
    targets = store.gradable(include_auto=True)
    current = {cid: None for cid, _ in targets}
    for cid, grade, _source in store.current_grades([cid for cid, _ in targets]):
        current[cid] = grade
    pairs = []
    unchanged = 0
    for cid, length in targets:
        g = grade_for_length(length or 0, cutoffs)
        if current.get(cid) == g:
            unchanged += 1
        else:
            pairs.append((cid, g))
    if pairs:
        store.set_grades(pairs, BY_LENGTH)
    counts = store.status_counts()
    return GradeResult(
        graded=len(pairs), unchanged=unchanged,
        skipped_person=len(lengths) - len(targets), cutoffs=cutoffs, counts=counts.grades,
    )


def drop_at_or_below(store: Store, grade: int) -> list[int]:
    """Reject (grade 0, by a person) everything graded 1..``grade``; returns the ids."""
    ids = store.ids_at_or_below(grade)
    if ids:
        store.set_grades([(cid, 0) for cid in ids], "person")
    return ids
