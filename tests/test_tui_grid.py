"""The grid screen, driven by its keys; every assertion reads the project file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridtune.pipeline.spec.project import load_project_spec
from gridtune.store import Store
from gridtune.tui.app import GridtuneApp

from .bigproject import small_project
from .tui_helpers import settle


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return small_project(tmp_path / "small.gridtune", done=4)


def _spec(path: Path):
    with Store.open(path) as store:
        return load_project_spec(store), store.cell_count()


def _screen(app):
    return app.get_screen_stack("grid")[0]


async def test_edit_template_and_save(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        assert screen.focused.id == "grid-generation"
        await pilot.press("end", *"!!", "space")
        await pilot.press(*"Now")
        await settle(pilot)
        assert "unsaved" in str(screen.query_one("#grid-dirty").render())
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert "saved" == str(screen.query_one("#grid-dirty").render())
    spec, cells = _spec(project)
    assert spec.generation == "Write a scenario about AGI in {place} in {year}.!! Now"
    assert cells == 16


async def test_invalid_template_shows_the_culprit_and_saves_nothing(project: Path):
    before, _ = _spec(project)
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        await pilot.press("end", *"{nope}")
        await settle(pilot)
        error = str(screen.query_one("#grid-error").render())
        assert "{nope}" in error and "generation" in error
        assert screen.query_one("#grid-error").display
        await pilot.press("ctrl+s")
        await settle(pilot)
    after, _ = _spec(project)
    assert after == before


async def test_add_a_variable_from_the_keyboard(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        await pilot.press("ctrl+n")
        await settle(pilot)
        await pilot.press(*"season", "enter")
        await settle(pilot)
        assert screen.focused.id == "grid-values"
        await pilot.press(*"winter", "enter", *"summer")
        await settle(pilot)
        assert "used by no template" in str(screen.query_one("#grid-error").render())
        screen.query_one("#grid-generation").focus()
        await pilot.press("end", "space", *"{season}")
        await settle(pilot)
        assert str(screen.query_one("#grid-count").render()) == "4 × 4 × 2 = 32 cells"
        await pilot.press("ctrl+s")
        await settle(pilot)
    spec, cells = _spec(project)
    assert spec.variables["season"] == ["winter", "summer"]
    assert cells == 32
    import sqlite3

    conn = sqlite3.connect(project)  # every cell is new; the old ones (and their texts) are kept, inactive
    try:
        assert conn.execute("SELECT count(*) FROM completions WHERE status = 'done'").fetchone()[0] == 4
    finally:
        conn.close()


async def test_edit_values_and_remove_a_variable(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        screen.query_one("#grid-variables").focus()
        await pilot.press("down")  # year
        await settle(pilot)
        assert screen.selected == "year"
        await pilot.press("enter")
        await pilot.press("pagedown", "end", "enter", *"2060")
        await settle(pilot)
        assert str(screen.query_one("#grid-count").render()) == "4 × 5 = 20 cells"
        await pilot.press("ctrl+s")
        await settle(pilot)
        spec, cells = _spec(project)
        assert spec.variables["year"] == [2030, 2035, 2040, 2050, 2060] and cells == 20
        # remove "year": the templates still use it, so nothing is saved
        await pilot.press("ctrl+r", "y")
        await settle(pilot)
        assert "{year}" in str(screen.query_one("#grid-error").render())
        await pilot.press("ctrl+s")
        await settle(pilot)
    spec, cells = _spec(project)
    assert "year" in spec.variables and cells == 20


async def test_choose_the_preview_cell(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        preview = lambda: str(screen.query_one("#grid-preview").render())  # noqa: E731
        assert "in Tokyo in 2030" in preview()
        await pilot.press("ctrl+down")
        await settle(pilot)
        assert "in Tokyo in 2035" in preview() and "Year: 2035" in preview()
        await pilot.press("ctrl+up", "ctrl+up")
        await settle(pilot)
        assert "in Lima in 2050" in preview()
        assert screen.query_one("#grid-preview-box").border_title == "preview: cell 16/16"


async def test_quitting_with_unsaved_edits_asks_first(project: Path):
    from gridtune.tui.widgets.modals import ConfirmModal

    before, _ = _spec(project)
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("end", *"!!")
        await settle(pilot)
        await pilot.press("ctrl+q")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmModal) and app.is_running
        await pilot.press("n")  # stay, the edit is still there
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmModal) and _screen(app).dirty
        await pilot.press("ctrl+s")
        await settle(pilot)
        await pilot.press("ctrl+q")  # saved: quits without asking
        await settle(pilot)
        assert not app.is_running
    after, _ = _spec(project)
    assert after.generation == before.generation + "!!"


async def test_quitting_unsaved_and_confirming_leaves_the_file_alone(project: Path):
    before, _ = _spec(project)
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("end", *"??")
        await settle(pilot)
        await pilot.press("ctrl+q")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        assert not app.is_running
    assert _spec(project)[0] == before


# -- issue 10: help from a text area, focus shown, changes made elsewhere ----------------------


async def test_f1_opens_help_from_a_text_area_where_question_mark_is_typed(project: Path):
    from gridtune.tui.help import HelpScreen

    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        area = screen.query_one("#grid-generation")
        assert screen.focused is area
        await pilot.press("question_mark")
        await settle(pilot)
        assert area.text.endswith("?") or "?" in area.text  # typed, as in any editor
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("f1")  # and away again
        await settle(pilot)
        assert app.screen is screen


async def test_the_focused_field_is_marked(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        generation, training = screen.query_one("#grid-generation"), screen.query_one("#grid-training")
        assert generation.styles.border_top[0] == "heavy" and training.styles.border_top[0] == "round"
        await pilot.press("tab")
        await settle(pilot)
        assert screen.focused is training
        assert training.styles.border_top[0] == "heavy" and generation.styles.border_top[0] == "round"


def _change_spec_elsewhere(path: Path, generation: str) -> None:
    from dataclasses import replace

    from gridtune.pipeline.spec.project import apply_spec

    with Store.open(path) as store:  # another connection: another process, as far as the app can tell
        spec = load_project_spec(store)
        apply_spec(store, replace(spec, generation=generation))


async def test_a_spec_changed_elsewhere_is_reloaded_when_nothing_is_unsaved(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        _change_spec_elsewhere(project, "Changed elsewhere: {place} in {year}.")
        area = screen.query_one("#grid-generation")
        for _ in range(60):
            await pilot.pause(0.1)
            if area.text.startswith("Changed elsewhere"):
                break
        assert area.text == "Changed elsewhere: {place} in {year}."
        assert not screen.dirty


async def test_a_spec_changed_elsewhere_under_unsaved_edits_is_said_not_loaded(project: Path):
    app = GridtuneApp(project, start_mode="grid")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = _screen(app)
        await pilot.press("end", *" Mine.")
        await settle(pilot)
        _change_spec_elsewhere(project, "Changed elsewhere: {place} in {year}.")
        for _ in range(60):
            await pilot.pause(0.1)
            if screen.file_changed:
                break
        assert screen.file_changed
        assert screen.query_one("#grid-generation").text.endswith(" Mine.")  # the edits stay
        assert "the file changed too" in str(screen.query_one("#grid-dirty").render())
        assert any("changed in the project file" in n.message for n in app._notifications)
        await pilot.press("ctrl+s")  # saving puts the edits over it
        await settle(pilot)
        assert not screen.file_changed
    spec, _ = _spec(project)
    assert spec.generation.endswith(" Mine.")
