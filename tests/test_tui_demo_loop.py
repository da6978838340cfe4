"""Issue 21: the demo end to end at 80×24 with the keys the screens show, and each stumble
a first-time user hit on the way (hints, help, dialogs, counts, labels, estimates)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from textual.widgets import Input, OptionList, Static

from gridtune import locations
from gridtune.pipeline.spec.project import create_project, open_or_create_demo
from gridtune.store import Store, evaluation
from gridtune.tui.app import GridtuneApp
from gridtune.tui.help import HelpScreen
from gridtune.tui.screens.evaluate import NO_EXPORT, NOTHING_HELD_OUT
from gridtune.tui.screens.playground import AnswerDialog
from gridtune.tui.widgets import LengthHistogram
from tests.bigproject import fill_done, small_project
from tests.test_tui_export_curation import _ran
from tests.test_tui_generate import small_spec
from tests.test_tui_playground import fake, streaming_server  # noqa: F401 - fixtures
from tests.tiny_model import tiny_model_dir  # noqa: F401 - a fixture
from tests.tui_helpers import review_screen, settle, wait_until

TUNED = "Oslo in 2030 runs on quiet machines. Clinics answer at once. Work changes, slowly."
BASE = "AGI scenario. " + " ".join(["and the city went on and on"] * 40)


def _text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


def _demo(cut_off_every: int = 0) -> Path:
    """The demo project as a first run creates it, its 256 cells generated."""
    path = locations.demo_project()
    path.parent.mkdir(parents=True, exist_ok=True)
    open_or_create_demo(path).close()
    fill_done(path)
    if cut_off_every:
        with sqlite3.connect(path) as conn:
            conn.execute(f"UPDATE completions SET finish_reason = 'length' WHERE id % {cut_off_every} = 0")
    return path


def _screen_text(app) -> str:
    """What the terminal shows, as text."""
    import io

    from rich.console import Console

    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), record=True,
                      force_terminal=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def _notes(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_the_demo_reaches_tuned_vs_base_on_held_out_values_with_no_flag_typed(fake_openai):
    path = _demo()
    fake_openai.set(replies=[("model:tuned-model", TUNED), ("model:base-model", BASE)])
    app = GridtuneApp(None)  # `gridtune` with no project: the demo
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("f5")
        await settle(pilot)
        export = app.screen
        assert export.query_one("#opt-hold_out", Input).value == "place=Oslo"  # proposed, not typed
        await pilot.press("e")
        await wait_until(pilot, lambda: export.export is not None and export.busy is None, what="the export")
        assert "held out for evaluation: 64 cell(s)" in _text(export, "#exp-report")
        # The first fine-tune's outcome, as the job pane records it.
        with Store.open(path) as store:
            store.record_job(id="ftjob-1", base_url=None, model="base-model", training_file=None,
                             validation_file=None, export_id=store.latest_export().id, status="running")
            store.update_job("ftjob-1", status="succeeded", fine_tuned_model="tuned-model")
        await pilot.press("f7")
        await settle(pilot)
        screen = app.screen
        await wait_until(pilot, lambda: screen.query_one("#eval-model", Input).value == "tuned-model",
                         what="the tuned model in F7")
        assert screen.query_one("#eval-against", Input).value == "base-model"
        assert screen.query_one("#eval-cases", OptionList).option_count == 64
        assert "64 held-out prompt(s); r asks both models" in _text(screen, "#eval-title")
        screen.query_one("#eval-samples", Input).value = "1"  # (fewer answers: a shorter test)
        await pilot.press("r")
        await wait_until(pilot, lambda: screen.state.latest is not None and screen.running is None,
                         timeout=60, what="the evaluation")
        await settle(pilot)
        assert "64 prompts × 1" in _text(screen, "#eval-title")
        shown = _screen_text(app)
        assert "mentions its values" in shown and "stop rate" in shown
    with Store.open(path) as store:
        result = evaluation.latest_run(store)["result"]
    # Hand-checked: TUNED names Oslo and 2030 in its own words, not healthcare or employment
    # (the first held-out cell); BASE repeats the prompt's first words and names none.
    assert result["tuned"]["faithfulness"]["value"] > 0 and result["base"]["faithfulness"]["value"] == 0


async def test_eval_hints_name_the_apps_keys_not_command_line_flags(tmp_path):
    path = small_project(tmp_path / "p.gridtune", done=8)
    app = GridtuneApp(path, start_mode="eval")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert _text(screen, "#eval-title") == NO_EXPORT
        screen.query_one("#eval-model", Input).value = "tuned"
        await pilot.press("r")
        await settle(pilot)
        assert NO_EXPORT in _notes(app)
        from gridtune.pipeline.training.export import export_project

        def export_holding_nothing_out() -> None:  # (it runs its own event loop: in a thread)
            with Store.open(path) as store:
                export_project(store, tmp_path / "train.jsonl", format="chat")

        await asyncio.to_thread(export_holding_nothing_out)
        await wait_until(pilot, lambda: _text(screen, "#eval-title") == NOTHING_HELD_OUT, what="the reload")
        app.clear_notifications()
        await pilot.press("r")
        await settle(pilot)
        assert _notes(app) == [NOTHING_HELD_OUT]
        app.clear_notifications()
        await pilot.press("S")  # the scaling comparison needs held-out prompts too: said the same way
        await settle(pilot)
        assert _notes(app) == [NOTHING_HELD_OUT] and screen.running is None
        for line in (NO_EXPORT, NOTHING_HELD_OUT, screen.HELP):
            assert "--" not in line and "gridtune " not in line and len(line) <= 78 or line is screen.HELP


async def test_help_names_every_screen_and_lists_its_keys_once(tmp_path, fake_openai):
    path = small_project(tmp_path / "p.gridtune", done=8)
    app = GridtuneApp(path, start_mode="export")
    async with app.run_test(size=(80, 24)) as pilot:
        for mode, title, keys in (("export", "Export & fine-tune", {"c", "p", "f", "e"}),
                                  ("playground", "Playground", {"a", "w", "r", "n"}),
                                  ("review", "Review", {"0 d"})):
            await pilot.press(app.sections[mode].key)
            await settle(pilot)
            await pilot.press("question_mark")
            await settle(pilot)
            help_ = app.screen
            assert isinstance(help_, HelpScreen) and help_.below_title == title and help_.below_help
            shown = {k for k, _what, _now in help_.rows}
            assert keys <= shown, (mode, shown)
            text = _text(help_, "#help-keys")
            assert [line.split()[0] for line in text.splitlines()].count("^p") == 1
            assert "command palette" in text
            if mode == "export":  # c and p do nothing before a job: listed, marked so
                assert "Cancel job (not now)" in text
            await pilot.press("escape")
            await settle(pilot)


async def test_an_f_key_closes_a_dialog_and_the_first_f7_after_enter_counts(project, fake):  # noqa: F811
    app = GridtuneApp(project, start_mode="playground")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await _ran(pilot, screen)
        await pilot.press("w")
        await settle(pilot)
        assert isinstance(app.screen, AnswerDialog)
        await pilot.press("f7")
        await settle(pilot)
        assert app.current_mode == "eval"
        await pilot.press("f6")
        await settle(pilot)
        assert app.screen is screen  # the dialog closed with the switch: it does not come back
        await pilot.press("w")
        await settle(pilot)
        await pilot.press("enter")  # adds the values to the evaluation set
        await settle(pilot)
        assert app.screen is screen
        await pilot.press("f7")
        await settle(pilot)
        assert app.current_mode == "eval"  # the first F7 after enter
        await pilot.press("question_mark", "f4")
        await settle(pilot)
        assert app.current_mode == "review" and not isinstance(app.screen, HelpScreen)
    with Store.open(project) as store:
        assert len(evaluation.cases(store)) == 1


@pytest.fixture
def project(tmp_path, monkeypatch):
    from tests.test_tui_export import fill

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    fill(path)
    return path


async def test_kept_counts_leave_cut_offs_out_and_finished_lists_only_finished(tmp_path):
    path = _demo(cut_off_every=17)  # 15 of 256 cut off at max tokens
    app = GridtuneApp(path, start_mode="review")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("a")  # auto-grade everything by length
        await wait_until(pilot, lambda: screen.counts is not None and screen.counts.graded == 256,
                         what="the auto-grade")
        await settle(pilot)
        assert "kept 241" in _text(screen, "#review-counts")
        said = " ".join(_notes(app))
        assert "C regenerates them" in said and "gridtune generate" not in said  # the key, not the CLI
        assert screen.filter.label == "finished" and len(screen.list.rows) == 241
        await pilot.press("f", "f")  # ungraded, then cut off: two presses, not eight
        await settle(pilot)
        assert screen.filter.key == "cut_off" and len(screen.list.rows) == 15
        await pilot.press("F", "F")
        await settle(pilot)
        assert screen.filter.key == "done"
        await pilot.press("f5")
        await settle(pilot)
        await wait_until(pilot, lambda: "kept" in app.screen.title_text.plain, what="the export header")
        title = app.screen.title_text.plain
        assert "241 kept" in title and "15 cut off" in title and len(title) <= 78


async def test_one_completion_is_labelled_as_one(tmp_path):
    path = small_project(tmp_path / "p.gridtune", done=1)
    app = GridtuneApp(path, start_mode="review")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        histogram = app.screen.query_one(LengthHistogram)
        await wait_until(pilot, lambda: bool(histogram.lengths), what="the lengths")
        (length,) = histogram.lengths
        label = str(histogram.render()).splitlines()[-1]
        assert label == f"1 completion {length:,} chars"


async def test_the_estimate_made_before_a_run_goes_once_the_run_measures_its_speed(tmp_path):
    import os
    import socket

    from gridtune.pipeline.generation import runs

    path = small_project(tmp_path / "p.gridtune", done=0)
    with Store.open(path) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher",
                                 params={"concurrency": 4}, is_alive=runs.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 8, "in_flight": 4,
                                 "estimate": "up to about 50 min on the local server", "elapsed_s": 2.0})
    app = GridtuneApp(path, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        note = screen.query_one("#gen-note")
        await wait_until(pilot, lambda: "50 min" in str(note.render()), what="the estimate while nothing is measured")
        with Store.open(path) as store:
            store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 8, "done": 2, "in_flight": 4,
                                     "tokens_per_s": 40.0, "eta_s": 300.0,
                                     "estimate": "up to about 50 min on the local server", "elapsed_s": 30.0})
        await wait_until(pilot, lambda: "ETA 5m00s" in str(screen.query_one("#gen-rates").render()),
                         what="the run's own ETA")
        assert "50 min" not in str(note.render())


@pytest.mark.local
async def test_on_a_cold_local_server_s_starts_the_server_alone_then_estimates(tmp_path, monkeypatch,
                                                                               tiny_model_dir):
    """No OPENAI_* settings and no server: s starts the local server (the tiny model here),
    no run; the estimate follows, and only the next s would start the run."""
    monkeypatch.setenv("GRIDTUNE_LOCAL_MODEL", str(tiny_model_dir))
    path = small_project(tmp_path / "p.gridtune", done=0)
    app = GridtuneApp(path, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await wait_until(pilot, lambda: screen.server_cold, what="the cold server seen")
        assert screen.estimate.startswith("no estimate until the local server runs: s starts it")
        assert app.active_bindings["s"].binding.action == "start_server"
        await pilot.press("s")
        await wait_until(pilot, lambda: not screen.server_cold and screen.busy is None, timeout=120,
                         what="the server started")
        await wait_until(pilot, lambda: screen.estimate and "until the local server runs" not in screen.estimate,
                         what="an estimate from the running server")
        assert app.active_bindings["s"].binding.action == "start"
        with Store.open(path) as store:
            assert store.latest_run() is None  # the server, not a run



def test_a_jobs_eta_comes_from_its_steps_and_its_time_is_said_at_the_end():
    from gridtune.pipeline.training.finetune import JobState

    start = time.time()
    running = JobState(id="j", status="running", steps=(1.0, 11.0), step_times=(start, start + 50),
                       total_steps=101, created_at=start - 10)
    assert running.eta_s == pytest.approx(90 * 5.0) and running.took_s is None
    done = JobState(id="j", status="succeeded", created_at=start, finished_at=start + 831)
    assert done.took_s == 831 and done.eta_s is None
