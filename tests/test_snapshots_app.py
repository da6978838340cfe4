"""Snapshots of what the app itself draws: the command palette, the quit question,
and the footer at 60×20 (where it used to leave stray characters).

Update the baselines with ``pytest tests/test_snapshots_app.py --snapshot-update``
after looking at the new rendering.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, TextArea

from gridtune.tui.app import GridtuneApp

from .bigproject import small_project
from .tui_helpers import settle, steady


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the export form shows its output path relative to here: stable
    return small_project(tmp_path / "small.gridtune", done=12)


async def _steady(pilot) -> None:
    await steady(pilot, label=None)

def test_command_palette_lists_sections_and_actions(snap_compare, project: Path):
    async def open_palette(pilot) -> None:
        await _steady(pilot)
        await pilot.press("ctrl+p")
        await settle(pilot)
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False  # a blinking cursor is two different pictures
        # With no query the palette lists each provider's commands in the order their
        # discovery finishes (Textual's system commands race ours): a word makes it stable.
        await pilot.press(*"open")
        for _ in range(3):
            await settle(pilot)
            await pilot.pause(0.3)

    assert snap_compare(GridtuneApp(project, start_mode="review"), terminal_size=(80, 24), run_before=open_palette)


def test_command_palette_filtered_by_a_word(snap_compare, project: Path):
    async def search(pilot) -> None:
        await _steady(pilot)
        await pilot.press("ctrl+p")
        await settle(pilot)
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False  # a blinking cursor is two different pictures
        await settle(pilot)
        await pilot.press(*"export")
        # The palette searches in a worker and redraws its list when the hits are in.
        for _ in range(3):
            await settle(pilot)
            await pilot.pause(0.3)

    assert snap_compare(GridtuneApp(project, start_mode="review"), terminal_size=(80, 24), run_before=search)


def test_quit_with_unsaved_grid_edits_asks(snap_compare, project: Path):
    async def edit_then_quit(pilot) -> None:
        await _steady(pilot)
        area = pilot.app.screen.query(TextArea).first()
        area.focus()
        area.insert("Bergen\n")
        await settle(pilot)
        await pilot.press("ctrl+q")
        await settle(pilot)

    assert snap_compare(GridtuneApp(project, start_mode="grid"), terminal_size=(80, 24), run_before=edit_then_quit)


@pytest.mark.parametrize("mode", ["grid", "review", "export"])
def test_footer_at_60_columns_has_no_stray_characters(snap_compare, project: Path, mode: str):
    assert snap_compare(GridtuneApp(project, start_mode=mode), terminal_size=(60, 20), run_before=_steady)
