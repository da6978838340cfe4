"""Diversity measures on tiny sets checked by hand, on a real project's kept set
vs all its finished completions, and `gridtune stats`."""

from __future__ import annotations

import gzip
import json
import math
import random
import subprocess
import sys
from collections import Counter

import pytest

from gridtune.pipeline.curation import diversity as d
from gridtune.pipeline.spec.grid import demo_spec
from gridtune.pipeline.spec.project import create_project


def toks(*texts):
    return [t.split() for t in texts]


def test_distinct_n_by_hand():
    docs = toks("a b a", "a b")
    assert d.distinct_n(docs, 1) == pytest.approx(2 / 5)  # a b a a b: {a, b}
    assert d.distinct_n(docs, 2) == pytest.approx(2 / 3)  # ab ba | ab: n-grams never cross texts
    assert d.distinct_n(docs, 3) == pytest.approx(1 / 1)
    assert d.distinct_n(docs, 4) is None
    assert d.distinct_n([], 1) is None


def test_compression_ratio():
    texts = ["one two three", "four five"]
    data = b"one two three\nfour five"
    assert d.compression_ratio(texts) == pytest.approx(len(data) / len(gzip.compress(data, 9, mtime=0)))
    repetitive = ["the same sentence again and again."] * 50
    rng = random.Random(0)
    varied = [" ".join(f"w{rng.randrange(10_000)}" for _ in range(6)) for _ in range(50)]
    assert d.compression_ratio(repetitive) > 10 > d.compression_ratio(varied)
    assert d.compression_ratio([]) is None and d.compression_ratio([""]) is None


def test_self_bleu_by_hand():
    # Identical texts: BLEU 1 each.
    assert d.self_bleu(toks("a b c d e", "a b c d e")) == pytest.approx(1.0)
    # One word differs at the end: precisions 4/5, 3/4, 2/3, 1/2; same lengths, no penalty.
    assert d.self_bleu(toks("a b c d e", "a b c d f")) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # Nothing shared: every order smoothed to 0.1 matches: (0.1/4 * 0.1/3 * 0.1/2 * 0.1/1)^(1/4).
    disjoint = (0.1 ** 4 / 24) ** 0.25
    assert d.self_bleu(toks("a b c d", "e f g h")) == pytest.approx(disjoint)
    # Three texts: the two copies score 1 (each other's reference), the stranger the smoothed floor.
    assert d.self_bleu(toks("a a b c", "a a b c", "x y z w")) == pytest.approx((1 + 1 + disjoint) / 3)
    # Clipping by the most any *other* text has: "a" three times here, once elsewhere.
    one = d.self_bleu(toks("a a a b", "a c d e"))
    p1_first, p1_second = 1 / 4, 1 / 4  # a (clipped to 1); a
    floor = [0.1 / 3, 0.1 / 2, 0.1 / 1]
    expected = [math.exp((math.log(p) + sum(map(math.log, floor))) / 4) for p in (p1_first, p1_second)]
    assert one == pytest.approx(sum(expected) / 2)
    # Brevity penalty: a 4-word text against a 6-word one is penalised exp(1 - 6/4).
    short_long = d.self_bleu(toks("a b c d", "a b c d e f"))
    first = math.exp(1 - 6 / 4) * 1.0  # every n-gram of the short one is in the long one
    second = ((4 / 6) * (3 / 5) * (2 / 4) * (1 / 3)) ** 0.25  # long vs short: no penalty (longer)
    assert short_long == pytest.approx((first + second) / 2)
    assert d.self_bleu(toks("a b c d")) is None and d.self_bleu(toks("a b c", "a b c")) is None


def naive_bleu(hyp, refs, max_n=4):
    logs = 0.0
    for n in range(1, max_n + 1):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        best = Counter()
        for r in refs:
            for g, c in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                best[g] = max(best[g], c)
        clipped = sum(min(c, best[g]) for g, c in h.items())
        logs += math.log((clipped or 0.1) / (len(hyp) - n + 1))
    r = min((len(x) for x in refs), key=lambda x: (abs(x - len(hyp)), x))
    bp = 1.0 if len(hyp) > r else math.exp(1 - r / len(hyp))
    return bp * math.exp(logs / max_n)


def test_self_bleu_matches_a_naive_all_pairs_computation():
    rng = random.Random(3)
    docs = [[rng.choice("abcdef") for _ in range(rng.randint(4, 15))] for _ in range(12)]
    expected = sum(naive_bleu(doc, docs[:i] + docs[i + 1:]) for i, doc in enumerate(docs)) / len(docs)
    assert d.self_bleu(docs) == pytest.approx(expected)


def test_sample_is_deterministic():
    items = list(range(1000))
    assert d.sample(items, 10) == d.sample(items, 10) and len(d.sample(items, 10)) == 10
    assert d.sample(items, 10) == sorted(d.sample(items, 10))
    assert d.sample(items[:5], 10) == items[:5]


def fill(store, texts, finish="stop"):
    items = store.pending_work(limit=len(texts))
    for item, text in zip(items, texts):
        store.save_done(item.completion_id, text=text, model="m", params=None, prompt_tokens=1,
                        completion_tokens=1, latency_s=0.0, finish_reason=finish, attempts=1)
    return [i.completion_id for i in items]


def test_kept_set_vs_all_on_a_project(tmp_path):
    path = tmp_path / "p.gridtune"
    with create_project(path, demo_spec()) as store:
        ids = fill(store, ["alpha beta gamma delta", "alpha beta gamma delta", "one two three four five",
                           "red green blue"])
        cut = fill(store, ["this ends in the midd"], finish="length")
        store.set_grade(ids[0], 4, "person")
        store.set_grade(ids[1], 0, "person")  # rejected
        store.set_grade(ids[2], 5, "by-length")
        store.set_grade(ids[3], 1, "by-length")  # below min grade
        store.set_grade(cut[0], 5, "by-length")  # cut off: never kept
        blank = fill(store, ["   "])  # blank text: never kept
        stats = d.diversity_stats(store, min_grade=2)
        assert stats.kept["texts"] == 2 and stats.all["texts"] == 6
        # kept: "alpha beta gamma delta" + "one two three four five": every word distinct
        assert stats.kept["distinct"]["1"] == 1.0 and stats.kept["words"] == 9
        # all: 4+4+5+3+5 words, 4+5+3+5 = 17 distinct ("alpha beta gamma delta" twice)
        assert stats.all["words"] == 21 and stats.all["distinct"]["1"] == pytest.approx(round(17 / 21, 4))
        assert stats.all["self_bleu"] > stats.kept["self_bleu"]  # the copy was dropped
        assert d.diversity_stats(store, min_grade=0).kept["texts"] == 3  # the grade-1 one too
        assert d.diversity_stats(store).kept["texts"] == 3  # default: as the export, no minimum grade
        store.set_grade(ids[3], 1, "person")
        store.undo_grade(ids[2])  # ungraded now: kept without a minimum grade
        if hasattr(store, "kept_by_cell"):  # the same "kept" as coverage and export (SQL there)
            for min_grade in (None, 0, 1, 2, 5):
                rows = d.cur.finished_rows(store)
                assert sum(d.is_kept(r, min_grade) for r in rows) == sum(store.kept_by_cell(min_grade).values())
        assert blank
        assert "kept" in stats.summary() and "Self-BLEU" in stats.summary()
    out = subprocess.run([sys.executable, "-m", "gridtune", "stats", str(path), "--min-grade", "4", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["kept"]["texts"] == 1 and data["all"]["texts"] == 6 and data["min_grade"] == 4
    text = subprocess.run([sys.executable, "-m", "gridtune", "stats", str(path)], capture_output=True, text=True)
    assert text.returncode == 0 and "distinct-2" in text.stdout and "graded or not" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "gridtune", "stats", str(path), "--min-grade", "9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
