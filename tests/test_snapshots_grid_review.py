"""Snapshots of the grid and help screens at 80x24 (pytest-textual-snapshot); the
review screen's are in test_snapshots_review.py.

Update the baselines with ``pytest tests/test_snapshots_grid_review.py --snapshot-update``
after looking at the new rendering. Nothing time-dependent is on screen: the
project is built from fixed texts, the status line is counted before the shot
and the text cursor does not blink.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gridtune.tui.app import GridtuneApp

from .bigproject import small_project
from .tui_helpers import steady

SIZE = (80, 24)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return small_project(tmp_path / "small.gridtune", done=12)


async def _steady(pilot) -> None:
    await steady(pilot, label=None)

def test_grid_screen(snap_compare, project: Path):
    assert snap_compare(GridtuneApp(project, start_mode="grid"), terminal_size=SIZE, run_before=_steady)


def test_grid_screen_with_an_error(snap_compare, project: Path):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("end", *"{nope}")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(project, start_mode="grid"), terminal_size=SIZE, run_before=before)


def test_help_screen(snap_compare, project: Path):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("question_mark")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(project, start_mode="review"), terminal_size=SIZE, run_before=before)
