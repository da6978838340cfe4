"""The review loop's logic, without UI: grading, editing, filters, sorts, undoable
bulk grading, the length histogram, the grade history in words, the one-line
preview of a completion and what curation marks on it (cut off at max tokens, a
near-duplicate group), the curation counts and the judge's agreement in words.

The review screen makes every change through these; tests call them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ...store import Store, curation as cur
from ...store.records import CompletionRecord, GradeRecord
from .grading import BY_LENGTH, GradeResult, drop_at_or_below, grade_by_length, length_cutoffs

PERSON = "person"


@dataclass(frozen=True)
class Filter:
    key: str
    label: str
    where: str = "all"
    min_grade: int | None = None


# In the order `f` cycles them (F backwards): what a person looks for first comes first:
# the cut-off ones and the near-duplicates within three presses, not eight.
FILTERS: tuple[Filter, ...] = (
    Filter("done", "finished", "finished"),
    Filter("ungraded", "ungraded", "ungraded"),
    Filter("cut_off", "cut off", "cut_off"),
    Filter("duplicates", "near-duplicates", "duplicates"),
    Filter("graded", "graded", "graded"),
    Filter("ge2", "grade ≥ 2", "all", 2),
    Filter("ge3", "grade ≥ 3", "all", 3),
    Filter("ge4", "grade ≥ 4", "all", 4),
    Filter("ge5", "grade 5", "all", 5),
    Filter("failed", "failed", "failed"),
    Filter("all", "all, pending too"),
)
SORTS: tuple[tuple[str, str], ...] = (("length", "length"), ("grade", "grade"), ("grid", "grid order"))


def next_filter(key: str, step: int = 1) -> Filter:
    """The filter after ``key`` (``step`` -1: before it), round the list."""
    keys = [f.key for f in FILTERS]
    return FILTERS[(keys.index(key) + step) % len(FILTERS)] if key in keys else FILTERS[0]


def filter_by_key(key: str) -> Filter:
    for f in FILTERS:
        if f.key == key:
            return f
    raise ValueError(f"unknown filter {key!r}")


def next_sort(key: str) -> str:
    keys = [k for k, _ in SORTS]
    return keys[(keys.index(key) + 1) % len(keys)] if key in keys else keys[0]


def rows(store: Store, filt: Filter, search: str | None, sort: str, descending: bool):
    """The light rows (id, length, grade, status) the review list shows.

    The "duplicates" filter lists the finished members of the stored near-duplicate
    groups, each group together (in the order its first member has in the sort),
    so twins are compared side by side."""
    if filt.where == "finished":
        # Finished on their own: a completion cut off at max tokens is done but not
        # finished (the cut-off filter lists those), and no export takes it by default.
        cut = {r[0] for r in store.review_rows(where="cut_off", search=search or None)}
        return [r for r in store.review_rows(where="done", min_grade=filt.min_grade, search=search or None,
                                             sort=sort, descending=descending) if r[0] not in cut]
    if filt.where == "duplicates":
        groups = cur.dup_groups(store)
        group = {cid: gid for gid, members in groups.items() for cid in members}
        listed = [r for r in store.review_rows(where="done", min_grade=filt.min_grade, search=search or None,
                                               sort=sort, descending=descending) if r[0] in group]
        first: dict[int, int] = {}
        for i, r in enumerate(listed):
            first.setdefault(group[r[0]], i)
        return sorted(listed, key=lambda r: first[group[r[0]]])
    return store.review_rows(
        where=filt.where, min_grade=filt.min_grade, search=search or None, sort=sort, descending=descending
    )


@dataclass(frozen=True)
class ListPreview:
    """What the list shows of one row beyond its id, length and grade: fetched for
    the visible rows only."""

    text: str  # the cell's values, then the text's start (see preview_text)
    cut_off: bool = False  # finished because it hit max tokens
    dup_size: int = 0  # members of its near-duplicate group (0: none)


def list_previews(store: Store, ids: Sequence[int]) -> dict[int, ListPreview]:
    """Previews and curation marks of ``ids``: three queries for a screenful."""
    from .dedup import markers

    raw = store.review_previews(ids)
    cut = store.cut_off_among(ids)
    dups = markers(store, ids)
    out = {}
    for cid in ids:
        values, text = raw.get(cid, ({}, ""))
        out[cid] = ListPreview(preview_text(values, text) if cid in raw else "", cid in cut,
                               dups[cid][1] if cid in dups else 0)
    return out


def cut_off_words(record: CompletionRecord) -> str | None:
    """"cut off at max tokens: 300 tokens" for a completion that hit its limit, else None."""
    if not record.cut_off:
        return None
    limit = (record.params or {}).get("max_tokens")
    tokens = limit if isinstance(limit, int) else record.completion_tokens
    return f"cut off at max tokens: {tokens:,} tokens" if tokens is not None else "cut off at max tokens"


def group_words(members: Sequence[int], completion_id: int) -> str | None:
    """"near-duplicate of #4, #9 (group of 3)" for a member of a group, else None."""
    others = [m for m in members if m != completion_id]
    if not others:
        return None
    shown = ", ".join(f"#{m}" for m in others[:6]) + (f" +{len(others) - 6}" if len(others) > 6 else "")
    return f"near-duplicate of {shown} (group of {len(members)})"


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
    kept: int = 0  # grade 1..5 and not cut off: what an export takes by default
    rejected: int = 0
    cut_off: int = 0  # finished at max tokens
    dup_groups: int = 0  # stored near-duplicate groups
    dup_members: int = 0  # completions in them
    dedup_run: bool = False  # whether near-duplicates were ever looked for
    judge: str = ""  # the newest calibration in words ("" when there is none)

    @classmethod
    def from_store(cls, store: Store) -> ReviewCounts:
        from .dedup import duplicate_count, latest_pass
        from .judge import latest_calibration

        c = store.status_counts()
        dups = duplicate_count(store)
        # A cut-off completion graded 1-5 is not kept: the export leaves it out unless asked.
        kept_cut_off = len(store.review_rows(where="cut_off", min_grade=1))
        return cls(done=c.done, graded=c.graded, kept=sum(c.grades.values()) - kept_cut_off, rejected=c.rejected,
                   cut_off=c.cut_off, dup_groups=dups["groups"], dup_members=dups["members"],
                   dedup_run=latest_pass(store) is not None, judge=calibration_words(latest_calibration(store)))

    def changed(self, old: int | None, new: int | None, cut_off: bool = False) -> ReviewCounts:
        """The counts once one completion's grade goes from ``old`` to ``new`` (a cut-off
        one's grade never makes it kept)."""
        graded, kept, rejected = self.graded, self.kept, self.rejected
        for value, sign in ((old, -1), (new, 1)):
            if value is None:
                continue
            graded += sign
            if value == 0:
                rejected += sign
            elif not cut_off:
                kept += sign
        return replace(self, graded=graded, kept=kept, rejected=rejected)

    def text(self) -> str:
        return f"graded {self.graded:,}/{self.done:,} · kept {self.kept:,} · rejected {self.rejected:,}"

    def cut_off_text(self) -> str:
        return f"{self.cut_off:,} cut off" if self.cut_off else "none cut off"

    def dup_text(self) -> str:
        if not self.dedup_run:
            return "near-duplicates not looked for"
        if not self.dup_groups:
            return "no near-duplicates"
        return f"{self.dup_members:,} near-dups in {self.dup_groups:,} group(s)"


def calibration_words(cal: Any) -> str:
    """A judge's agreement with the person, short: "judge gpt-x: κ 0.71, ρ 0.80, n 40"
    ("" without a calibration; "–" for a measure that is undefined)."""
    if cal is None or not cal.n:
        return ""

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    return f"judge {cal.model}: κ {fmt(cal.kappa)}, ρ {fmt(cal.spearman)}, n {cal.n:,}"


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


# -- curation from the review ------------------------------------------------------------
def parse_max_tokens(text: str) -> int:
    """The max tokens a person typed for a redo, bounded as ``--max-tokens`` is (ValueError: one line)."""
    from ..spec.options import GENERATION

    return int(GENERATION["max_tokens"].parse(text.strip(), "max tokens"))


def parse_top_up(text: str) -> int:
    """The kept examples a top-up aims at (``--top-up N``): a whole number of at least 1."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"the top-up target must be a whole number, not {text.strip()!r}") from None
    if value < 1:
        raise ValueError(f"the top-up target must be at least 1, not {value}")
    return value


def redo_words(record: CompletionRecord | None, result: Any) -> tuple[str, str]:
    """What a redo of one completion came to, and a notice severity: the new length
    and whether it ended on its own or was cut off again."""
    if result.state != "finished" or record is None:
        why = f": {result.error}" if getattr(result, "error", None) else ""
        return f"the regeneration {result.state}{why}; the old text is kept", "warning"
    if record.status != "done":
        return f"#{record.id} failed: {record.error or 'no reply'}; the old text is kept", "error"
    if record.cut_off:
        return (f"#{record.id} regenerated ({record.length or 0:,} chars) but cut off again: "
                f"{cut_off_words(record)}", "warning")
    return f"#{record.id} regenerated: {record.length or 0:,} chars, finished ({record.finish_reason})", "information"


def dedup_threshold(store: Store) -> float:
    """The threshold to offer for a near-duplicate pass: the last pass's, else the default."""
    from .dedup import DEFAULT_THRESHOLD, latest_pass

    return float((latest_pass(store) or {}).get("threshold") or DEFAULT_THRESHOLD)


def find_duplicates(store: Store, threshold: float | None = None) -> Any:
    """A near-duplicate pass at ``threshold`` (None: the last pass's, else the default)."""
    from .dedup import find_duplicates as find

    return find(store, dedup_threshold(store) if threshold is None else threshold)


def drop_duplicates(store: Store) -> Any:
    """Keep the best-graded of each stored group; the DropResult's ``rejected`` ids undo it."""
    from .dedup import drop_duplicates as drop

    return drop(store)
