"""The Eval section: the latest comparison, answers side by side, r runs and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, OptionList, Static

from gridtune.pipeline.evaluation import evaluate as ev
from gridtune.pipeline.spec.project import load_project_spec
from gridtune.pipeline.training.export import export_project
from gridtune.store import Store, evaluation as evs
from gridtune.tui.app import GridtuneApp

from .bigproject import small_project
from .tui_helpers import settle, wait_until

TUNED = "Short and finished. It ends here."
BASE = " ".join(["and the city went on and on"] * 80)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = small_project(tmp_path / "p.gridtune", done=16)
    with Store.open(path) as store:
        export_project(store, tmp_path / "train.jsonl", format="chat")
        ev.add_person_cases(store, load_project_spec(store), ["place=Bergen year=2045", "place=Quito year=2060"])
    return path


def _text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


async def test_r_runs_the_evaluation_and_the_table_and_answers_show(project, fake_openai):
    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)])
    app = GridtuneApp(project, start_mode="eval")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert "r asks both models" in _text(screen, "#eval-title")
        screen.query_one("#eval-model", Input).value = "tuned"
        screen.query_one("#eval-against", Input).value = "base"
        screen.query_one("#eval-samples", Input).value = "2"
        await pilot.press("r")
        await wait_until(pilot, lambda: screen.state.latest is not None and screen.running is None,
                         what="the evaluation to finish")
        await settle(pilot)
        assert "not worse" in _text(screen, "#eval-title")
        assert screen.query_one("#eval-cases", OptionList).option_count == 2
        assert TUNED in _text(screen, "#eval-a-text") and "went on" in _text(screen, "#eval-b-text")
        asked = len(fake_openai.chat_requests())
        assert asked == 2 * 2 * 2
        await pilot.press("r")  # everything is stored: nothing is asked again
        await wait_until(pilot, lambda: screen.running is None, what="the second pass")
        assert len(fake_openai.chat_requests()) == asked
    with Store.open(project) as store:
        assert evs.latest_run(store)["model"] == "tuned"


async def test_answers_show_while_the_run_goes_on(project, fake_openai):
    """The answers already stored show in the panes during a run, not only once it ends:
    Bergen's come at once while Quito's are held back by the server."""
    from .fakeserver import Fault

    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)],
                    faults=[Fault(kind="stall", stall_s=4.0, match="Quito")])
    app = GridtuneApp(project, start_mode="eval")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        screen.query_one("#eval-model", Input).value = "tuned"
        screen.query_one("#eval-against", Input).value = "base"
        await pilot.press("r")
        await wait_until(pilot, lambda: (TUNED in _text(screen, "#eval-a-text")
                                         and "went on" in _text(screen, "#eval-b-text")) or screen.running is None,
                         what="Bergen's answers")
        assert screen.running is not None and screen.state.latest is None  # Quito's still wait
        await wait_until(pilot, lambda: screen.running is None, what="the run's end", timeout=30)
        await settle(pilot)
        assert screen.live is None and "not worse" in _text(screen, "#eval-title")


async def test_without_an_export_the_screen_says_what_to_do(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=4)
    app = GridtuneApp(path, start_mode="eval")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "no export yet" in _text(app.screen, "#eval-title")


@pytest.fixture
def nothing_held_out(tmp_path: Path) -> Path:
    """The demo's path: an export at its defaults holds nothing out."""
    path = small_project(tmp_path / "p.gridtune", done=8)
    with Store.open(path) as store:
        export_project(store, tmp_path / "train.jsonl", format="chat")
    return path


async def test_an_export_that_holds_nothing_out_says_where_to_set_it(nothing_held_out: Path):
    app = GridtuneApp(nothing_held_out, start_mode="eval")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        title = _text(app.screen, "#eval-title")
        assert "nothing held out" in title and "F5" in title and "combos" in title


def test_eval_section_snapshot(snap_compare, project, fake_openai):
    fake_openai.set(replies=[("model:tuned", TUNED), ("model:base", BASE)])
    ev.evaluate(project, ev.EvalOptions(model="tuned", against="base", samples=2))

    async def steady(pilot) -> None:
        await settle(pilot)
        pilot.app.backend_label = "backend: test"
        pilot.app.refresh_status()
        await settle(pilot)
        pilot.app.clear_notifications()
        await pilot.pause()

    assert snap_compare(GridtuneApp(project, start_mode="eval"), terminal_size=(80, 24), run_before=steady)
