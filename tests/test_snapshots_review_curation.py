"""Snapshots of the review screen's curation at 80x24 (issue 9): the marks in the
list (✂ cut off, ≈N near-duplicates) with the curation bar and the judge's
agreement, the cut-off and duplicates filters with the detail saying why, the
redo question, the drop confirmation, the coverage panel and the top-up question.

Update with ``pytest tests/test_snapshots_review_curation.py --snapshot-update``
after looking at the new rendering (``python /tmp/svgtext.py FILE.svg`` prints one as text).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gridtune.tui.app import GridtuneApp

from .test_snapshots_review import _steady
from .test_tui_review_curation import curation_project
from .tui_helpers import review_screen, settle

SIZE = (80, 24)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return curation_project(tmp_path / "cur.gridtune", find=True, calibration=True)


def _app(path: Path) -> GridtuneApp:
    return GridtuneApp(path, start_mode="review")


def _then(filter_key: str | None = None, *keys: str):
    async def before(pilot) -> None:
        await _steady(pilot)
        if filter_key:
            review_screen(pilot.app).set_filter(filter_key)
            await _steady(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)
            pilot.app.clear_notifications()
        await _steady(pilot)

    return before


def test_curation_marks_in_the_list(snap_compare, project: Path):
    """Longest first: the cut-off ones (✂) on top, the near-duplicates (≈2), the judge in the bar.
    (Every row: "finished", the default, lists only those that ended on their own.)"""
    async def before(pilot) -> None:
        await _steady(pilot)
        review_screen(pilot.app).set_filter("all")
        await _steady(pilot)
        await pilot.press("r", "g")
        await _steady(pilot)

    assert snap_compare(_app(project), terminal_size=SIZE, run_before=before)


def test_curation_cut_off_filter(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_then("cut_off"))


def test_curation_duplicates_filter(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_then("duplicates"))


def test_curation_redo_asks_max_tokens(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_then("cut_off", "R"))


def test_curation_drop_duplicates_asks_first(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_then(None, "X"))


def test_curation_coverage_panel(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_then(None, "v"))


def test_curation_top_up_asks_the_target(snap_compare, project: Path):
    assert snap_compare(_app(project), terminal_size=SIZE, run_before=_then(None, "v", "T"))
