"""Grading helpers: length is the cheap proxy for detail.

Auto-grades never overwrite a person's grade: the store keeps every grade with
its source, and the current grade is the newest by a person, else the newest
automatic one.

Length only means detail for a completion that ended on its own. One cut off at
max tokens (finish_reason "length") is long because it never stopped, so grading
by length sets it aside: it gets grade 1, the lowest, whatever its length, and the
bands are quintiles of the finished completions only. A cut-off completion is thus
never graded above a finished one (at most level with the shortest fifth), sorts
last by grade, and the result says how many were set aside. Regenerating them with
more max tokens (`generate --redo-cut-off`) withdraws that grade.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...store import Store

BY_LENGTH = "by-length"
CUT_OFF_GRADE = 1  # what grading by length gives a cut-off completion, whatever its length


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
    set_aside: int = 0  # cut-off completions (no person's grade) given grade 1 whatever their length

    def to_dict(self) -> dict[str, Any]:
        return {
            "graded": self.graded, "unchanged": self.unchanged,
            "skipped_person": self.skipped_person, "cutoffs": self.cutoffs, "grades": self.counts,
            "set_aside_cut_off": self.set_aside,
        }

    def summary(self, redo: str = "regenerate them with `gridtune generate PROJECT --redo-cut-off --max-tokens N`"
                ) -> str:
        """In words; ``redo`` says how to regenerate the cut-off ones where this is read
        (the review screen: its key)."""
        aside = ""
        if self.set_aside:
            aside = f" Set aside {self.set_aside} cut-off completion(s) (they hit max tokens) at grade 1; {redo}."
        if not self.cutoffs:
            return "nothing to grade by length: no completion that finished on its own." + aside
        bands = ", ".join(f"{g}: {self.counts.get(str(g), 0)}" for g in range(1, 6))
        cut = " / ".join(str(c) for c in self.cutoffs)
        return (
            f"graded {self.graded} completion(s) by length (cut-offs at {cut} characters, from the "
            f"finished ones; {self.skipped_person} graded by a person left alone). Grades now: {bands}." + aside
        )


def grade_by_length(store: Store) -> GradeResult:
    """Give every completion no person has graded a grade 1-5 by length quintile.

    The cut-offs are quintiles of all completions that finished on their own
    (graded by a person or not), so a person's grades do not shift the bands.
    Cut-off completions get grade 1 (see the module's doc). Only changed grades
    are written.
    """
    lengths = store.done_lengths()
    cutoffs = length_cutoffs(store.done_lengths(finished_only=True))
    targets = store.gradable(include_auto=True)
    cut_off = store.cut_off_among([cid for cid, _ in targets])
    current: dict[int, int | None] = {cid: None for cid, _ in targets}
    for cid, grade, _source in store.current_grades([cid for cid, _ in targets]):
        current[cid] = grade
    pairs = []
    unchanged = 0
    for cid, length in targets:
        g = CUT_OFF_GRADE if cid in cut_off else grade_for_length(length or 0, cutoffs)
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
        set_aside=len(cut_off),
    )


def drop_at_or_below(store: Store, grade: int) -> list[int]:
    """Reject (grade 0, by a person) everything graded 1..``grade``; returns the ids."""
    ids = store.ids_at_or_below(grade)
    if ids:
        store.set_grades([(cid, 0) for cid in ids], "person")
    return ids
