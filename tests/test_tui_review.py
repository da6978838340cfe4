"""The review screen, driven by its keys; every assertion reads the project file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridtune.store import Store
from gridtune.tui.app import GridtuneApp

from .bigproject import make_project, small_project
from .tui_helpers import review_screen, settle


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return small_project(tmp_path / "small.gridtune", done=12)


def _rows(path: Path, **kw):
    with Store.open(path) as store:
        return store.review_rows(**kw)


def _app(path: Path) -> GridtuneApp:
    return GridtuneApp(path, start_mode="review")


async def test_opens_sorted_shortest_first(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        lengths = [r[1] for r in screen.list.rows]
        assert len(lengths) == 12  # finished ones only by default
        assert lengths == sorted(lengths)
        assert "graded 0/12" in str(screen.query_one("#review-counts").render())


async def test_typing_a_grade_stores_it_and_moves_on(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        first, second = screen.list.rows[0][0], screen.list.rows[1][0]
        await pilot.press("4")
        await pilot.press("5")
        await settle(pilot)
        assert screen.list.cursor == 2
        assert "graded 2/12 · kept 2" in str(screen.query_one("#review-counts").render())
    with Store.open(project) as store:
        a, b = store.get_completion(first), store.get_completion(second)
        assert (a.grade, a.grade_source) == (4, "person")
        assert (b.grade, b.grade_source) == (5, "person")
        assert [g.grade for g in store.grade_history(first)] == [4]


async def test_d_and_0_reject_and_u_undoes(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        rows = review_screen(app).list.rows
        first, second, third = rows[0][0], rows[1][0], rows[2][0]
        await pilot.press("d", "0", "3")
        await settle(pilot)
        with Store.open(project) as store:
            assert [store.get_completion(i).grade for i in (first, second, third)] == [0, 0, 3]
        await pilot.press("u")
        await settle(pilot)
        assert review_screen(app).list.current[0] == third  # undo returns to the row
        await pilot.press("u")
        await settle(pilot)
    with Store.open(project) as store:
        assert store.get_completion(third).grade is None
        assert store.get_completion(second).grade is None
        assert store.get_completion(first).grade == 0
        assert [g.undone for g in store.grade_history(third)] == [True]


async def test_e_edits_the_text_and_keeps_the_original(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        target = review_screen(app).list.current[0]
        with Store.open(project) as store:
            original = store.get_completion(target).text
        await pilot.press("e")
        await settle(pilot)
        await pilot.press("end", "space", "E", "D", "I", "T", "E", "D")
        await pilot.press("ctrl+s")
        await settle(pilot)
        row = review_screen(app).list.rows[review_screen(app).list.index_of(target)]
        assert row[1] == len(original) + 7
    with Store.open(project) as store:
        record = store.get_completion(target)
        assert record.text == original + " EDITED"
        assert record.original_text == original
        assert record.length == len(original) + 7


async def test_escape_in_the_editor_changes_nothing(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        target = review_screen(app).list.current[0]
        await pilot.press("e")
        await settle(pilot)
        await pilot.press("X", "escape")
        await settle(pilot)
    with Store.open(project) as store:
        assert store.get_completion(target).original_text is None


async def test_a_auto_grades_by_length_and_u_undoes_it(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        first = review_screen(app).list.current[0]
        await pilot.press("5")  # a person's grade is never overwritten
        await pilot.press("a")
        await settle(pilot)
        with Store.open(project) as store:
            done = [store.get_completion(r[0]) for r in store.review_rows(where="done")]
            assert all(c.grade is not None for c in done)
            assert {c.grade_source for c in done if c.id != first} == {"by-length"}
            assert store.get_completion(first).grade == 5
            shortest = min((c for c in done if c.id != first), key=lambda c: c.length)
            assert shortest.grade == 1
        await pilot.press("u")
        await settle(pilot)
    with Store.open(project) as store:
        graded = [r for r in store.review_rows(where="graded")]
        assert [r[0] for r in graded] == [first]


async def test_x_drops_at_or_below_a_grade_after_confirmation(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("a")
        await settle(pilot)
        with Store.open(project) as store:
            low = {r[0] for r in store.review_rows(where="graded") if r[2] in (1, 2)}
        assert low
        await pilot.press("x", "2")
        await settle(pilot)
        await pilot.press("n")  # said no: nothing changes
        await settle(pilot)
        with Store.open(project) as store:
            assert not store.review_rows(where="all", min_grade=None) or all(
                r[2] != 0 for r in store.review_rows(where="graded"))
        await pilot.press("x", "2")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
    with Store.open(project) as store:
        rejected = {r[0] for r in store.review_rows(where="graded") if r[2] == 0}
        assert rejected == low
        assert all(store.get_completion(i).grade_source == "person" for i in rejected)


async def test_filter_sort_and_search(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("f")  # ungraded
        await settle(pilot)
        assert len(screen.list.rows) == 11 and all(r[2] is None for r in screen.list.rows)
        await pilot.press("f")  # graded
        await settle(pilot)
        assert [r[2] for r in screen.list.rows] == [4]
        for _ in range(7):  # around to "finished" again
            await pilot.press("f")
        await settle(pilot)
        assert screen.filter.key == "done"
        await pilot.press("r")
        await settle(pilot)
        lengths = [r[1] for r in screen.list.rows]
        assert lengths == sorted(lengths, reverse=True)
        await pilot.press("slash", "L", "a", "g", "o", "s", "enter")
        await settle(pilot)
        assert screen.search == "Lagos"
        assert len(screen.list.rows) == _rows_count(project, "Lagos")
        assert screen.focused is screen.list
        await pilot.press("escape")
        await settle(pilot)
        assert screen.search == "" and len(screen.list.rows) == 12


def _rows_count(path: Path, search: str) -> int:
    return len(_rows(path, where="done", search=search))


async def test_detail_shows_the_selected_completion(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("j")
        await settle(pilot)
        await pilot.pause(0.1)
        await settle(pilot)
        target = screen.list.current[0]
        with Store.open(project) as store:
            record = store.get_completion(target)
        head = str(screen.query_one("#review-detail-head").render())
        assert f"#{target}" in head and f"place: {record.values['place']}" in head
        assert str(screen.query_one("#review-detail-text").render()).startswith(record.text[:20])


async def test_100k_rows_open_and_move(tmp_path: Path):
    path = make_project(tmp_path / "big.gridtune", 100_000)
    app = _app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        assert len(screen.list.rows) == 100_000
        await pilot.press("j", "j", "pagedown", "end")
        await settle(pilot)
        assert screen.list.cursor == 99_999
        last = screen.list.current
        await pilot.press("k", "3")
        await settle(pilot)
        graded = screen.list.rows[99_998][0]
        assert screen.list.cursor == 99_999 and last[1] >= screen.list.rows[99_998][1]
    with Store.open(path) as store:
        assert store.get_completion(graded).grade == 3
