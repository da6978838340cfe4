"""Near-duplicates: found on a real project file, dropped keeping the best-graded,
never over a person's grade, undoable; and the `gridtune dedup` command."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys

import pytest

from gridtune.pipeline.curation import dedup
from gridtune.pipeline.curation.grading import grade_by_length
from gridtune.pipeline.spec.grid import demo_spec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "po", "ra", "se", "ti", "vu", "zo")
         for b in ("ba", "de", "fi", "go", "hu", "ja", "ke", "li", "mo", "ne", "pa", "qi", "ru", "so", "tu")]


def prose(seed: int, n: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + "."


def edit(text: str, changes: int, seed: int = 99) -> str:
    """``text`` with ``changes`` words replaced, spread out (a near-copy)."""
    w = text.split()
    step = len(w) // (changes + 1)
    for i in range(1, changes + 1):
        w[i * step] = "different"
    return " ".join(w)


def fill(store, texts, finish="stop"):
    items = store.pending_work(limit=len(texts))
    for item, text in zip(items, texts):
        store.save_done(item.completion_id, text=text, model="m", params=None, prompt_tokens=1,
                        completion_tokens=len(text.split()), latency_s=0.0, finish_reason=finish, attempts=1)
    return [i.completion_id for i in items]


@pytest.fixture
def store(tmp_path):
    with create_project(tmp_path / "p.gridtune", demo_spec()) as s:
        yield s


def test_shingles_and_jaccard_by_hand():
    assert dedup.shingles("The cat sat on the mat") == {"the cat sat", "cat sat on", "sat on the", "on the mat"}
    assert dedup.shingles("Hi there") == {"hi there"}  # shorter than a shingle: one shingle
    assert dedup.shingles("  ,. ") == set()
    a = dedup.shingles("a b c d e")  # abc bcd cde
    b = dedup.shingles("a b c d x")  # abc bcd cdx
    assert dedup.jaccard(a, b) == pytest.approx(2 / 4)


def test_planted_near_duplicate_pair_is_found_and_unrelated_pair_is_not(store):
    base = prose(1)
    near = edit(base, 2).upper()  # two words changed, and case does not matter
    assert dedup.jaccard(dedup.shingles(base), dedup.shingles(near)) >= 0.8
    # An unrelated pair sharing the same vocabulary (and a long-ish common passage).
    other_a, other_b = prose(2), prose(3)
    shared = " ".join(prose(4).split()[:20])
    other_b = shared + " " + other_b
    other_a = shared + " " + other_a
    ids = fill(store, [base, other_a, near, other_b, prose(5), prose(6)])
    result = dedup.find_duplicates(store)
    assert result.groups == [[ids[0], ids[2]]]
    assert result.completions == 6 and result.members == 2
    assert dedup.group_of(store, ids[0]) == [ids[0], ids[2]]
    assert dedup.twin_of(store, ids[0]) == ids[2] and dedup.twin_of(store, ids[2]) == ids[0]
    assert dedup.twins(store, ids[2]) == [ids[0]]
    assert dedup.twin_of(store, ids[1]) is None and dedup.group_of(store, ids[1]) == []
    assert dedup.markers(store, ids) == {ids[0]: (ids[0], 2), ids[2]: (ids[0], 2)}
    assert dedup.duplicate_count(store) == {"groups": 1, "members": 2, "extra_copies": 1}
    assert dedup.latest_pass(store)["threshold"] == 0.8
    # A lower threshold also groups the pair with the shared passage? Not at 0.8, and the
    # recomputation replaces the stored groups (it is a full pass).
    fewer = dedup.find_duplicates(store, threshold=1.0)
    assert fewer.groups == [] and dedup.duplicate_count(store)["groups"] == 0


def test_groups_are_connected_components_and_three_copies_group(store):
    base = prose(10)
    ids = fill(store, [base, edit(base, 1), edit(base, 2, seed=1), prose(11)])
    result = dedup.find_duplicates(store)
    assert result.groups == [ids[:3]]
    assert dedup.twin_of(store, ids[2]) == ids[0]  # wraps round


def test_drop_keeps_the_best_graded_and_never_overrides_a_person(store):
    base = prose(20)
    texts = [base, edit(base, 1), edit(base, 2), base + " extra words here", prose(21)]
    ids = fill(store, texts)
    store.set_grade(ids[0], 3, "by-length")
    store.set_grade(ids[1], 5, "by-length")  # the best graded
    store.set_grade(ids[2], 4, "person")  # a person's grade: left alone
    # ids[3] ungraded
    result = dedup.find_duplicates(store)
    assert result.groups == [ids[:4]]
    drop = dedup.drop_duplicates(store)
    assert drop.kept == [ids[1]]
    assert sorted(drop.rejected) == sorted([ids[0], ids[3]])
    assert drop.skipped_person == 1
    assert store.get_completion(ids[1]).grade == 5
    assert store.get_completion(ids[2]).grade == 4 and store.get_completion(ids[2]).grade_source == "person"
    for cid in (ids[0], ids[3]):
        c = store.get_completion(cid)
        assert (c.grade, c.grade_source) == (0, "dedup")
    assert store.get_completion(ids[4]).grade is None  # not in a group
    # Again: nothing new to reject.
    again = dedup.drop_duplicates(store)
    assert again.rejected == [] and again.already_rejected == 2
    # Grading by length later does not bring a dropped copy back; a person can.
    grade_by_length(store)
    assert store.get_completion(ids[0]).grade == 0
    store.set_grade(ids[3], 2, "person")
    assert store.get_completion(ids[3]).grade == 2
    # Undo: the dedup rejections are withdrawn, the other grades come back.
    undone = dedup.undo_drop(store)
    assert sorted(undone) == sorted([ids[0], ids[3]])
    c0 = store.get_completion(ids[0])
    assert c0.grade_source == "by-length" and c0.grade >= 1
    assert store.get_completion(ids[3]).grade == 2


def test_drop_ties_go_to_the_longer_then_the_lower_id_and_finished_beats_cut_off(store):
    base = prose(30)
    ids = fill(store, [base, edit(base, 1), base + " and one more", edit(base, 2)])
    for cid in ids:
        store.set_grade(cid, 4, "by-length")
    dedup.find_duplicates(store)
    assert dedup.drop_duplicates(store).kept == [ids[2]]  # all grade 4: the longest
    dedup.undo_drop(store)
    same = fill(store, [prose(31), prose(31), prose(31)])
    dedup.find_duplicates(store)
    kept = dedup.drop_duplicates(store).kept
    assert same[0] in kept  # equal grade and length: the lower id
    # A cut-off copy with the same grade and more text loses to a finished one.
    with Store.open(store.path) as s2:
        ids2 = fill(s2, [prose(40), prose(40) + " cut off mid"], finish="stop")
        s2._conn.execute("UPDATE completions SET finish_reason = 'length' WHERE id = ?", (ids2[1],))
    rows = dedup.cur.finished_rows(store, ids2)
    assert sorted(rows, key=dedup.keeper_key)[0].id == ids2[0]


def test_bad_threshold_is_refused():
    for bad in (0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(dedup.DedupError):
            dedup.check_threshold(bad)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gridtune", *args], capture_output=True, text=True)


def test_cli_dedup_finds_drops_and_refuses_bad_input(tmp_path):
    path = tmp_path / "p.gridtune"
    base = prose(50)
    with create_project(path, demo_spec()) as store:
        ids = fill(store, [base, edit(base, 1), prose(51)])
        store.set_grade(ids[1], 5, "person")
    bad = run_cli("dedup", str(path), "--threshold", "1.5")
    assert bad.returncode == 2 and "threshold" in bad.stderr and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1
    with sqlite3.connect(path) as raw:  # nothing written
        assert raw.execute("SELECT count(*) FROM dedup_passes").fetchone()[0] == 0
    missing = run_cli("dedup", str(tmp_path / "nope.gridtune"))
    assert missing.returncode == 2 and "no such project" in missing.stderr
    out = run_cli("dedup", str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["groups"] == 1 and data["group_members"] == [[ids[0], ids[1]]] and data["threshold"] == 0.8
    dropped = run_cli("dedup", str(path), "--drop")
    assert dropped.returncode == 0, dropped.stderr
    assert "1 group(s)" in dropped.stdout and "dropped 1 near-duplicate" in dropped.stdout
    with Store.open(path) as store:
        assert store.get_completion(ids[0]).grade == 0
        assert store.get_completion(ids[1]).grade == 5
    undo = run_cli("dedup", str(path), "--undo-drop", "--json")
    assert undo.returncode == 0 and json.loads(undo.stdout)["undone"] == 1
    with Store.open(path) as store:
        assert store.get_completion(ids[0]).grade is None
