"""LLM-as-judge against the loopback fake server: grades kept with provenance and
never replacing a person's, robust parsing, resumable passes, the rubric kept in
the project, and calibration figures on planted cases known by hand."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from gridtune.pipeline.curation import judge as j
from gridtune.pipeline.spec.grid import demo_spec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store, curation as cur
from tests.fakeserver import Fault

MODEL = "fake-judge"


def fill(store, texts):
    items = store.pending_work(limit=len(texts))
    for item, text in zip(items, texts):
        store.save_done(item.completion_id, text=text, model="m", params=None, prompt_tokens=1,
                        completion_tokens=1, latency_s=0.0, finish_reason="stop", attempts=1)
    return [i.completion_id for i in items]


def project(tmp_path, texts):
    path = tmp_path / "p.gridtune"
    with create_project(path, demo_spec()) as store:
        ids = fill(store, texts)
    return path, ids


def sent_texts(fake):
    return [r.prompt for r in fake.chat_requests()]


def test_parse_grade():
    assert j.parse_grade("4") == 4
    assert j.parse_grade("Grade: 4/5") == 4
    assert j.parse_grade("**5**") == 5
    assert j.parse_grade("I would give it a 3.") == 3
    assert j.parse_grade("In 2024, grade 2") == 2  # a year is not a grade
    for reply in ("10 out of 10", "3.5", "0", "none", "", None):
        assert j.parse_grade(reply) is None


def test_kappa_and_spearman_by_hand():
    # Hand-computed (see the module notes): person 1,2,3 vs judge 1,3,3.
    # observed disagreement: one pair off by 1 -> weight 1/16; expected from the margins
    # (person 1,1,1 over grades 1..3; judge 1,0,2): sum W*E = 15/48; kappa = 1 - (3/48)/(15/48) = 0.8
    assert j.quadratic_weighted_kappa([1, 2, 3], [1, 3, 3]) == pytest.approx(0.8)
    # ranks 1,2,3 vs 1,2.5,2.5: rho = 1.5 / sqrt(2 * 1.5)
    assert j.spearman([1, 2, 3], [1, 3, 3]) == pytest.approx(1.5 / (2 * 1.5) ** 0.5)
    assert j.quadratic_weighted_kappa([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    assert j.spearman([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    assert j.quadratic_weighted_kappa([1, 5], [5, 1]) == pytest.approx(-1.0)
    assert j.quadratic_weighted_kappa([3, 3], [3, 3]) is None  # undefined: no variation at all
    assert j.spearman([3, 3, 3], [1, 2, 3]) is None
    assert j.quadratic_weighted_kappa([], []) is None and j.spearman([1], [1]) is None


def test_judge_grades_never_replace_a_persons(tmp_path, fake_openai):
    path, ids = project(tmp_path, ["TEXT-A about Tokyo", "TEXT-B about Lagos", "TEXT-C about Oslo",
                                   "TEXT-D rejected", "TEXT-E by length"])
    with Store.open(path) as store:
        store.set_grade(ids[0], 1, "person")
        store.set_grade(ids[3], 0, "person")
        store.set_grade(ids[4], 2, "by-length")
    fake_openai.set(replies=[("TEXT-A", "Grade: 5"), ("TEXT-B", "2"), ("TEXT-C", "I cannot grade this."),
                             ("TEXT-E", "4")])
    result = j.judge(path, j.JudgeOptions(model=MODEL, concurrency=2))
    assert (result.judged, result.failed, result.candidates) == (3, 1, 4)
    assert result.exit_code == 1 and result.failures[0][0] == ids[2]
    assert not any("TEXT-D" in p for p in sent_texts(fake_openai))  # rejected: not judged
    body = fake_openai.chat_requests()[0].body
    assert body["model"] == MODEL and body["temperature"] == 0
    assert j.DEFAULT_RUBRIC.splitlines()[0] in body["messages"][0]["content"]
    with Store.open(path) as store:
        a = store.get_completion(ids[0])
        assert (a.grade, a.grade_source) == (1, "person")  # the person's grade stays current
        assert [(g.grade, g.source) for g in store.grade_history(ids[0])] == [(1, "person"), (5, "judge:" + MODEL)]
        b = store.get_completion(ids[1])
        assert (b.grade, b.grade_source) == (2, "judge:" + MODEL)
        e = store.get_completion(ids[4])
        assert (e.grade, e.grade_source) == (4, "judge:" + MODEL)  # newest automatic grade
        assert store.get_completion(ids[2]).grade is None  # a failure writes no grade
        # A person's grade after the judge's wins too.
        store.set_grade(ids[1], 3, "person")
        assert store.get_completion(ids[1]).grade == 3
        failed = store._query("SELECT error, reply FROM judgements WHERE completion_id = ?", (ids[2],))
        assert "no grade 1-5" in failed[0][0] and failed[0][1] == "I cannot grade this."
        assert cur.judgement_counts(store, MODEL) == {"judged": 3, "failures": 1}
    # Resumable: only the failed one is sent again.
    fake_openai.requests.clear()
    fake_openai.set(replies=[("TEXT-C", "3")])
    again = j.judge(path, j.JudgeOptions(model=MODEL))
    assert (again.judged, again.failed, again.already) == (1, 0, 3)
    assert len(sent_texts(fake_openai)) == 1 and "TEXT-C" in sent_texts(fake_openai)[0]
    fake_openai.requests.clear()
    assert j.judge(path, j.JudgeOptions(model=MODEL)).candidates == 0
    assert sent_texts(fake_openai) == []


def test_a_permanent_error_stops_the_pass(tmp_path, fake_openai):
    path, ids = project(tmp_path, ["TEXT-A", "TEXT-B", "TEXT-C"])
    fake_openai.set(faults=[Fault(kind="status", status=404, message="model fake-judge does not exist")])
    result = j.judge(path, j.JudgeOptions(model=MODEL, concurrency=1))
    assert result.stopped and "404" in result.stopped and result.failed == 1 and result.judged == 0
    assert len(fake_openai.chat_requests()) == 1


def test_transient_errors_are_retried(tmp_path, fake_openai):
    path, ids = project(tmp_path, ["TEXT-A"])
    fake_openai.set(faults=[Fault(kind="status", status=500, count=2)], replies=[("TEXT-A", "4")])
    result = j.judge(path, j.JudgeOptions(model=MODEL, backoff_initial_s=0.01, backoff_max_s=0.02))
    assert result.judged == 1 and result.grades["4"] == 1
    assert len(fake_openai.chat_requests()) == 3


def test_calibration_on_planted_cases(tmp_path, fake_openai):
    texts = [f"TEXT-{k} words" for k in "ABCDE"]
    path, ids = project(tmp_path, texts)
    with Store.open(path) as store:
        for cid, grade in zip(ids, [1, 2, 3, 4, 5]):
            store.set_grade(cid, grade, "person")
        assert j.latest_calibration(store) is None
    # The judge agrees exactly: kappa 1, Spearman 1, n 5.
    fake_openai.set(replies=[(f"TEXT-{k}", str(g)) for k, g in zip("ABCDE", [1, 2, 3, 4, 5])])
    j.judge(path, j.JudgeOptions(model=MODEL, only_person_graded=True))
    with Store.open(path) as store:
        cal = j.calibrate(store, MODEL)
        assert (cal.n, cal.spearman, cal.kappa, cal.exact) == (5, pytest.approx(1.0), pytest.approx(1.0), 1.0)
        assert "n=5" in cal.summary() and "kappa 1.00" in cal.summary()
        # The hand-computed case: person 1, 2, 3 vs judge 1, 3, 3 on three of them.
        store.set_grade(ids[3], 0, "person")  # rejections are no 1-5 grade: left out
        store.set_grade(ids[4], 0, "person")
        store.set_grade(ids[1], 2, "person")
        cur.record_judgement(store, ids[1], MODEL, grade=3, reply="3", error=None, source="judge:" + MODEL)
        cal = j.calibrate(store, MODEL)  # the judge's newest grade counts
        assert cal.n == 3 and cal.kappa == pytest.approx(0.8)
        assert cal.spearman == pytest.approx(1.5 / 3 ** 0.5) and cal.exact == pytest.approx(2 / 3)
        latest = j.latest_calibration(store, MODEL)
        assert (latest.n, latest.kappa) == (3, pytest.approx(0.8))
        assert j.latest_calibration(store, "another-judge") is None


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gridtune", *args], capture_output=True, text=True)


def test_cli_judge_rubric_and_calibrate(tmp_path, fake_openai):
    path, ids = project(tmp_path, ["TEXT-A one", "TEXT-B two", "TEXT-C three"])
    with Store.open(path) as store:
        store.set_grade(ids[0], 2, "person")
        store.set_grade(ids[1], 4, "person")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad = run_cli("judge", str(path), "--model", MODEL, "--rubric", str(empty))
    assert bad.returncode == 2 and "rubric is empty" in bad.stderr and bad.stdout == ""
    missing = run_cli("judge", str(path), "--model", MODEL, "--rubric", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    with sqlite3.connect(path) as raw:  # nothing written by the refused commands
        assert raw.execute("SELECT count(*) FROM settings").fetchone()[0] == 0
        assert raw.execute("SELECT count(*) FROM judgements").fetchone()[0] == 0
    assert fake_openai.chat_requests() == []
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("5: names the place and the year. 1: does not.")
    fake_openai.set(replies=[("TEXT-A", "2"), ("TEXT-B", "4"), ("TEXT-C", "5")])
    out = run_cli("judge", str(path), "--model", MODEL, "--rubric", str(rubric), "--calibrate", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["judged"] == 2 and data["source"] == "judge:" + MODEL  # calibration: only the person-graded
    assert data["calibration"] == {"model": MODEL, "n": 2, "spearman": 1.0, "kappa": 1.0, "exact_agreement": 1.0}
    assert "names the place and the year" in fake_openai.chat_requests()[0].body["messages"][0]["content"]
    with Store.open(path) as store:
        assert j.get_rubric(store).startswith("5: names the place")
    # A later pass without --rubric uses the kept rubric, and judges the rest.
    fake_openai.requests.clear()
    text = run_cli("judge", str(path), "--model", MODEL)
    assert text.returncode == 0, text.stderr
    assert "graded 1 of 1" in text.stdout
    assert "names the place" in fake_openai.chat_requests()[0].body["messages"][0]["content"]
    with Store.open(path) as store:
        assert store.get_completion(ids[2]).grade == 5
        assert store.get_completion(ids[0]).grade_source == "person"
    # A reply without a grade: exit 1, recorded.
    with Store.open(path) as store:
        more = fill(store, ["TEXT-F"])
    fake_openai.set(replies=[("TEXT-F", "hmm")])
    failed = run_cli("judge", str(path), "--model", MODEL)
    assert failed.returncode == 1 and "1 judge call(s) failed" in failed.stderr
    with Store.open(path) as store:
        assert store.get_completion(more[0]).grade is None
