"""Curation in the review screen (issue 9), driven by its keys: cut-off completions
marked, filtered and regenerated with more max tokens (one here, all as a detached
run); near-duplicates found, marked, jumped between, filtered, dropped and undone;
the coverage panel and its top-up run; the judge's agreement. Every assertion that
matters reads the project file; generation goes to the loopback fake server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from textual.widgets import Footer, Input

from gridtune.pipeline.curation import dedup, review
from gridtune.store import Store, curation as cur
from gridtune.tui.app import GridtuneApp
from gridtune.tui.commands import _palette_bindings
from gridtune.tui.screens.coverage_panel import CoveragePanel
from gridtune.tui.screens.review import ReviewScreen
from gridtune.tui.widgets.modals import AskModal, ConfirmModal

from .bigproject import small_project
from .tui_helpers import review_screen, settle, wait_until

CUT_TEXT = "Tokyo in 2030 was the first city where the systems began to plan the grid and then the " * 3
OTHER_CUT_TEXT = "Lagos answered with markets that priced every hour of compute, and its ministers argued over"


def curation_project(path: Path, *, find: bool = False, calibration: bool = False) -> Path:
    """The 16-cell small project: 12 finished as usual, then 3 cut off at max tokens 50
    (two of them near-copies of each other) and one near-copy of the first finished one."""
    small_project(path, done=12)
    with Store.open(path) as store:
        rows = store.review_rows(where="all", sort="grid")
        first = store.get_completion(rows[0][0])
        pending = [r[0] for r in rows if r[3] == "pending"]
        texts = [(CUT_TEXT, "length"), (OTHER_CUT_TEXT, "length"), (CUT_TEXT + "the end", "length"),
                 (first.text, "stop")]
        for cid, (text, finish) in zip(pending, texts, strict=True):
            store.save_done(cid, text=text, model="teacher-model", params={"max_tokens": 50}, prompt_tokens=20,
                            completion_tokens=50 if finish == "length" else 30, latency_s=1.0,
                            finish_reason=finish, attempts=1)
        if find:
            dedup.find_duplicates(store)
        if calibration:
            cur.record_calibration(store, "gpt-x", n=40, spearman=0.8, kappa=0.71, exact=0.55)
    return path


def cut_ids(path: Path) -> list[int]:
    with Store.open(path) as store:
        return [r[0] for r in store.review_rows(where="cut_off", sort="grid")]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return curation_project(tmp_path / "cur.gridtune")


def _app(path: Path) -> GridtuneApp:
    return GridtuneApp(path, start_mode="review")


def _text(screen, selector: str) -> str:
    return str(screen.query_one(selector).render())


async def _previews(pilot, screen) -> dict:
    """The list's previews of its rows, once fetched (the marks come with them)."""
    lst = screen.list
    await wait_until(pilot, lambda: all(r[0] in lst._previews and lst._previews[r[0]][0] == lst._generation
                                        for r in lst.rows[: lst.size.height]), what="the previews")
    return {cid: p for cid, (_g, p) in lst._previews.items()}


async def _answer(pilot, value: str | None) -> None:
    """Type ``value`` into the open AskModal (None: escape)."""
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, AskModal), what="the question")
    if value is None:
        await pilot.press("escape")
    else:
        pilot.app.screen.query_one(Input).value = value
        await pilot.press("enter")
    await settle(pilot)


# -- cut off --------------------------------------------------------------------------------
async def test_cut_off_completions_are_marked_counted_filtered_and_explained(project: Path):
    cut = set(cut_ids(project))
    assert len(cut) == 3
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        assert "3 cut off" in _text(screen, "#review-curation")
        previews = await _previews(pilot, screen)
        assert {cid for cid, p in previews.items() if p.cut_off} == cut & set(previews)
        screen.set_filter("cut_off")
        await settle(pilot)
        assert {r[0] for r in screen.list.rows} == cut
        assert "f cut off" in _text(screen, "#review-view")
        await pilot.pause(0.2)
        await settle(pilot)
        assert "cut off at max tokens: 50 tokens" in _text(screen, "#review-detail-head")


async def test_R_regenerates_the_selected_completion_with_more_max_tokens(project: Path, fake_openai):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        screen.set_filter("cut_off")
        await settle(pilot)
        target = screen.list.current[0]
        await pilot.press("R")
        await wait_until(pilot, lambda: isinstance(app.screen, AskModal), what="the max tokens question")
        assert app.screen.query_one(Input).value == "100"  # twice the 50 they were cut off at
        await _answer(pilot, "100")
        with Store.open(project) as store:
            await wait_until(pilot, lambda: not store.get_completion(target).cut_off, what="the redo")
            record = store.get_completion(target)
        assert record.finish_reason == "stop" and record.params["max_tokens"] == 100
        assert fake_openai.chat_requests()[-1].body["max_tokens"] == 100
        # A detached run (it outlives the app), recorded as any run; the review stays and says
        # what the run came to.
        with Store.open(project) as store:
            run = store.latest_run()
            assert run is not None and run.pid != os.getpid()
        assert app.current_mode == "review"
        await wait_until(pilot, lambda: any(f"#{target} regenerated" in n.message for n in app._notifications),
                         what="the redo's outcome")
        # The row follows through ProjectChanged: no longer in the cut-off view, and counted.
        await wait_until(pilot, lambda: target not in {r[0] for r in screen.list.rows}, what="the row to leave")
        await wait_until(pilot, lambda: "2 cut off" in _text(screen, "#review-curation"), what="the recount")
    assert len(cut_ids(project)) == 2


async def test_R_refuses_a_bad_max_tokens_and_sends_nothing(project: Path, fake_openai):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        screen.set_filter("cut_off")
        await settle(pilot)
        await pilot.press("R")
        await _answer(pilot, "lots")
        assert any("max tokens" in n.message for n in app._notifications)
        assert isinstance(app.screen, ReviewScreen)
    assert not fake_openai.chat_requests()
    assert len(cut_ids(project)) == 3


async def test_C_starts_a_detached_run_that_redoes_every_cut_off_one(project: Path, fake_openai):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("C")
        await _answer(pilot, "200")
        await wait_until(pilot, lambda: app.current_mode == "generate", what="the generate screen")
        with Store.open(project) as store:
            run = store.latest_run()
            assert run is not None
            await wait_until(pilot, lambda: not store.get_run(run.id).active, timeout=60, what="the run")
    assert cut_ids(project) == []
    assert {r.body["max_tokens"] for r in fake_openai.chat_requests()} == {200}
    assert len(fake_openai.chat_requests()) == 3


# -- near-duplicates -------------------------------------------------------------------------
async def test_D_asks_the_threshold_refuses_a_bad_one_and_keeps_the_one_used(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("D")
        await _answer(pilot, "1.5")
        assert any("threshold must be in (0, 1]" in n.message for n in app._notifications)
        with Store.open(project) as store:
            assert dedup.latest_pass(store) is None  # nothing ran
        await pilot.press("D")
        await _answer(pilot, "0.3")
        with Store.open(project) as store:
            await wait_until(pilot, lambda: dedup.latest_pass(store) is not None, what="the pass")
            assert dedup.latest_pass(store)["threshold"] == 0.3
        await wait_until(pilot, lambda: "dups/" in _text(screen, "#review-curation"), what="the counts")
        await pilot.press("D")  # the next question offers the threshold last used
        await wait_until(pilot, lambda: isinstance(app.screen, AskModal), what="the question")
        assert app.screen.query_one(Input).value == "0.3"


async def test_D_finds_near_duplicates_t_jumps_to_the_twin_and_the_filter_groups_them(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        assert "D finds near-dups" in _text(screen, "#review-curation")
        await pilot.press("D")
        await wait_until(pilot, lambda: isinstance(app.screen, AskModal), what="the threshold question")
        assert app.screen.query_one(Input).value == "0.8"  # the default, before any pass
        await pilot.press("enter")
        await settle(pilot)
        await wait_until(pilot, lambda: "4 dups/2 groups" in _text(screen, "#review-curation"),
                         what="the dedup counts")  # shortened to fit 80 columns beside "3 cut off"
        with Store.open(project) as store:
            groups = list(cur.dup_groups(store).values())
        assert sorted(len(g) for g in groups) == [2, 2]
        previews = await _previews(pilot, screen)
        assert {cid for cid, p in previews.items() if p.dup_size == 2} == {c for g in groups for c in g} & set(previews)
        a, b = groups[0]
        screen.list.set_cursor(screen.list.index_of(a))
        await pilot.press("t")
        await settle(pilot)
        assert screen.list.current[0] == b
        await pilot.pause(0.2)
        await settle(pilot)
        assert f"near-duplicate of #{a}" in _text(screen, "#review-detail-head")
        screen.set_filter("duplicates")
        await settle(pilot)
        listed = [r[0] for r in screen.list.rows]
        assert sorted(listed) == sorted(c for g in groups for c in g)
        for group in groups:  # each group's members side by side
            i = listed.index(group[0])
            assert set(listed[i - 1:i + 1]) == set(group) or set(listed[i:i + 2]) == set(group)


async def test_X_drops_near_duplicates_keeping_the_best_graded_and_u_undoes(tmp_path: Path):
    path = curation_project(tmp_path / "d.gridtune", find=True)
    with Store.open(path) as store:
        groups = list(cur.dup_groups(store).values())
        finished = [g for g in groups if not any(store.get_completion(c).cut_off for c in g)][0]
    app = _app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        # The person grades one of the finished pair 2 and the other 5: 5 is kept.
        for cid, grade in zip(finished, (2, 5), strict=True):
            screen.list.set_cursor(screen.list.index_of(cid))
            await pilot.press(str(grade))
            await settle(pilot)
        await pilot.press("X")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        assert "2 near-duplicate group(s)" in str(app.screen.query_one("Static").render())
        await pilot.press("y")
        await settle(pilot)
        with Store.open(path) as store:
            rejected = {c for c in (x for g in groups for x in g) if store.get_completion(c).grade == 0}
            # A person's grades are left alone: only the cut-off pair loses one, as "dedup".
            assert len(rejected) == 1 and store.grade_history(rejected.pop())[-1].source == "dedup"
            assert [store.get_completion(c).grade for c in finished] == [2, 5]
        await pilot.press("u")
        await settle(pilot)
    with Store.open(path) as store:
        assert not any(store.get_completion(c).grade == 0 for g in groups for c in g)


# -- coverage --------------------------------------------------------------------------------
async def test_v_opens_the_coverage_panel_and_T_starts_a_top_up_run(project: Path, fake_openai):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("v")
        panel = screen.query_one(CoveragePanel)
        await wait_until(pilot, lambda: panel.coverage is not None, what="the coverage")
        assert panel.display and not screen.query_one("#review-body").display
        text = str(panel.query_one("#coverage-text").render())
        assert "13 kept over 16 cells" in text and "place × year" in text
        assert "–" in text  # the cut-off cells are empty pairs
        assert screen.focused is panel
        await pilot.press("4")  # the list's keys do nothing while it is hidden
        await settle(pilot)
        with Store.open(project) as store:
            assert store.status_counts().graded == 0
            before = len(store.review_rows(where="all"))
        await pilot.press("T")
        await _answer(pilot, "1")
        await wait_until(pilot, lambda: app.current_mode == "generate", what="the generate screen")
        with Store.open(project) as store:
            run = store.latest_run()
            await wait_until(pilot, lambda: not store.get_run(run.id).active, timeout=60, what="the top-up run")
            after = len(store.review_rows(where="all"))
    assert after - before == 3  # one new sample for each of the three empty place × year pairs
    from gridtune.pipeline.curation.coverage import coverage

    with Store.open(project) as store:
        assert not coverage(store, threshold=1).empty()


async def test_v_again_closes_the_panel_and_the_list_has_the_keys_again(project: Path):
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)
        await pilot.press("v")
        await settle(pilot)
        await pilot.press("v")
        await settle(pilot)
        assert screen.focused is screen.list and screen.query_one("#review-body").display
        await pilot.press("4")
        await settle(pilot)
    with Store.open(project) as store:
        assert store.status_counts().graded == 1


# -- the judge, the keys -----------------------------------------------------------------------
async def test_the_judges_agreement_is_shown_beside_the_counts(tmp_path: Path):
    path = curation_project(tmp_path / "j.gridtune", calibration=True)
    app = _app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "judge gpt-x: κ 0.71, ρ 0.80, n 40" in _text(review_screen(app), "#review-curation")


def test_calibration_words():
    class Cal:
        model, n, spearman, kappa = "m", 3, None, 0.5

    assert review.calibration_words(Cal()) == "judge m: κ 0.50, ρ –, n 3"
    assert review.calibration_words(None) == ""


async def test_the_new_keys_are_in_the_palette_and_the_sections_stay_on_screen(project: Path):
    actions = {b.action for b in _palette_bindings(ReviewScreen)}
    assert {"redo", "redo_cut_off", "twin", "dedup", "drop_duplicates", "coverage", "top_up"} <= actions
    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        # The sections' keys are on the status line's tab bar (the footer's room, at 80
        # columns, goes to the screen's own keys and f1 help: issue 21).
        tabs = str(app.screen.query_one("StatusLine").render())
        for key in ("F2", "F3", "F4", "F5", "F6", "F7"):
            assert key in tabs
        footer = app.screen.query_one(Footer)
        shown = " ".join(str(w.render()) for w in footer.query("FooterKey"))
        assert "f1" in shown and "reject" in shown


async def test_a_worker_that_fails_is_said_in_one_line_by_the_sections_handler(project: Path):
    """Workers do not catch every error themselves: SectionScreen.on_worker_state_changed
    says what reaches it in one line, and the app goes on."""
    from gridtune.core.errors import GridtuneError

    app = _app(project)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = review_screen(app)

        def fail() -> None:
            raise GridtuneError("a run is already active on this project\nwith a second line")

        screen.run_worker(fail, thread=True, exit_on_error=False, group="review-run")
        await wait_until(pilot, lambda: any("already active" in n.message for n in app._notifications),
                         what="the error notice")
        said = [n for n in app._notifications if "already active" in n.message]
        assert [n.message for n in said] == ["a run is already active on this project"]
        assert said[0].severity == "error" and app.is_running
