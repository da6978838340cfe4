"""Snapshots at 80x24 of what closes the loop: the export screen's cut-off and
hold-out options, its report (held out, cost, diversity) and a bad hold-out said
inline; the playground's dialogs that add an answer to the data or watch it.

Update with ``pytest tests/test_snapshots_export_curation.py --snapshot-update``
after looking at the new rendering (``python /tmp/svgtext.py FILE.svg`` as text).
"""

from __future__ import annotations

from gridtune.store import Store
from tests.test_snapshots_export_playground import (  # noqa: F401 - fixtures
    SIZE,
    _playground_ready,
    _steady,
    export_app,
    playground_app,
    project,
)
from tests.test_tui_export import fill
from tests.test_tui_playground import fake, streaming_server  # noqa: F401 - fixtures
from tests.tui_helpers import settle, wait_until


def _cut_one(project):  # noqa: F811 - a fixture
    with Store.open(project) as store:
        first = store.completions()[0]
        store._conn.execute("UPDATE completions SET finish_reason = 'length' WHERE id = ?", (first.id,))
        store._conn.commit()


def _export_with(hold_out: str, pages: int = 0):
    async def before(pilot):
        await _steady(pilot)
        screen = pilot.app.screen
        screen.query_one("#opt-hold_out").value = hold_out
        await pilot.press("e")
        await wait_until(pilot, lambda: screen.export is not None and not screen.busy and screen.measuring is None
                         and "diversity" in (screen.export.report or {}), what="the export and its diversity")
        await _steady(pilot)
        for _ in range(pages):
            await pilot.press("pagedown")
        await _steady(pilot)

    return before


def test_export_report_cut_off_left_out_and_held_out(snap_compare, project):  # noqa: F811 - a fixture
    fill(project)
    _cut_one(project)
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_export_with("year=2040"))


def test_export_report_cost_and_diversity_at_its_end(snap_compare, project):  # noqa: F811 - a fixture
    fill(project)
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_export_with("place=Oslo", pages=3))


def test_export_bad_hold_out_said_in_one_line(snap_compare, project):  # noqa: F811 - a fixture
    fill(project)

    async def before(pilot):
        await _steady(pilot)
        pilot.app.screen.query_one("#opt-hold_out").value = "place=Bergen"
        await pilot.press("e")
        await _steady(pilot)

    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=before)


def _answered(kind_key: str):
    async def before(pilot):
        await _playground_ready(pilot)
        screen = pilot.app.screen
        screen.query_one("#pg-model-b").value = "other-model"
        screen.query_one("#var-place").value = "Bergen"
        screen.query_one("#var-year").value = "2045"
        await pilot.press("r")
        await wait_until(pilot, lambda: len(screen._streams) == 2
                         and all(s.get("done") for s in screen._streams.values()), what="both replies")
        await _steady(pilot)
        await pilot.press(kind_key)
        await settle(pilot)

    return before


def test_playground_add_to_data_dialog(snap_compare, project, fake):  # noqa: F811 - a fixture
    fill(project)
    fake.reply = "Bergen in 2045 hums along: ferries on batteries, and the rain as ever."
    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=_answered("a"))


def test_playground_watch_in_eval_dialog(snap_compare, project, fake):  # noqa: F811 - a fixture
    fill(project)
    fake.reply = "The city grew. The city grew. The city grew. The city grew. The city grew and grew."
    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=_answered("w"))
