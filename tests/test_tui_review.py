"""The review screen, driven by its keys; every assertion reads the project file."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Footer, Input

from gridtune.pipeline.curation import review
from gridtune.store import Store
from gridtune.tui.app import GridtuneApp
from gridtune.tui.events import ProjectChanged
from gridtune.tui.widgets import LengthHistogram

from .bigproject import make_project, small_project
from .tui_helpers import review_screen, settle, wait_until


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
        await pilot.press("f", "f", "f")  # cut off, near-duplicates, graded
        await settle(pilot)
        assert screen.filter.key == "graded" and [r[2] for r in screen.list.rows] == [4]
        await pilot.press("F", "F", "F", "F")  # back to "finished"
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


# -- following the project ------------------------------------------------------------
def _finish(path: Path, n: int, length: int = 700) -> list[int]:
    """Another process finishes ``n`` pending completions: a second connection to the file."""
    with Store.open(path) as store:
        pending = [r[0] for r in store.review_rows(where="all", sort="grid") if r[3] == "pending"][:n]
        for k, cid in enumerate(pending):
            store.save_done(cid, text="x" * (length + k), model="teacher-model", params={}, prompt_tokens=20,
                            completion_tokens=length // 4, latency_s=1.0, finish_reason="stop", attempts=1)
    return pending


async def test_rows_counts_and_histogram_follow_completions_written_by_another_process(tmp_path: Path):
    path = small_project(tmp_path / "half.gridtune", done=6)
    app = _app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        histogram = screen.query_one(LengthHistogram)
        assert len(screen.list.rows) == 6 and len(histogram.lengths) == 6
        await pilot.press("j", "j")
        await settle(pilot)
        kept = screen.list.current[0]
        added = _finish(path, 10)
        await wait_until(pilot, lambda: len(screen.list.rows) == 16, what="the other process's rows")
        await wait_until(pilot, lambda: len(histogram.lengths) == 16, what="the histogram to follow")
        await settle(pilot)
        assert max(histogram.lengths) == 709  # the longest one written by the other process
        assert screen.list.border_title == "16 rows"
        assert "graded 0/16" in str(screen.query_one("#review-counts").render())
        assert screen.list.current[0] == kept  # the cursor stays on its row
        assert set(added) <= {r[0] for r in screen.list.rows}


async def test_the_histogram_follows_auto_grading_and_edits(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        histogram = screen.query_one(LengthHistogram)
        before = histogram.lengths
        await pilot.press("e")
        await settle(pilot)
        await pilot.press("end", *"x" * 30, "ctrl+s")
        await settle(pilot)
        await wait_until(pilot, lambda: histogram.lengths != before, what="the edit in the histogram")
        assert sorted(histogram.lengths) == sorted(r[1] for r in _rows(project, where="done"))


async def test_reloads_at_most_once_a_second_while_changes_pour_in(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        loads: list[int] = []
        original = screen._rows_loaded

        def counting(rows, keep_id):
            loads.append(len(rows))
            original(rows, keep_id)

        screen._rows_loaded = counting
        for _ in range(20):  # a run writing many times a second
            screen.post_message(ProjectChanged("completions"))
            await pilot.pause(0.02)
        await settle(pilot)
        assert len(loads) <= 2
        await wait_until(pilot, lambda: len(loads) >= 1, what="the trailing reload")


async def test_counts_agree_with_the_status_line_after_grades_and_undo(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("4", "5", "d", "u")
        await settle(pilot)

        def agree() -> bool:
            counts = str(screen.query_one("#review-counts").render())
            return "2 graded" in app.status_counts and "graded 2/12 · kept 2 · rejected 0" in counts

        await wait_until(pilot, agree, what="the two counts to agree")
        await pilot.press("a")
        await settle(pilot)
        await pilot.press("u")
        await settle(pilot)
        await wait_until(pilot, agree, what="the counts after auto-grade and its undo")


async def test_the_search_box_is_on_screen_and_shows_what_is_typed(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("slash", "L", "a", "g")
        await settle(pilot)
        box = screen.query_one("#review-search", Input)
        assert screen.focused is box and box.display and box.visible
        assert screen.region.contains_region(box.region) and box.region.height == 1
        assert not box.region.overlaps(screen.query_one(Footer).region)
        assert not box.region.overlaps(screen.list.region)
        assert "Lag" in "".join(s.text for s in box.render_line(0))
        await pilot.press("o", "s", "enter")
        await settle(pilot)
        assert not box.display and screen.query_one("#review-view").display
        assert "“Lagos”" in str(screen.query_one("#review-view").render())


async def test_the_detail_says_who_graded_in_words(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("a")
        await settle(pilot)
        await pilot.press("4", "k")
        await settle(pilot)
        await wait_until(pilot, lambda: "grade 4 by you" in str(screen.query_one("#review-detail-head").render()),
                         what="the grade in words")
        head = str(screen.query_one("#review-detail-head").render())
        assert "· was auto 1 by length" in head


# -- the grade history in words (pipeline) ------------------------------------------------------
def test_history_text_on_a_real_history(project: Path):
    with Store.open(project) as store:
        first, second = [r[0] for r in store.review_rows(where="done")][:2]
        assert review.history_text(store.grade_history(first)) == ""
        review.auto_grade(store)
        assert review.history_text(store.grade_history(first)) == "auto 1 by length"
        review.reject(store, first)
        review.reject(store, first)
        review.undo(store, review.UndoEntry([first], "reject"))
        assert review.history_text(store.grade_history(first)) == (
            "rejected by you · undone: rejected by you · was auto 1 by length")
        review.grade(store, second, 4)
        review.auto_grade(store)  # an automatic grade never overrides a person's
        assert review.history_text(store.grade_history(second)) == "grade 4 by you · was auto 1 by length"
        review.undo(store, review.UndoEntry([second], "grade 4"))
        assert review.history_text(store.grade_history(second)) == (
            "auto 1 by length · undone: grade 4 by you")
        review.undo(store, review.UndoEntry([second], "auto-grade"))
        assert review.history_text(store.grade_history(second)) == (
            "ungraded · undone: grade 4 by you · undone: auto 1 by length")  # newest first


def test_grade_words_for_every_source():
    assert review.grade_words(5, "person") == "grade 5 by you"
    assert review.grade_words(0, "person") == "rejected by you"
    assert review.grade_words(3, "by-length") == "auto 3 by length"
    assert review.grade_words(0, "dedup") == "auto-rejected as a near-duplicate"
    assert review.grade_words(2, "judge:gpt-x") == "auto 2 by judge gpt-x"


async def test_grades_changed_by_another_screen_reach_the_rows(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        target = screen.list.rows[3][0]
        with Store.open(project) as other:  # as another section screen would, through the pipeline
            review.reject(other, target)
        screen.post_message(ProjectChanged("grades", forwarded=True))  # the app's copy of its message
        await wait_until(pilot, lambda: screen.list.rows[screen.list.index_of(target)][2] == 0,
                         what="the rejection in the list")
        await wait_until(pilot, lambda: "rejected 1" in str(screen.query_one("#review-counts").render()),
                         what="the rejection in the counts")
