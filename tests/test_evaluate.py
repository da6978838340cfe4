"""`gridtune eval` against the loopback fake server: a tuned model that stops beats a
base that runs on, a model against itself differs by noise only, an interrupted
evaluation resumes without asking again what it has, and the exit code gates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gridtune.pipeline.client.request_pool import PoolOptions
from gridtune.pipeline.evaluation import evaluate as ev
from gridtune.pipeline.training.export import export_project
from gridtune.pipeline.training.holdout import HoldOutError
from gridtune.store import Store, evaluation as evs
from tests.bigproject import small_project
from tests.fakeserver import Fault

TUNED = "Short and finished. It ends here."
BASE = " ".join(["and the city went on and on"] * 80)  # runs to max tokens, loops


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = small_project(tmp_path / "p.gridtune", done=16)
    with Store.open(path) as store:
        export_project(store, tmp_path / "train.jsonl", format="chat")
        spec_cases = ["place=Bergen year=2045", "place=Nairobi year=2031", "place=Quito year=2060"]
        from gridtune.pipeline.spec.project import load_project_spec
        assert ev.add_person_cases(store, load_project_spec(store), spec_cases) == 3
    return path


def options(model="tuned", against="base", samples=2):
    return ev.EvalOptions(model=model, against=against, samples=samples, pool=PoolOptions(concurrency=4))


def test_a_tuned_model_that_stops_beats_a_base_that_runs_on(project, fake_openai):
    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)])
    report = ev.evaluate(project, options())
    assert report.asked == 2 * 3 * 2 and report.failed == {"tuned": 0, "base": 0}
    assert report.tuned.stop_rate.value == 1.0 and report.base.stop_rate.value == 0.0
    assert report.base.repetition.value == 1.0 and report.tuned.repetition.value == 0.0
    better = {r.metric: r.better for r in report.rows}
    assert better["stop_rate"] == "tuned" and better["repetition"] == "tuned"
    assert report.exit_code == 0 and "not worse" in report.summary()
    # The export's stop reached the request (chat: none; the end of turn is the stop).
    sent = [json.loads(r.body) if isinstance(r.body, str) else r.body for r in fake_openai.chat_requests()]
    assert {b["model"] for b in sent} == {"tuned", "base"}


def test_a_finished_evaluation_is_not_paid_for_twice(project, fake_openai):
    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)])
    ev.evaluate(project, options(samples=1))
    first = len(fake_openai.chat_requests())
    again = ev.evaluate(project, options(samples=1))
    assert again.asked == 0 and len(fake_openai.chat_requests()) == first
    more = ev.evaluate(project, options(samples=2))  # one more sample each: only those are asked
    assert more.asked == 3 * 2 and len(fake_openai.chat_requests()) == first + 6


def test_an_interrupted_evaluation_resumes_where_it_stopped(project, fake_openai):
    # A permanent error (404: the model is unknown) on one prompt stops the pass.
    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)],
                    faults=[Fault(kind="status", status=404, match="Quito", count=1)])
    first = ev.evaluate(project, ev.EvalOptions(model="tuned", against="base", samples=2,
                                                pool=PoolOptions(concurrency=1)))
    assert first.stopped and first.exit_code == 1
    asked_before = len(fake_openai.chat_requests())
    fake_openai.set(faults=[])
    second = ev.evaluate(project, options())
    with Store.open(project) as store:
        stored = sum(len(evs.answers(store, m, second.setup.digest)) for m in ("tuned", "base"))
    assert stored == 12 and second.failed == {"tuned": 0, "base": 0} and second.exit_code == 0
    # Only what was not stored is asked again: the answers before the stop are kept.
    assert len(fake_openai.chat_requests()) - asked_before == second.asked < 12


def test_a_model_against_itself_differs_by_noise_only(project, fake_openai):
    fake_openai.set(replies=[("model:tuned", TUNED)])
    report = ev.evaluate(project, options(against="tuned"))
    assert report.asked == 2 * 3 * 2  # both sides answer, independently
    assert all(r.better is None for r in report.rows) and report.exit_code == 0


def test_a_worse_tuned_model_fails_the_gate(project, fake_openai, tmp_path):
    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)])
    proc = subprocess.run([sys.executable, "-m", "gridtune", "eval", str(project), "--model", "base",
                           "--against", "tuned", "--samples", "2", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tuned_is_worse"] is True and out["base"]["stop_rate"]["value"] == 1.0


def test_bad_input_is_one_line_and_nothing_asked(project, fake_openai, tmp_path):
    with Store.open(project) as store:
        from gridtune.pipeline.spec.project import load_project_spec
        spec = load_project_spec(store)
        with pytest.raises(HoldOutError, match="no value for year"):
            ev.add_person_cases(store, spec, ["place=Bergen"])
        with pytest.raises(HoldOutError, match="no variable 'town'"):
            ev.add_person_cases(store, spec, ["town=Bergen year=2040"])
    with pytest.raises(ev.EvalError, match="--against"):
        ev.evaluate(project, ev.EvalOptions(model="never-tuned-here"))
    proc = subprocess.run([sys.executable, "-m", "gridtune", "eval", str(project), "--model", "x", "--samples", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--samples" in proc.stderr.strip().splitlines()[-1]
    assert fake_openai.chat_requests() == []
