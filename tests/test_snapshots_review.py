"""Snapshots of the review screen at 80x24 (pytest-textual-snapshot), in the states a
person meets it: nothing generated, a run under way, finished and ungraded, after
auto-grading, grading and dropping, searching, the modals and the failed filter.

Update the baselines with ``pytest tests/test_snapshots_review.py --snapshot-update``
after looking at the new rendering. Nothing time-dependent is on screen: the
project is built from fixed texts, the status line is counted and the backend
label fixed before the shot, notifications are cleared and no reload is pending.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gridtune.store import Store
from gridtune.tui.app import GridtuneApp

from .bigproject import small_project
from .tui_helpers import review_screen, settle, steady

SIZE = (80, 24)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return small_project(tmp_path / "small.gridtune", done=12)


def _app(path: Path) -> GridtuneApp:
    return GridtuneApp(path, start_mode="review")


async def _steady(pilot) -> None:
    await steady(pilot)

def _keys(*keys: str):
    async def before(pilot) -> None:
        await _steady(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)
            pilot.app.clear_notifications()  # a modal opened next would leave the toast below it
        await _steady(pilot)

    return before


def test_review_with_nothing_generated(snap_compare, tmp_path: Path):
    path = small_project(tmp_path / "new.gridtune", done=0)
    assert snap_compare(_app(path), terminal_size=SIZE, run_before=_steady)


def test_review_while_a_run_is_under_way(snap_compare, tmp_path: Path):
    """Half of the grid done, the rest pending, all of it listed (filter "all, pending too")."""
    path = small_project(tmp_path / "half.gridtune", done=8)

    async def before(pilot) -> None:
        await _steady(pilot)
        review_screen(pilot.app).set_filter("all")
        await _steady(pilot)

    assert snap_compare(_app(path), terminal_size=SIZE, run_before=before)


def test_review_finished_and_ungraded(snap_compare, tmp_path: Path):
    path = small_project(tmp_path / "done.gridtune")
    assert snap_compare(_app(path), terminal_size=SIZE, run_before=_steady)


def test_review_after_grading(snap_compare, project: Path):
    """A grade, a rejection, the cursor moved on: the counts and the grades in the list."""
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("4", "d", "j"))


def test_review_after_auto_grade(snap_compare, project: Path):
    """Grade bands by length in the list; the detail says the grade came from length."""
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("a"))


def test_review_grade_history_in_words(snap_compare, project: Path):
    """Auto-graded, then graded by a person: "grade 4 by you · was auto 1 by length"."""
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("a", "4", "k"))


def test_review_drop_asks_first(snap_compare, project: Path):
    """After grading and auto-grading, x 2: the confirmation says how many and that u undoes it."""
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("5", "a", "x", "2"))


def test_review_after_a_drop(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("a", "x", "2", "y"))


def test_review_grade_pick_for_a_drop(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("x"))


def test_review_search_box_open_with_a_query(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("slash", *"Oslo"))


def test_review_search_applied(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("slash", *"Oslo", "enter"))


def test_review_edit_modal(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_keys("e"))


def test_review_failed_filter(snap_compare, project: Path):
    with Store.open(project) as store:
        pending = [r[0] for r in store.review_rows(where="all", sort="grid") if r[3] == "pending"]
        for cid in pending[:2]:
            store.save_failed(cid, error="HTTP 400: the prompt is longer than the model allows", error_kind="permanent",
                              attempts=5, model="teacher-model")

    async def before(pilot) -> None:
        await _steady(pilot)
        review_screen(pilot.app).set_filter("failed")
        await _steady(pilot)

    assert snap_compare(_app(project), terminal_size=SIZE, run_before=before)
