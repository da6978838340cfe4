"""Lexical diversity of a data set, by the measures the literature recommends
together (Shaib et al. 2024, "Standardizing the measurement of text diversity"):

- compression ratio: bytes of the texts over bytes gzip makes of them (level 9).
  1 is incompressible; higher is more repetitive (typical prose ~2.5-3.5).
- distinct-n (n = 1..4): unique n-grams over all n-grams, n-grams taken within
  each text. 1 means no n-gram repeats anywhere; lower is more repetitive.
- Self-BLEU (Zhu et al. 2018): every text of a deterministic sample scored by
  BLEU-4 against all the other texts of the sample as references, averaged.
  0 is no shared n-grams; 1 is every text a copy of another.

For the kept set and for all finished completions, so a person sees what the
drop did to the data's variety.

The `diversity` package on PyPI implements these, but pulls in
sentence-transformers, transformers<5, evaluate and nltk (which fetch data and
models at run time), so they are implemented here, with tests on hand-computed
values. Words are lower-cased \\w+ runs, as in ``dedup``.
"""

from __future__ import annotations

import gzip
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ...store import Store, curation as cur
from ..spec.options import EXPORT
from .dedup import words

CUT_OFF_REASON = "length"  # store.records.CUT_OFF_REASON: ended at max tokens
DISTINCT_N = (1, 2, 3, 4)
BLEU_N = 4
SELF_BLEU_SAMPLE = 200  # texts; Self-BLEU is quadratic in spirit, so over a sample
SAMPLE_SEED = 0
BLEU_EPSILON = 0.1  # smoothing for an n-gram order with no match (NLTK's method1, as Texygen used)
DEFAULT_MIN_GRADE: int | None = None  # as export and coverage: ungraded completions are kept


# -- what "kept" means ---------------------------------------------------------------
def is_kept(row: cur.CurationRow, min_grade: int | None = DEFAULT_MIN_GRADE) -> bool:
    """Whether a finished completion is in the kept set, as pipeline/coverage.py
    defines "kept" for curation (Store.kept_by_cell is its query, and the export
    keeps the same rows): non-blank text, not rejected (grade 0, by a person or a
    dedup drop), not cut off at max tokens, and graded at least ``min_grade`` when
    one is given (without one, or 0, an ungraded completion is kept).

    The one place this module decides it: rows here, SQL there; the tests check
    that both count the same.
    """
    if not (row.text or "").strip() or row.finish_reason == CUT_OFF_REASON or row.grade == 0:
        return False
    if not min_grade:
        return True
    return row.grade is not None and row.grade >= min_grade


def kept_definition(min_grade: int | None = DEFAULT_MIN_GRADE) -> str:
    grade = "graded or not" if not min_grade else f"grade >= {min_grade}"
    return f"finished, not cut off, {grade}, not rejected"


# -- the measures ------------------------------------------------------------------------
def compression_ratio(texts: Sequence[str]) -> float | None:
    """Original bytes / gzip bytes of the texts joined by newlines; None for no text."""
    data = "\n".join(texts).encode("utf-8")
    if not data:
        return None
    return len(data) / len(gzip.compress(data, compresslevel=9, mtime=0))


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(tokens[i:] for i in range(n)), strict=False))


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float | None:
    """Unique n-grams / all n-grams over the texts (n-grams do not cross texts); None if none."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = ngrams(tokens, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def self_bleu(token_lists: Sequence[Sequence[str]], max_n: int = BLEU_N) -> float | None:
    """Mean BLEU-``max_n`` of each text against all the others as references.

    BLEU as Papineni et al.: n-gram counts clipped by the most any one reference
    has, geometric mean of the precisions (uniform weights), brevity penalty from
    the reference length closest to the text's (the shorter on a tie). An order
    with no match counts BLEU_EPSILON matches (smoothing, so one missing order
    does not zero the score). Texts shorter than ``max_n`` words are left out;
    None when fewer than two remain.
    """
    docs = [list(t) for t in token_lists if len(t) >= max_n]
    if len(docs) < 2:
        return None
    counts = [[Counter(ngrams(d, n)) for n in range(1, max_n + 1)] for d in docs]
    # Per order and n-gram: the highest count of any text, how many texts have it, and
    # the second highest: the most any *other* text has, without an O(texts^2) loop.
    tops: list[dict[tuple[str, ...], list[int]]] = []
    for k in range(max_n):
        top: dict[tuple[str, ...], list[int]] = {}
        for doc_counts in counts:
            for gram, c in doc_counts[k].items():
                entry = top.get(gram)
                if entry is None:
                    top[gram] = [c, 1, 0]
                elif c > entry[0]:
                    entry[2], entry[0], entry[1] = entry[0], c, 1
                elif c == entry[0]:
                    entry[1] += 1
                elif c > entry[2]:
                    entry[2] = c
        tops.append(top)
    lengths = sorted(len(d) for d in docs)
    total = 0.0
    for i, d in enumerate(docs):
        log_sum = 0.0
        for k in range(max_n):
            clipped = 0
            for gram, c in counts[i][k].items():
                best, holders, second = tops[k][gram]
                other = second if (c == best and holders == 1) else best
                clipped += min(c, other)
            possible = len(d) - k
            log_sum += math.log((clipped or BLEU_EPSILON) / possible)
        total += _brevity_penalty(len(d), lengths) * math.exp(log_sum / max_n)
    return total / len(docs)


def _brevity_penalty(c: int, lengths: list[int]) -> float:
    """Brevity penalty against the closest length among the *other* texts."""
    others = list(lengths)
    others.remove(c)  # this text's own length is not a reference
    r = min(others, key=lambda x: (abs(x - c), x))
    return 1.0 if c > r else math.exp(1 - r / c)


def sample(items: Sequence[Any], size: int = SELF_BLEU_SAMPLE, seed: int = SAMPLE_SEED) -> list[Any]:
    """A deterministic sample (the same items give the same sample), in input order."""
    if len(items) <= size:
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in picked]


def measure(texts: Sequence[str], *, sample_size: int = SELF_BLEU_SAMPLE) -> dict[str, Any]:
    """Every measure for one set of texts (in a stable order, e.g. by id)."""
    tokens = [words(t) for t in texts]
    bleu_sample = sample(tokens, sample_size)
    bleu = self_bleu(bleu_sample)
    return {
        "texts": len(texts),
        "words": sum(len(t) for t in tokens),
        "compression_ratio": _round(compression_ratio(texts)),
        "distinct": {str(n): _round(distinct_n(tokens, n)) for n in DISTINCT_N},
        "self_bleu": _round(bleu),
        "self_bleu_sample": len([t for t in bleu_sample if len(t) >= BLEU_N]),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# -- for a project -----------------------------------------------------------------------
@dataclass
class DiversityStats:
    min_grade: int | None
    kept: dict[str, Any]
    all: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"min_grade": self.min_grade, "kept": self.kept, "all": self.all,
                "kept_definition": kept_definition(self.min_grade)}

    def rows(self) -> list[tuple[str, str, str]]:
        """(measure, kept, all) lines for a table: the export report and the CLI."""
        def fmt(v: float | None, digits: int = 3) -> str:
            return "-" if v is None else f"{v:.{digits}f}"

        out = [("texts", f"{self.kept['texts']:,}", f"{self.all['texts']:,}"),
               ("words", f"{self.kept['words']:,}", f"{self.all['words']:,}"),
               ("compression ratio (lower: more varied)", fmt(self.kept["compression_ratio"], 2),
                fmt(self.all["compression_ratio"], 2))]
        for n in DISTINCT_N:
            out.append((f"distinct-{n} (higher: more varied)", fmt(self.kept["distinct"][str(n)]),
                        fmt(self.all["distinct"][str(n)])))
        out.append((f"Self-BLEU-{BLEU_N} (lower: more varied)", fmt(self.kept["self_bleu"]),
                    fmt(self.all["self_bleu"])))
        return out

    def summary(self) -> str:
        rows = [("", "kept", "all finished"), *self.rows()]
        width = max(len(r[0]) for r in rows)
        lines = [f"{a:<{width}}  {b:>10}  {c:>12}" for a, b, c in rows]
        lines.append(f"kept: {kept_definition(self.min_grade)}; "
                     f"Self-BLEU over a fixed sample of up to {SELF_BLEU_SAMPLE} texts")
        return "\n".join(lines)


def diversity_stats(store: Store, min_grade: int | None = DEFAULT_MIN_GRADE, *,
                    kept: Callable[[cur.CurationRow], bool] | None = None,
                    sample_size: int = SELF_BLEU_SAMPLE) -> DiversityStats:
    """Diversity of the kept set and of all finished completions of a project.
    ``kept`` overrides the kept predicate (default ``is_kept`` at ``min_grade``)."""
    if min_grade is not None:
        EXPORT["min_grade"].check(min_grade, "--min-grade")  # an OptionError is a ValueError
    rows = cur.finished_rows(store)
    keep = kept or (lambda row: is_kept(row, min_grade))
    return DiversityStats(
        min_grade=min_grade,
        kept=measure([r.text for r in rows if keep(r)], sample_size=sample_size),
        all=measure([r.text for r in rows], sample_size=sample_size),
    )
