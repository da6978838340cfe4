"""Coverage per value and pair, against a hand count on a 2x3x2 grid, and the
top-up that fills exactly the thin cells (issue 9). Real project files; the
top-up runs through the loopback fake server."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.curation.coverage import coverage, plan_top_up
from gridtune.pipeline.generation.generate import GenerateOptions, run_generation
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store

FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, progress_interval_s=0.1)
VARS = {"x": ["a1", "a2"], "y": [1, 2, 3], "z": ["u", "v"]}


def make_project(tmp_path: Path) -> Path:
    spec = GridSpec(name="cov", system=None, generation="Write about {x}, {y} and {z}.", variables=dict(VARS),
                    settings=GenerationSettings(model="gpt-4o-mini", temperature=0.7, max_tokens=500, seed=1))
    path = tmp_path / "c.gridtune"
    create_project(path, spec).close()
    return path


def fill(path: Path, plan: dict[tuple, str]) -> None:
    """Finish every cell's completion: plan maps (x, y, z) to 'keep', 'cut', 'reject', 'low', 'blank' or 'none'."""
    with Store.open(path) as store:
        for item in store.pending_work():
            what = plan.get((item.values["x"], item.values["y"], item.values["z"]), "keep")
            if what == "none":
                continue
            store.save_done(item.completion_id, text="" if what == "blank" else "A full answer.", model="m",
                            params={"max_tokens": 500}, prompt_tokens=1, completion_tokens=3, latency_s=0.0,
                            finish_reason="length" if what == "cut" else "stop", attempts=1)
            if what == "reject":
                store.set_grade(item.completion_id, 0, "person")
            elif what == "low":
                store.set_grade(item.completion_id, 2, "person")
            elif what == "keep":
                store.set_grade(item.completion_id, 4, "person")


PLAN = {("a1", 1, "u"): "cut", ("a1", 1, "v"): "reject", ("a2", 3, "v"): "low", ("a2", 2, "u"): "blank",
        ("a1", 3, "v"): "none"}


def hand_count(kept_cells: set[tuple]) -> tuple[Counter, Counter]:
    names = list(VARS)
    values, pairs = Counter(), Counter()
    for cell in kept_cells:
        for i, n in enumerate(names):
            values[(n, cell[i])] += 1
        for i, j in itertools.combinations(range(3), 2):
            pairs[(names[i], names[j], cell[i], cell[j])] += 1
    return values, pairs


def test_counts_match_a_hand_count(tmp_path):
    path = make_project(tmp_path)
    fill(path, PLAN)
    every = set(itertools.product(*VARS.values()))
    with Store.open(path) as store:
        # graded 2 is kept without a minimum grade, not with --min-grade 3
        for min_grade, not_kept, n in ((None, {k for k, v in PLAN.items() if v != "low"}, 8), (3, set(PLAN), 7)):
            table = coverage(store, min_grade=min_grade, threshold=2)
            values, pairs = hand_count(every - not_kept)
            assert table.kept == len(every - not_kept) == n and table.cells == 12
            assert {(r.variables[0], r.values[0]): r.kept for r in table.values} == {
                (n, v): values[(n, v)] for n, vs in VARS.items() for v in vs}
            got_pairs = {(*r.variables, *r.values): r.kept for r in table.pairs}
            assert len(got_pairs) == 2 * 3 + 2 * 2 + 3 * 2
            assert got_pairs == {k: pairs[k] for k in got_pairs}
        # by hand, the flagged ones: x=a1,y=1 has no kept example; x=a1,y=3 and others one each
        table = coverage(store, threshold=2)
        state = {r.label: r.state(2) for r in table.values + table.pairs}
        assert state["x=a1, y=1"] == "empty" and state["y=1, z=v"] == "thin" and state["x=a1"] == "ok"
        assert {r.label for r in table.empty()} == {"x=a1, y=1"}
        assert {r.label for r in table.thin() if r.kept} == {
            "x=a1, y=3", "x=a2, y=2", "x=a1, z=v", "y=1, z=u", "y=1, z=v", "y=2, z=u", "y=3, z=v"}
        # an ungraded kept example counts without --min-grade, not with one
        cid = next(r.id for r in store.completions() if r.values == {"x": "a2", "y": 3, "z": "u"})
        store.undo_grade(cid)
        assert coverage(store).kept == 8 and coverage(store, min_grade=3).kept == 6


def test_cli_coverage(tmp_path):
    path = make_project(tmp_path)
    fill(path, PLAN)
    runner = CliRunner()
    res = runner.invoke(main, ["coverage", str(path), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["kept"] == 8 and d["empty"] == 1 and d["thin"] == 7 and d["threshold"] == 2
    assert {"variables": ["x", "y"], "values": ["a1", 1], "kept": 0, "cells": 2, "state": "empty"} in d["pairs"]
    text = runner.invoke(main, ["coverage", str(path)])
    assert text.exit_code == 0 and "x x y:" in text.output and "1 empty, 7 thin" in text.output
    assert max(len(line) for line in text.output.splitlines()) <= 80
    bad = runner.invoke(main, ["coverage", str(path), "--min-grade", "9"])
    assert bad.exit_code == 2 and "--min-grade" in bad.stderr


def test_top_up_plan_is_exactly_the_thin_cells_and_deterministic(tmp_path):
    path = make_project(tmp_path)
    fill(path, {("a1", 1, "u"): "reject", ("a1", 1, "v"): "cut"})
    with Store.open(path) as store:
        plan = plan_top_up(store, 1)
        # Only x=a1,y=1 is empty; one new sample in one of its two cells (the first in grid order) fills it.
        assert plan.total == 1 and [v for v in plan.cell_values.values()] == [{"x": "a1", "y": 1, "z": "u"}]
        plan2 = plan_top_up(store, 2)
        # To 2: x=a1,y=1 needs 2, y=1,z=u and y=1,z=v need 1 each: one sample in each of the two cells.
        assert sorted((v["z"], plan2.samples[c]) for c, v in plan2.cell_values.items()) == [("u", 1), ("v", 1)]
        assert plan_top_up(store, 2).samples == plan2.samples  # deterministic


def test_top_up_fills_the_thin_cells_and_then_none_is_thin(tmp_path, fake_openai):
    path = make_project(tmp_path)
    fill(path, {("a1", 1, "u"): "reject", ("a1", 1, "v"): "cut", ("a2", 2, "v"): "reject"})
    with Store.open(path) as store:
        thin_before = {r.label for r in coverage(store, threshold=2).thin()}
        assert "x=a1, y=1" in thin_before and "x=a2, y=2" in thin_before
        plan = plan_top_up(store, 2)
        counts_before = store.status_counts().completions
    res = CliRunner().invoke(main, ["generate", str(path), "--top-up", "2"])
    assert res.exit_code == 0, res.output
    assert plan.summary() in res.stderr
    sent = fake_openai.chat_requests()
    assert len(sent) == plan.total
    # exactly the planned cells were asked for, each with a new seed
    asked = Counter(r.body["messages"][-1]["content"] for r in sent)
    assert asked == Counter(f"Write about {v['x']}, {v['y']} and {v['z']}." for c, v in plan.cell_values.items()
                            for _ in range(plan.samples[c]))
    assert all(r.body["seed"] >= 2 for r in sent)  # samples 1+: seed 1 + sample
    with Store.open(path) as store:
        assert store.status_counts().completions == counts_before + plan.total
        after = coverage(store, threshold=2)
        assert after.thin() == []
    # Again: nothing is missing, nothing is added or sent.
    fake_openai.requests.clear()
    again = CliRunner().invoke(main, ["generate", str(path), "--top-up", "2"])
    assert again.exit_code == 0 and fake_openai.chat_requests() == []


def test_interrupted_top_up_resumes_without_adding_more(tmp_path, fake_openai):
    path = make_project(tmp_path)
    fill(path, {("a1", 1, "u"): "reject", ("a1", 1, "v"): "reject"})
    with Store.open(path) as store:
        planned = plan_top_up(store, 2).total
    first = asyncio.run(run_generation(path, GenerateOptions(top_up=2, limit=1, **FAST)))
    assert first.progress.done == 1
    with Store.open(path) as store:
        assert store.status_counts().pending == planned - 1
        assert plan_top_up(store, 2).total == 0  # the pending samples count as planned
    asyncio.run(run_generation(path, GenerateOptions(top_up=2, **FAST)))
    with Store.open(path) as store:
        assert store.status_counts().pending == 0 and coverage(store, threshold=2).thin() == []
