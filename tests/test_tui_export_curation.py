"""Closing the loop (issues 9 and 11): the export screen's cut-off, hold-out, cost and
diversity; the playground's answers promoted into the data or watched in the eval set.

Everything on real project files; the playground streams from the loopback fake
server; `gridtune eval` and `gridtune add` run through the real command line.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gridtune.pipeline.evaluation.promote import PromoteError, parse_values, promote_answer, watch_answer
from gridtune.pipeline.spec.grid import cell_key
from gridtune.pipeline.spec.project import apply_spec, create_project
from gridtune.pipeline.training.export import export_project
from gridtune.store import Store, evaluation
from gridtune.tui.screens.export import ExportOptions, ExportScreen, split_hold_out
from gridtune.tui.screens.playground import PlaygroundScreen
from tests.test_tui_export import fill, wait_for
from tests.test_tui_generate import HostApp, small_spec
from tests.test_tui_playground import fake, streaming_server  # noqa: F401 - fixtures
from tests.tui_helpers import settle


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    fill(path)
    return path


def trained_texts(path):
    return [json.loads(line)["messages"][-1]["content"] for line in path.read_text().splitlines()]


def trained_prompts(path):
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()]


# -- promotion in the pipeline -------------------------------------------------------------

def test_promoted_answer_is_one_completion_with_its_values_model_and_grade(project, tmp_path):
    spec = small_spec()
    with Store.open(project) as store:
        before = store.status_counts()
        done = promote_answer(store, spec, parse_values(spec, "place=Bergen year=2045"), " Bergen is calm. ",
                              model="ft:tiny:1", grade=4, finish_reason="stop")
        assert done.where == "new"
        mine = [c for c in store.completions() if c.values == {"place": "Bergen", "year": 2045}]
        assert len(mine) == 1
        c = mine[0]
        assert (c.id, c.text, c.model, c.grade, c.grade_source, c.status) == (
            done.completion_id, "Bergen is calm.", "ft:tiny:1", 4, "person", "done")
        assert c.params["added_by"] == "person" and c.params["source"] == "playground"
        after = store.status_counts()
        assert (after.cells, after.done, after.pending) == (before.cells + 1, before.done + 1, before.pending)

        # A grid edit (another place, samples 2) neither hides it nor gives it teacher work.
        edited = small_spec(samples=2)
        edited.variables["place"] = ["Lima", "Tokyo"]
        apply_spec(store, edited)
        mine = [c for c in store.completions() if c.values["place"] == "Bergen"]
        assert [(c.id, c.status) for c in mine] == [(done.completion_id, "done")]
        assert not [w for w in store.pending_work() if w.values["place"] == "Bergen"]

        result = export_project(store, tmp_path / "after-edit.jsonl")
    assert "Bergen is calm." in trained_texts(result.path)
    assert "Place: Bergen. Year: 2045." in trained_prompts(result.path)
    assert not any("Oslo" in p for p in trained_prompts(result.path))  # the edit did drop Oslo


def test_promotion_onto_a_grid_cell_is_one_more_sample_and_survives_its_cell_leaving(project, tmp_path):
    spec = small_spec()
    with Store.open(project) as store:
        done = promote_answer(store, spec, {"place": "Oslo", "year": "2030"}, "Oslo, kept.", model="m")
        assert done.where == "grid" and done.values == {"place": "Oslo", "year": 2030}  # the grid's typed value
        cell = [c for c in store.completions() if c.values == {"place": "Oslo", "year": 2030}]
        assert sorted(c.sample for c in cell) == [0, 1] and done.grade == 5  # default grade
        edited = small_spec()
        edited.variables["place"] = ["Lima", "Tokyo"]
        apply_spec(store, edited)
        assert done.completion_id in {c.id for c in store.completions()}  # kept, as a person cell
        assert "Oslo, kept." in trained_texts(export_project(store, tmp_path / "o.jsonl").path)


def test_bad_promotions_write_nothing(project):
    spec = small_spec()
    with Store.open(project) as store:
        before = store.status_counts()
        with pytest.raises(PromoteError, match="no value for year"):
            parse_values(spec, "place=Bergen")
        with pytest.raises(PromoteError, match="empty"):
            promote_answer(store, spec, {"place": "Bergen", "year": 2045}, "  ", model="m")
        with pytest.raises(PromoteError, match="grade must be within 1..5"):
            promote_answer(store, spec, {"place": "Bergen", "year": 2045}, "text", model="m", grade=7)
        assert store.status_counts() == before


def test_cli_add_and_eval_case(project, tmp_path):
    from gridtune.cli.main import main

    text = tmp_path / "answer.txt"
    text.write_text("Bergen in 2045, from the command line.\n")
    runner = CliRunner()
    res = runner.invoke(main, ["add", str(project), "--values", "place=Bergen year=2045", "--text-file", str(text),
                               "--model", "ft:tiny:1", "--grade", "4"])
    assert res.exit_code == 0, res.output
    assert "graded 4" in res.output
    res = runner.invoke(main, ["add", str(project), "--values", "place=Bergen", "--text-file", str(text),
                               "--model", "m"])
    assert res.exit_code == 2 and "no value for year" in res.output
    assert len(res.output.strip().splitlines()) == 1
    with Store.open(project) as store:
        assert [c.model for c in store.completions() if c.values["place"] == "Bergen"] == ["ft:tiny:1"]
        assert watch_answer(store, small_spec(), {"place": "Bergen", "year": 2046}, "ft:tiny:1: repeats itself")
        assert not watch_answer(store, small_spec(), {"place": "Bergen", "year": 2046}, "again")
        cases = evaluation.cases(store)
    assert [(c.values, c.source, c.note) for c in cases] == [
        ({"place": "Bergen", "year": 2046}, "person", "ft:tiny:1: repeats itself")]


def test_a_watched_case_is_asked_by_gridtune_eval(project, tmp_path, fake):  # noqa: F811 - a fixture
    from gridtune.cli.main import main

    with Store.open(project) as store:
        export_project(store, tmp_path / "t.jsonl")
        assert watch_answer(store, small_spec(), {"place": "Bergen", "year": 2046}, "fake-model: repeats itself")
    res = CliRunner().invoke(main, ["eval", str(project), "--model", "fake-model", "--against", "fake-model",
                                    "-n", "1", "--json"])
    assert res.exit_code in (0, 1), res.output
    assert json.loads(res.output.strip().splitlines()[-1])["cases"] == 1
    asked = {r.body["messages"][-1]["content"] for r in fake.requests if isinstance(r.body, dict)
             and "messages" in r.body}
    assert asked == {"Place: Bergen. Year: 2046."}


# -- the playground's keys -------------------------------------------------------------------

async def _ran(pilot, screen):
    assert await wait_for(pilot, lambda: screen.spec is not None and screen.models)
    screen.query_one("#var-place").value = "Bergen"
    screen.query_one("#var-year").value = "2045"
    await pilot.press("r")
    assert await wait_for(pilot, lambda: screen._streams.get("a", {}).get("done"))
    await pilot.pause()


async def test_playground_a_promotes_the_answer_with_the_persons_grade(project, fake):  # noqa: F811 - a fixture
    fake.reply = "Bergen in 2045 hums along quietly."
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert screen.check_action("promote", ()) is False  # nothing answered yet
        await _ran(pilot, screen)
        await pilot.press("a")
        await settle(pilot)
        grade = app.screen.query_one("#dlg-grade")
        assert grade.value == "5"
        grade.value = "9"
        await pilot.press("enter")
        await pilot.pause()
        assert "within 1..5" in str(app.screen.query_one("#dlg-error").render())  # one line; still open
        grade.value = "4"
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen is screen
        assert frozenset({"completions", "grades"}) in app.changes
    with Store.open(project) as store:
        mine = [c for c in store.completions() if c.values == {"place": "Bergen", "year": 2045}]
    assert [(c.text, c.model, c.grade, c.grade_source, c.finish_reason) for c in mine] == [
        (fake.reply, "fake-model", 4, "person", "stop")]
    assert mine[0].params["max_tokens"] == 200


async def test_playground_w_adds_the_values_as_a_case_to_watch(project, fake):  # noqa: F811 - a fixture
    fake.reply = "loop " * 30
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await _ran(pilot, screen)
        await pilot.press("w")
        await settle(pilot)
        note = app.screen.query_one("#dlg-note")
        assert note.value == "fake-model: repeats itself"
        await pilot.press("enter")
        await settle(pilot)
        assert frozenset({"eval"}) in app.changes
    with Store.open(project) as store:
        cases = evaluation.cases(store)
        assert store.status_counts().done == 4  # nothing added to the training data
    assert [(c.values, c.source, c.note) for c in cases] == [
        ({"place": "Bergen", "year": 2045}, "person", "fake-model: repeats itself")]


# -- the export screen's options -----------------------------------------------------------------

def test_hold_out_field_parsing():
    assert split_hold_out("place=Oslo year=2040") == ["place=Oslo", "year=2040"]
    assert split_hold_out("place=New York, year=2040") == ["place=New York", "year=2040"]
    opts = ExportOptions.parse({"hold_out": "place=Oslo", "hold_out_combos": "1", "include_cut_off": "yes"},
                               default_path="/tmp/x.jsonl")
    assert opts.include_cut_off and opts.hold_out_combos == 1
    assert opts.hold_out_choice(small_spec()).values == {"place": ["Oslo"]}
    with pytest.raises(ValueError, match="combos"):
        ExportOptions.parse({"hold_out_combos": "two"}, default_path="/tmp/x.jsonl")


async def test_export_screen_rejects_a_bad_hold_out_in_one_line_and_writes_nothing(project, tmp_path):
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot)
        screen.query_one("#opt-hold_out").value = "place=Bergen"
        await pilot.press("e")
        await settle(pilot)
        error = str(screen.query_one("#exp-error").render())
        assert "hold out 'place=Bergen'" in error and "not a value of place" in error and "\n" not in error
        assert "--" not in error  # the form's words, not the command line's
    assert not (tmp_path / "tiny.jsonl").exists()
    with Store.open(project) as store:
        assert store.latest_export() is None


async def test_export_screen_holds_out_values_reports_them_cost_and_diversity(project, tmp_path):
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot)
        screen.query_one("#opt-hold_out").value = "place=Oslo"
        await pilot.press("e")
        assert await wait_for(pilot, lambda: screen.export is not None and not screen.busy
                              and screen.measuring is None and "diversity" in (screen.export.report or {}))
        await settle(pilot)
        report = str(screen.query_one("#exp-report").render())
    prompts = trained_prompts(tmp_path / "tiny.jsonl")
    assert len(prompts) == 2 and not any("Oslo" in p for p in prompts)
    assert "held out for evaluation: 2 cell(s), 2 completion(s) (place=Oslo)" in report.replace("\n", " ")
    assert "F7 Eval asks them" in report.replace("\n", " ")
    assert "cost: no charge" in report
    assert "diversity of the kept examples" in report and "Self-BLEU-4" in report
    with Store.open(project) as store:
        export = store.latest_export()
        cases = evaluation.cases(store)
    assert export.report["cost_line"].startswith("no charge")
    assert export.report["diversity"]["kept"]["texts"] == 2 and export.report["diversity"]["all"]["texts"] == 4
    assert sorted(c.values["year"] for c in cases if c.values["place"] == "Oslo") == [2030, 2040]
    # The form says what this export used (after a restart too: it is in the record).
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.screen.query_one("#opt-hold_out").value == "place=Oslo"
        assert "cost: no charge" in str(app.screen.query_one("#exp-report").render())


async def test_export_screen_cut_off_choice(project, tmp_path):
    with Store.open(project) as store:
        first = store.completions()[0]
        store._conn.execute("UPDATE completions SET finish_reason = 'length' WHERE id = ?", (first.id,))
        store._conn.commit()
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot)
        await pilot.press("e")
        assert await wait_for(pilot, lambda: screen.export is not None and not screen.busy)
        await settle(pilot)
        assert "cut-off: 1 left out" in str(screen.query_one("#exp-report").render())
        assert len(trained_texts(tmp_path / "tiny.jsonl")) == 3
        screen.query_one("#opt-include_cut_off").value = "yes"
        await pilot.press("e")
        assert await wait_for(pilot, lambda: screen.export is not None and screen.export.id == 2 and not screen.busy)
        await settle(pilot)
        assert "cut-off: 1 included" in str(screen.query_one("#exp-report").render())
    assert first.text in trained_texts(tmp_path / "tiny.jsonl")


def test_cell_key_of_promoted_values_matches_the_grid():
    assert cell_key({"place": "Oslo", "year": 2030}) == cell_key(parse_values(small_spec(), "place=Oslo year=2030"))
