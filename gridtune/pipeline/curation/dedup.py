"""Near-duplicate completions: MinHash/LSH over word shingles (datasketch), checked
by the exact Jaccard similarity, grouped, stored in the project; a drop keeps the
best-graded completion of each group and rejects the others.

Why the default threshold is 0.8 on 3-word shingles: a text of m shingles with k
words replaced here and there loses about 3k shingles on each side, so its Jaccard
similarity to the original is about (m - 3k) / (m + 3k); 0.8 is reached at about
one word in 27 replaced (~4%). Two completions sampled independently for the same
prompt, even from a repetitive model, share far fewer 3-word runs (typically
J < 0.3), so at 0.8 a group means "the same text with small edits", not "the same
topic". Lower it (0.5-0.6) to also catch paraphrases with long shared passages.

The grouping is recomputed in full on every pass (``find_duplicates``): it always
matches the texts as they are now (edits, regenerations, new completions), and
10,000 completions of ~150 words take about 2-3 s on one core here (shingling
0.5 s, MinHash 1.3 s, LSH index and queries 0.4 s; measured once while writing
this module), so an incremental index would buy little for its bookkeeping. The
groups stay as stored until the next pass; ``latest_pass`` says when that was.

Groups are connected components of the pairs at or above the threshold (A~B and
B~C put A, B and C together even when A and C are a little further apart).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import GridtuneError
from ...store import Store, curation as cur

DEFAULT_THRESHOLD = 0.8
SHINGLE_WORDS = 3
NUM_PERM = 128
DEDUP = "dedup"  # the source of a drop's rejections (grade 0), undoable
LSH_MARGIN = 0.1  # LSH finds candidates this far below the threshold; exact Jaccard decides

_WORD = re.compile(r"\w+")


class DedupError(GridtuneError, ValueError):
    """Bad options; a one-line message."""


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore): punctuation, case and
    spacing differences do not make two texts different."""
    return _WORD.findall(text.lower())


def shingles(text: str, k: int = SHINGLE_WORDS) -> set[str]:
    """The set of k-word runs of ``text``; a text shorter than k words is one shingle."""
    w = words(text)
    if not w:
        return set()
    if len(w) < k:
        return {" ".join(w)}
    return {" ".join(w[i:i + k]) for i in range(len(w) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def check_threshold(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise DedupError(f"the near-duplicate threshold must be a number in (0, 1], not {threshold!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise DedupError(f"the near-duplicate threshold must be in (0, 1], not {threshold}")
    return value


def near_duplicate_groups(texts: dict[int, str], threshold: float = DEFAULT_THRESHOLD,
                          *, k: int = SHINGLE_WORDS,
                          num_perm: int = NUM_PERM) -> list[tuple[list[int], dict[int, float]]]:
    """Group ids whose texts are near-copies: [(member ids ascending, id -> highest
    similarity to another member)], groups ordered by their smallest id. Pure: no store."""
    from datasketch import MinHash, MinHashLSH

    threshold = check_threshold(threshold)
    ids = sorted(cid for cid in texts)
    sets = {cid: shingles(texts[cid] or "", k) for cid in ids}
    ids = [cid for cid in ids if sets[cid]]  # an empty text is no one's near-copy
    if len(ids) < 2:
        return []
    signatures = MinHash.bulk([[s.encode() for s in sets[cid]] for cid in ids], num_perm=num_perm)
    lsh = MinHashLSH(threshold=max(0.05, min(0.95, threshold - LSH_MARGIN)), num_perm=num_perm)
    with lsh.insertion_session() as session:
        for cid, sig in zip(ids, signatures, strict=True):
            session.insert(cid, sig, check_duplication=False)
    parent = {cid: cid for cid in ids}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    best: dict[int, float] = {}
    for cid, sig in zip(ids, signatures, strict=True):
        for other in lsh.query(sig):
            if other <= cid:  # each pair once
                continue
            sim = jaccard(sets[cid], sets[other])
            if sim >= threshold:
                best[cid] = max(best.get(cid, 0.0), sim)
                best[other] = max(best.get(other, 0.0), sim)
                a, b = find(cid), find(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for cid in best:
        groups.setdefault(find(cid), []).append(cid)
    return [(sorted(m), {c: round(best[c], 4) for c in m}) for _, m in sorted(groups.items())]


@dataclass
class DedupResult:
    threshold: float
    completions: int  # finished completions compared
    groups: list[list[int]]
    seconds: float
    drop: DropResult | None = None

    @property
    def members(self) -> int:
        return sum(len(g) for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "threshold": self.threshold, "shingle_words": SHINGLE_WORDS, "completions": self.completions,
            "groups": len(self.groups), "members": self.members, "extra_copies": self.members - len(self.groups),
            "seconds": round(self.seconds, 3), "group_members": self.groups,
        }
        if self.drop is not None:
            out["drop"] = self.drop.to_dict()
        return out

    def summary(self) -> str:
        if not self.groups:
            line = (f"no near-duplicates among {self.completions:,} finished completion(s) "
                    f"(Jaccard >= {self.threshold:g} on {SHINGLE_WORDS}-word shingles)")
        else:
            line = (f"{len(self.groups):,} group(s) of near-duplicates: {self.members:,} of "
                    f"{self.completions:,} finished completions, {self.members - len(self.groups):,} extra "
                    f"cop{'y' if self.members - len(self.groups) == 1 else 'ies'} "
                    f"(Jaccard >= {self.threshold:g} on {SHINGLE_WORDS}-word shingles; {self.seconds:.1f} s)")
            sizes = ", ".join(f"#{g[0]}: {len(g)}" for g in self.groups[:5])
            more = f", ... {len(self.groups) - 5} more" if len(self.groups) > 5 else ""
            line += f"\n  groups (smallest id: size): {sizes}{more}"
        if self.drop is not None:
            line += "\n" + self.drop.summary()
        return line


def find_duplicates(store: Store, threshold: float = DEFAULT_THRESHOLD) -> DedupResult:
    """Recompute the near-duplicate groups of every finished completion and store them
    (replacing the previous grouping)."""
    threshold = check_threshold(threshold)
    started = time.perf_counter()
    rows = cur.finished_rows(store)
    found = near_duplicate_groups({r.id: r.text for r in rows}, threshold)
    seconds = time.perf_counter() - started
    members = [(cid, ids[0], sims[cid]) for ids, sims in found for cid in ids]
    cur.replace_dup_groups(store, members, threshold=threshold, shingle=SHINGLE_WORDS, num_perm=NUM_PERM,
                           completions=len(rows), seconds=seconds)
    return DedupResult(threshold, len(rows), [ids for ids, _ in found], seconds)


# -- the drop ------------------------------------------------------------------------
@dataclass
class DropResult:
    kept: list[int] = field(default_factory=list)  # one per group
    rejected: list[int] = field(default_factory=list)  # newly rejected (source "dedup")
    already_rejected: int = 0
    skipped_person: int = 0  # graded by a person: left as the person decided

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "rejected": self.rejected, "already_rejected": self.already_rejected,
                "skipped_person": self.skipped_person}

    def summary(self) -> str:
        return (f"dropped {len(self.rejected):,} near-duplicate(s) (grade 0, source '{DEDUP}', undoable), "
                f"kept the best-graded of each of {len(self.kept):,} group(s); "
                f"{self.already_rejected:,} already rejected, {self.skipped_person:,} graded by a person left alone")


def keeper_key(row: cur.CurationRow) -> tuple[Any, ...]:
    """Sort key, best first: the highest grade (ungraded below any grade, rejected
    lowest), then a finished completion before a cut-off one, then the longer, then
    the lower id."""
    grade = -1 if row.grade == 0 else (0 if row.grade is None else row.grade)
    return (-grade, row.finish_reason == "length", -len(row.text or ""), row.id)


def drop_duplicates(store: Store, groups: Sequence[Sequence[int]] | None = None) -> DropResult:
    """Keep the best-graded completion of each stored group (or of ``groups``) and
    reject the others as grade 0 from source "dedup". A person's grade is never
    overridden (those members are skipped); ``undo_drop`` withdraws the rejections."""
    if groups is None:
        groups = list(cur.dup_groups(store).values())
    result = DropResult()
    pairs: list[tuple[int, int]] = []
    for group in groups:
        rows = sorted(cur.finished_rows(store, group), key=keeper_key)
        if len(rows) < 2:
            continue
        result.kept.append(rows[0].id)
        for row in rows[1:]:
            if row.grade_source == "person":
                result.skipped_person += 1
            elif row.grade == 0:
                result.already_rejected += 1
            else:
                pairs.append((row.id, 0))
    if pairs:
        store.set_grades(pairs, DEDUP)
    result.rejected = [cid for cid, _ in pairs]
    return result


def undo_drop(store: Store) -> list[int]:
    """Withdraw every standing rejection a drop made; returns those completion ids."""
    return cur.undo_source(store, DEDUP)


# -- for the review screen ---------------------------------------------------------------
def group_of(store: Store, completion_id: int) -> list[int]:
    """The ids of ``completion_id``'s group (itself included, id order); [] if it has no near-copy."""
    gid = cur.dup_group_id(store, completion_id)
    if gid is None:
        return []
    members = cur.dup_group_members(store, gid)
    return members if len(members) > 1 else []


def twins(store: Store, completion_id: int) -> list[int]:
    """The other members of its group."""
    return [cid for cid in group_of(store, completion_id) if cid != completion_id]


def twin_of(store: Store, completion_id: int) -> int | None:
    """The next member of its group after ``completion_id`` (wrapping round): what a
    "jump to twin" key goes to; None when it has no near-copy."""
    members = group_of(store, completion_id)
    if not members:
        return None
    return members[(members.index(completion_id) + 1) % len(members)]


def markers(store: Store, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """id -> (group id, group size) for those of ``ids`` that have near-copies."""
    return {cid: m for cid, m in cur.dup_markers(store, ids).items() if m[1] > 1}


def duplicate_count(store: Store) -> dict[str, int]:
    """{"groups", "members", "extra_copies"} of the stored grouping."""
    return cur.dup_counts(store)


def latest_pass(store: Store) -> dict[str, Any] | None:
    """The last pass: threshold, when (created_at), counts, seconds; None if never run."""
    return cur.latest_dedup_pass(store)
