"""The app shell: opening projects, sections, help, the command palette, the status line."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.command import CommandList

from gridtune import locations
from gridtune.store import Store
from gridtune.tui.app import GridtuneApp, run_app
from gridtune.tui.help import HelpScreen

from .bigproject import small_project
from .tui_helpers import settle, wait_until


def test_missing_project_is_a_one_line_error_and_exit_2(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_app(tmp_path / "nope.gridtune")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gridtune: error:") and "nope.gridtune" in err and "\n" not in err
    assert not (tmp_path / "nope.gridtune").exists()


def test_not_a_project_is_exit_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.gridtune"
    bad.write_text("hello")
    with pytest.raises(SystemExit) as exc:
        run_app(bad)
    assert exc.value.code == 2
    assert "not a gridtune project" in capsys.readouterr().err


async def test_first_run_creates_the_demo_project():
    assert not locations.demo_project().exists()
    app = GridtuneApp(None)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.current_mode == "grid"  # nothing generated yet: the loop starts at the grid
    with Store.open(locations.demo_project()) as store:
        assert store.cell_count() == 256


async def test_a_project_with_completions_opens_on_the_review(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.current_mode == "review"


async def test_function_keys_switch_sections_and_status_line_counts(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await wait_until(pilot, lambda: app.status_counts.startswith("16 cells · 5 done · 0 graded"),
                         what=f"the first count (status line: {app.status_counts!r})")
        for key, mode in (("f2", "grid"), ("f3", "generate"), ("f5", "export"), ("f6", "playground"), ("f4", "review")):
            await pilot.press(key)
            await settle(pilot)
            assert app.current_mode == mode
        await pilot.press("4")
        await settle(pilot)
        # The status line recounts on its next tick.
        await wait_until(pilot, lambda: "1 graded" in app.status_counts, what="the recount after grading")


async def test_question_mark_shows_the_screens_keys(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path, start_mode="review")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        keys = dict((what, k) for k, what, _now in app.screen.rows)
        assert keys["auto-grade by length"] == "a" and keys["grade 4"] == "4" and "go to Grid" in keys
        assert keys["reject"] == "0 d"  # the help's "0 or d rejects", both keys listed
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, HelpScreen)


async def test_command_palette_runs_an_action_by_name(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p")
        await settle(pilot)
        await pilot.press(*"Review: auto-grade")
        # The palette searches asynchronously: wait for its hits before choosing.
        await wait_until(pilot, lambda: app.screen.query_one(CommandList).option_count > 0,
                         what="the palette's hits")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.current_mode == "review", what="the review screen")

        def graded() -> int:
            with Store.open(path) as store:
                return len(store.review_rows(where="graded"))

        await wait_until(pilot, lambda: graded() == 5, what="auto-grading to reach the file")
