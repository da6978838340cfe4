"""Grading by length quintile, through the store and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

from gridtune.pipeline.curation.grading import drop_at_or_below, grade_by_length, grade_for_length, length_cutoffs
from gridtune.pipeline.spec.grid import demo_spec
from gridtune.pipeline.spec.project import create_project


def fill(store, lengths):
    items = store.pending_work(limit=len(lengths))
    for item, n in zip(items, lengths):
        store.save_done(item.completion_id, text="w" * n, model="m", params=None, prompt_tokens=1,
                        completion_tokens=1, latency_s=0.0, finish_reason="stop", attempts=1)
    return [i.completion_id for i in items]


def test_quintiles_split_evenly():
    lengths = list(range(1, 101))
    cutoffs = length_cutoffs(lengths)
    assert cutoffs == [21, 41, 61, 81]
    grades = [grade_for_length(n, cutoffs) for n in lengths]
    assert [grades.count(g) for g in range(1, 6)] == [20, 20, 20, 20, 20]
    assert grade_for_length(1, cutoffs) == 1 and grade_for_length(100, cutoffs) == 5


def test_grade_by_length_never_touches_a_persons_grade(tmp_path):
    store = create_project(tmp_path / "p.gridtune", demo_spec())
    ids = fill(store, [10 * (i + 1) for i in range(100)])
    store.set_grade(ids[0], 5, "person")  # the shortest, but a person liked it
    result = grade_by_length(store)
    assert result.graded == 99 and result.skipped_person == 1
    assert store.get_completion(ids[0]).grade == 5
    assert store.get_completion(ids[1]).grade == 1
    assert store.get_completion(ids[-1]).grade == 5
    assert store.get_completion(ids[-1]).grade_source == "by-length"
    again = grade_by_length(store)
    assert again.graded == 0 and again.unchanged == 99  # idempotent: no new history rows
    assert len(store.grade_history(ids[-1])) == 1


def test_drop_at_or_below_rejects_and_can_be_undone(tmp_path):
    store = create_project(tmp_path / "p.gridtune", demo_spec())
    fill(store, [10 * (i + 1) for i in range(50)])
    grade_by_length(store)
    dropped = drop_at_or_below(store, 2)
    assert len(dropped) == 20
    counts = store.status_counts()
    assert counts.rejected == 20 and counts.grades["1"] == 0 and counts.grades["2"] == 0
    store.undo_grades(dropped)
    assert store.status_counts().grades["1"] == 10


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "gridtune", *args], capture_output=True, text=True, **kw)


def test_cli_new_status_grade(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "t"\n[prompt]\ngeneration = "About {a} and {b}"\n'
        '[variables]\na = ["x", "y"]\nb = [1, 2, 3]\n[generation]\nsamples = 2\n'
    )
    project = tmp_path / "t.gridtune"
    out = run_cli("new", str(project), "--spec", str(spec))
    assert out.returncode == 0, out.stderr
    assert "6 cells x 2 sample(s) = 12 completions" in out.stdout
    again = run_cli("new", str(project), "--spec", str(spec))
    assert again.returncode == 2 and "already exists" in again.stderr
    from gridtune.store import Store

    with Store.open(project) as store:
        fill(store, [5, 50, 500, 5000, 50, 5])
    graded = run_cli("grade", str(project), "--by-length", "--json")
    assert graded.returncode == 0, graded.stderr
    result = json.loads(graded.stdout)
    assert result["graded"] == 6 and sum(result["grades"].values()) == 6


def test_cli_bad_spec_exit_2_and_nothing_written(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('[prompt]\ngeneration = "About {a} and {c}"\n[variables]\na = ["x"]\n')
    project = tmp_path / "bad.gridtune"
    out = run_cli("new", str(project), "--spec", str(spec))
    assert out.returncode == 2
    assert out.stderr.strip() == "gridtune: error: generation template: placeholder {c} has no variable (variables: a)"
    assert not project.exists()
    missing = run_cli("new", str(project), "--spec", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "no such spec file" in missing.stderr
    no_project = run_cli("grade", str(tmp_path / "nope.gridtune"), "--by-length")
    assert no_project.returncode == 2 and "no such project" in no_project.stderr
