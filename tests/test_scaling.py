"""Data scaling: `gridtune finetune PROJECT --scaling` trains on a deterministic,
stratified half and on all of the latest export, evaluates both against the base on
the held-out prompts, and stores one comparison; a rerun (also after a kill) follows the
jobs it recorded instead of creating new ones.

The split is unit-tested; the run uses the real local server and the tiny test model.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.evaluation import scaling as sc
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store, scaling as scs
from tests.server_support import (
    local,  # noqa: F401 - fixture
)
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

PLACES = ["Oslo", "Lima", "Rome", "Kyiv"]
YEARS = [2030, 2040, 2050]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _examples(places=PLACES, years=YEARS, samples=1):
    return [(json.dumps({"p": p, "y": y, "k": k}), {"place": p, "year": y})
            for p in places for y in years for k in range(samples)]


# -- the half -----------------------------------------------------------------------------------
def test_the_half_is_deterministic_and_independent_of_file_order():
    examples = _examples(samples=3)
    first = sc.half_split(examples)
    assert first == sc.half_split(examples)
    assert len(first) == len(examples) // 2
    shuffled = examples[:]
    random.Random(7).shuffle(shuffled)
    assert {shuffled[i][0] for i in sc.half_split(shuffled)} == {examples[i][0] for i in first}
    assert sc.half_split(examples, seed=1) != first  # the seed picks another half


@pytest.mark.parametrize("seed", range(6))
def test_the_half_is_stratified_every_value_keeps_about_half_of_its_examples(seed):
    examples = _examples(samples=2)  # 24: 6 per place, 8 per year
    chosen = sc.half_split(examples, seed)
    for name, per_value in (("place", 6), ("year", 8)):
        counts = Counter(examples[i][1][name] for i in chosen)
        assert set(counts) == {v for _, values in examples for v in [values[name]]}
        assert all(abs(n - per_value / 2) <= 1 for n in counts.values()), (name, counts)


def test_a_value_with_one_example_still_reaches_the_half():
    examples = _examples(places=["Oslo", "Lima"], years=[2030, 2040, 2050], samples=2)
    examples.append(('{"rare": 1}', {"place": "Nuuk", "year": 2030}))
    for seed in range(8):
        chosen = sc.half_split(examples, seed)
        assert any(examples[i][1]["place"] == "Nuuk" for i in chosen), seed


def test_examples_without_values_are_still_split():
    examples = [(f"line {i}", {}) for i in range(9)]
    assert len(sc.half_split(examples)) == 4
    assert sc.half_split(examples[:1]) == []


# -- the comparison --------------------------------------------------------------------------------
def _scores(stop: float, width: float = 0.05, length: float = 100.0) -> dict:
    est = lambda v: {"value": v, "low": v - width, "high": v + width, "n": 30}  # noqa: E731
    return {"stop_rate": est(stop), "length_mean": est(length), "length_cv": 0.3,
            "length_cv_interval": {"value": 0.3, "low": 0.25, "high": 0.35, "n": 30}, "format_match": est(0.5),
            "repetition": est(0.5 - stop / 2), "faithfulness": est(0.5)}


def test_the_gain_per_doubling_is_checked_against_the_direction_the_recipe_expects():
    reference = {"length_mean": 90.0, "length_cv": 0.3}
    rows = {r["metric"]: r for r in sc.compare_points(_scores(0.4, length=150), _scores(0.8, length=120), reference,
                                                      5, 10)}
    assert rows["stop_rate"]["gain_per_doubling"] == pytest.approx(0.4)
    assert rows["stop_rate"]["expected"] == "yes" and rows["stop_rate"]["next_doubling"] == 1.0  # clamped
    assert rows["repetition"]["expected"] == "yes"  # lower is better: it fell
    assert rows["length_mean"]["expected"] == "yes"  # nearer the data's 90
    assert rows["format_match"]["expected"] == "flat"
    worse = {r["metric"]: r for r in sc.compare_points(_scores(0.5), _scores(0.45), reference, 5, 10)}
    assert worse["stop_rate"]["expected"] == "no (noise)"  # the intervals overlap
    uneven = {r["metric"]: r for r in sc.compare_points(_scores(0.4), _scores(0.8), reference, 4, 9)}
    assert uneven["stop_rate"]["gain_per_doubling"] == pytest.approx(0.4 / sc.math.log2(9 / 4))


def test_two_sizes_give_a_slope_and_a_third_tests_linearity():
    two = sc.linearity([{"n": 5, "scores": _scores(0.4)}, {"n": 10, "scores": _scores(0.6)}])
    assert not two["tested"] and "two points give a slope, not a test of linearity" in two["verdict"]
    line = sc.linearity([{"n": n, "scores": _scores(v)} for n, v in ((5, 0.4), (10, 0.6), (20, 0.8))])
    assert line["tested"] and line["per_metric"]["stop_rate"] == "linear within noise"
    bent = sc.linearity([{"n": n, "scores": _scores(v, width=0.01)} for n, v in ((5, 0.2), (10, 0.8), (20, 0.8))])
    assert bent["per_metric"]["stop_rate"] == "not linear" and "not linear on" in bent["verdict"]


# -- refusals -----------------------------------------------------------------------------------
def _project(path: Path, temperature: float = 0.0) -> Path:
    spec = GridSpec(name="scaling", generation="Say something about {place} in {year}.",
                    training="Place: {place}. Year: {year}.", variables={"place": PLACES, "year": YEARS},
                    settings=GenerationSettings(temperature=temperature, max_tokens=50, samples=1))
    with create_project(path, spec) as store:
        for item in store.pending_work():
            store.save_done(item.completion_id, text="Fine.", model="teacher", params={}, prompt_tokens=5,
                            completion_tokens=2, latency_s=0.1, finish_reason="stop", attempts=1)
    return path


def test_no_export_with_a_hold_out_is_refused_with_the_command_to_run(tmp_path):
    project = _project(tmp_path / "p.gridtune")
    r = run("finetune", str(project), "--scaling")
    assert r.exit_code == 2
    assert "no export yet" in r.stderr and "gridtune export" in r.stderr and "--hold-out" in r.stderr
    out = tmp_path / "p.jsonl"
    assert run("export", str(project), "-o", str(out)).exit_code == 0
    r = run("finetune", str(project), "--scaling")
    assert r.exit_code == 2 and "held nothing out" in r.stderr and "--hold-out" in r.stderr
    assert not sc.half_path_for(out).exists()
    with Store.open(project) as store:
        assert scs.latest(store) is None and store.jobs() == []
    r = run("finetune", str(out), "--scaling")
    assert r.exit_code == 2 and "works on a project" in r.stderr
    r = run("finetune", str(project), "--samples", "2")
    assert r.exit_code == 2 and "--samples goes with --scaling" in r.stderr


# -- on the real local server ---------------------------------------------------------------------


def _answers(project: Path) -> int:
    with Store.open(project) as store:
        return store._one("SELECT COUNT(*) FROM eval_answers")[0]


@pytest.mark.local
def test_scaling_trains_half_and_all_compares_once_and_a_rerun_creates_no_job(local, tmp_path):
    project = _project(tmp_path / "p.gridtune")
    out = tmp_path / "p.jsonl"
    r = run("export", str(project), "-o", str(out), "--hold-out", "place=Kyiv", "--json")
    assert json.loads(r.stdout)["train"] == 9, r.output

    # Killed while training: both jobs were created and recorded before either was followed.
    options = sc.ScalingOptions(epochs=2, samples=1)
    with pytest.raises(sc.ScalingStopped):
        sc.run_scaling(project, options, should_stop=lambda: True)
    with Store.open(project) as store:
        run_ = scs.latest(store)
        assert run_ is not None and run_.state == "training" and run_.half_job and run_.all_job
        assert {j.id for j in store.jobs()} == {run_.half_job, run_.all_job}
    half = sc.half_path_for(out)
    assert len(half.read_text().splitlines()) == 4

    r = run("finetune", str(project), "--scaling", "--epochs", "2", "--samples", "1")
    assert r.exit_code == 0, r.output
    assert run_.half_job in r.stdout and run_.all_job in r.stdout  # the two job ids, then the table
    assert "gain/doubling" in r.stdout and "half (4)" in r.stdout and "all (9)" in r.stdout
    assert "two points give a slope, not a test of linearity" in r.stdout
    asked = _answers(project)
    assert asked == 3 * 3  # 3 held-out prompts × 1 sample × (half, all, the base once)

    r = run("finetune", str(project), "--scaling", "--epochs", "2", "--samples", "1", "--json")  # a rerun
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert {arm: job["id"] for arm, job in result["jobs"].items()} == {"half": run_.half_job, "all": run_.all_job}
    assert not any(job["created"] for job in result["jobs"].values())
    assert result["n_half"] == 4 and result["n_all"] == 9 and result["cases"] == 3
    assert [row["metric"] for row in result["rows"]] == [m for m, _, _ in sc.METRICS]
    assert all(row["expected"] in ("yes", "yes (noise)", "no (noise)", "NO", "flat", "—") for row in result["rows"])
    stop = next(row for row in result["rows"] if row["metric"] == "stop_rate")
    assert stop["gain_per_doubling"] == pytest.approx((stop["all"] - stop["half"]) / sc.math.log2(9 / 4))
    assert _answers(project) == asked  # stored answers: the rerun asked nothing
    with Store.open(project) as store:
        assert len(store.jobs()) == 2
        rows = store._query("SELECT state FROM scaling_runs")
        assert [r["state"] for r in rows] == ["finished"]
        assert scs.latest(store).result["rows"] == result["rows"]
    # And from the TUI (its own event loop: the CLI above runs asyncio.run itself).
    asyncio.run(_tui_shows_and_reruns(project, {run_.half_job, run_.all_job}, asked))


async def _tui_shows_and_reruns(project: Path, jobs: set[str], answers: int) -> None:
    from rich.console import Console
    from textual.widgets import Input, Static

    from gridtune.tui.app import GridtuneApp
    from tests.tui_helpers import settle, wait_until

    app = GridtuneApp(project, start_mode="eval")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        def table() -> str:
            console = Console(width=78, record=True, file=io.StringIO())
            console.print(screen.query_one("#eval-table", Static).content)
            return console.export_text()

        assert "gain/doubling" not in table()  # the eval table first
        await pilot.press("v")
        await settle(pilot)
        assert "gain/doubling" in table() and "half (4)" in table() and "slope" in table()
        screen.query_one("#eval-samples", Input).value = "1"
        await pilot.press("S")  # the CLI's run, continued: its jobs followed, its answers reused
        await wait_until(pilot, lambda: screen.running is None and screen.state.scaling is not None
                         and screen.state.scaling.state == "finished", timeout=60, what="the scaling run")
        await settle(pilot)
        assert "gain/doubling" in table()
    with Store.open(project) as store:
        assert {j.id for j in store.jobs()} == jobs
    assert _answers(project) == answers
