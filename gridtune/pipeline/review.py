"""The review loop's logic, without UI: grading, editing, filters, sorts, undoable
bulk grading, the length histogram, the grade history in words and the one-line
preview of a completion.

The review screen makes every change through these; tests call them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..store import Store
from ..store.records import GradeRecord
from .grading import BY_LENGTH, GradeResult, drop_at_or_below, grade_by_length, length_cutoffs

PERSON = "person"


@dataclass(frozen=True)
class Filter:
    key: str
    label: str
    where: str = "all"
    min_grade: int | None = None


FILTERS: tuple[Filter, ...] = (
    Filter("done", "finished", "done"),
    Filter("ungraded", "ungraded", "ungraded"),
    Filter("graded", "graded", "graded"),
    Filter("ge2", "grade ≥ 2", "all", 2),
    Filter("ge3", "grade ≥ 3", "all", 3),
    Filter("ge4", "grade ≥ 4", "all", 4),
    Filter("ge5", "grade 5", "all", 5),
    Filter("failed", "failed", "failed"),
    Filter("all", "all, pending too"),
)
SORTS: tuple[tuple[str, str], ...] = (("length", "length"), ("grade", "grade"), ("grid", "grid order"))


def next_filter(key: str) -> Filter:
    keys = [f.key for f in FILTERS]
    return FILTERS[(keys.index(key) + 1) % len(FILTERS)] if key in keys else FILTERS[0]


def filter_by_key(key: str) -> Filter:
    for f in FILTERS:
        if f.key == key:
            return f
    raise ValueError(f"unknown filter {key!r}")


def next_sort(key: str) -> str:
    keys = [k for k, _ in SORTS]
    return keys[(keys.index(key) + 1) % len(keys)] if key in keys else keys[0]


def rows(store: Store, filt: Filter, search: str | None, sort: str, descending: bool):
    """The light rows (id, length, grade, status) the review list shows."""
    return store.review_rows(
        where=filt.where, min_grade=filt.min_grade, search=search or None, sort=sort, descending=descending
    )


# -- one completion -----------------------------------------------------------
def grade(store: Store, completion_id: int, value: int) -> int | None:
    """A person's grade (0 rejects); returns the completion's grade afterwards."""
    return store.set_grade(completion_id, value, PERSON)


def reject(store: Store, completion_id: int) -> int | None:
    """A person rejects a completion (grade 0): it is never exported."""
    return grade(store, completion_id, 0)


def edit(store: Store, completion_id: int, text: str) -> int:
    """A person's edit of a finished completion (the model's text is kept); returns the new length."""
    store.edit_text(completion_id, text)
    return len(text)


# -- undo ------------------------------------------------------------------
@dataclass
class UndoEntry:
    ids: list[int]
    label: str


@dataclass
class UndoStack:
    """What `u` takes back: each entry is the ids that got one new grade each."""

    entries: list[UndoEntry] = field(default_factory=list)
    limit: int = 1000

    def push(self, ids: Sequence[int], label: str) -> None:
        if ids:
            self.entries.append(UndoEntry(list(ids), label))
            del self.entries[:-self.limit]

    def pop(self) -> UndoEntry | None:
        return self.entries.pop() if self.entries else None

    def __len__(self) -> int:
        return len(self.entries)


def undo(store: Store, entry: UndoEntry) -> list[int | None]:
    """Withdraw the grade each id got from ``entry``; returns their grades afterwards."""
    return store.undo_grades(entry.ids)


def auto_grade(store: Store) -> tuple[GradeResult, list[int]]:
    """grade_by_length, and the ids it gave a new grade (so it can be undone)."""
    before = {cid: grade for cid, _l, grade, _s in store.review_rows(where="done", sort="grid")}
    result = grade_by_length(store)
    changed = [cid for cid, _l, grade, _s in store.review_rows(where="done", sort="grid") if before.get(cid) != grade]
    return result, changed


def drop(store: Store, grade: int) -> list[int]:
    """Reject everything graded 1..grade (undoable with the returned ids)."""
    return drop_at_or_below(store, grade)


# -- counts -------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewCounts:
    done: int = 0
    graded: int = 0  # any grade, rejections included
    kept: int = 0  # grade 1..5
    rejected: int = 0

    @classmethod
    def from_store(cls, store: Store) -> ReviewCounts:
        c = store.status_counts()
        return cls(done=c.done, graded=c.graded, kept=sum(c.grades.values()), rejected=c.rejected)

    def changed(self, old: int | None, new: int | None) -> ReviewCounts:
        """The counts once one completion's grade goes from ``old`` to ``new``."""
        graded, kept, rejected = self.graded, self.kept, self.rejected
        for value, sign in ((old, -1), (new, 1)):
            if value is None:
                continue
            graded += sign
            if value == 0:
                rejected += sign
            else:
                kept += sign
        return replace(self, graded=graded, kept=kept, rejected=rejected)

    def text(self) -> str:
        return f"graded {self.graded:,}/{self.done:,} · kept {self.kept:,} · rejected {self.rejected:,}"


# -- grade history in words ------------------------------------------------------
def grade_words(value: int, source: str) -> str:
    """One grade for a person to read: "grade 4 by you", "auto 3 by length",
    "rejected by you", "auto-rejected as a near-duplicate"."""
    person = source == PERSON
    if person:
        who = "by you"
    elif source == BY_LENGTH:
        who = "by length"
    elif source == "dedup":
        who = "as a near-duplicate"
    elif source.startswith("judge:"):
        who = f"by judge {source.removeprefix('judge:')}"
    else:
        who = f"by {source}"
    if value == 0:
        return f"{'rejected' if person else 'auto-rejected'} {who}"
    return f"{'grade' if person else 'auto'} {value} {who}"


def current_grade(history: Sequence[GradeRecord]) -> GradeRecord | None:
    """The grade that counts, as the store decides it: a person's newest, else the newest automatic one."""
    live = [g for g in history if not g.undone]
    mine = [g for g in live if g.source == PERSON]
    counted = mine or live
    return counted[-1] if counted else None


def history_text(history: Sequence[GradeRecord], limit: int = 4) -> str:
    """A completion's grades in words, the one that counts first, then the others newest first:
    "grade 4 by you · was auto 3 by length · undone: grade 5 by you". Empty without grades."""
    if not history:
        return ""
    now = current_grade(history)
    parts = [grade_words(now.grade, now.source) if now is not None else "ungraded"]
    for g in reversed(history):
        if g is now:
            continue
        words = grade_words(g.grade, g.source)
        if g.undone:
            parts.append(f"undone: {words}")
        elif now is not None and g.id > now.id:  # an automatic grade under a person's
            parts.append(f"also {words}")
        else:
            parts.append(f"was {words}")
    more = len(parts) - 1 - limit
    if more > 0:
        parts = parts[: limit + 1] + [f"{more} more"]
    return " · ".join(parts)


# -- histogram ------------------------------------------------------------------
@dataclass
class Histogram:
    counts: list[int]
    lo: int
    hi: int
    cutoffs: list[int]
    cut_bins: list[int]  # the bin each cut-off falls in

    @property
    def empty(self) -> bool:
        return not any(self.counts)

    def bin_of(self, length: int) -> int:
        n = len(self.counts)
        if self.hi <= self.lo:
            return 0
        return min(n - 1, max(0, (length - self.lo) * n // (self.hi - self.lo + 1)))


def histogram(lengths: Sequence[int], bins: int) -> Histogram:
    """Lengths binned into ``bins`` equal-width bins, with the grade cut-offs located."""
    bins = max(1, bins)
    ordered = sorted(lengths)
    if not ordered:
        return Histogram([0] * bins, 0, 0, [], [])
    lo, hi = ordered[0], ordered[-1]
    h = Histogram([0] * bins, lo, hi, length_cutoffs(ordered), [])
    for length in ordered:
        h.counts[h.bin_of(length)] += 1
    h.cut_bins = [h.bin_of(c) for c in h.cutoffs]
    return h


# -- previews -------------------------------------------------------------------
def preview_text(values: dict[str, Any], text: str) -> str:
    """One line for the list: the cell's values, then the text's start, whitespace folded."""
    head = "·".join(str(v) for v in values.values())
    body = " ".join(text.split())
    return f"{head} — {body}" if body else head
