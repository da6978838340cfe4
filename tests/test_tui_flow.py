"""The app's data flow: changes by another process reach every screen, the status
line fits, the footer is clean at 60 columns, and quitting says what goes on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from rich.console import Console

from gridtune.pipeline.generation import runs
from gridtune.store import Store
from gridtune.tui.app import GridtuneApp, goes_on_note
from gridtune.tui.context import ProjectContext
from gridtune.tui.events import ProjectChanged
from gridtune.tui.widgets.status import StatusLine, fit_backend_label

from .bigproject import small_project
from .tui_helpers import settle, wait_until


def _finish_one_more(path: Path) -> None:
    """Another process (here: another connection) finishes a pending completion."""
    with Store.open(path) as other:
        cid = next(cid for cid, _length, _grade, status, *_ in other.review_rows(sort="grid") if status == "pending")
        other.save_done(cid, text="Written by a detached run. " * 5, model="teacher-model", params={},
                        prompt_tokens=10, completion_tokens=30, latency_s=0.5, finish_reason="stop", attempts=1)


async def test_a_change_by_another_process_reaches_the_status_line(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path, start_mode="export")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await wait_until(pilot, lambda: "5 done" in app.status_counts, what="the first count")
        _finish_one_more(path)
        # No key pressed: the app's poll of data_version notices the other connection.
        await wait_until(pilot, lambda: "6 done" in app.status_counts,
                         what=f"the count after an external change (status: {app.status_counts!r})")


async def test_a_change_reaches_hidden_screens_when_they_are_shown(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path, start_mode="review")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("f5")  # the export screen; review is now hidden
        await settle(pilot)
        review = app.get_screen_stack("review")[0]
        seen: list[frozenset[str]] = []
        original = review.refresh_from_project
        review.refresh_from_project = lambda what: (seen.append(what), original(what))  # type: ignore[method-assign]
        app.post_message(ProjectChanged("grades"))
        await settle(pilot)
        assert seen == []  # hidden: nothing done yet
        await pilot.press("f4")
        await settle(pilot)
        assert seen == [frozenset({"grades"})]  # caught up once, when shown


def test_backend_label_fits_without_being_cut_at_the_end():
    label = "local server http://127.0.0.1:34567"
    assert fit_backend_label(label, 40) == label
    assert fit_backend_label(label, 30) == "local server 127.0.0.1:34567"
    assert fit_backend_label(label, 14) == "local :34567"
    assert fit_backend_label(label, 4) == ""
    assert fit_backend_label("local server (starts on demand)", 20) == "local (not started)"
    far = fit_backend_label("https://my-resource.openai.azure.com/openai/deployments/gpt", 30)
    assert len(far) == 30 and far.startswith("my-resource") and far.endswith("ployments/gpt") and "…" in far


async def test_status_line_at_80_columns_shows_counts_and_the_whole_backend(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    app = GridtuneApp(path, start_mode="review")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.status_counts = "256 cells · 250 done · 3 failed · 256 graded · 6 to do"
        app.backend_label = "local server http://127.0.0.1:34567"
        line = app.screen.query_one(StatusLine).render()
        console = Console(width=80, record=True)
        console.print(line)
        second = console.export_text().splitlines()[1]
        assert len(second.rstrip()) <= 80
        assert "250 done" in second and second.rstrip().endswith(":34567") and "…" not in second


async def test_q_during_a_run_says_the_run_goes_on(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    with Store.open(path) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher-model",
                                 params={}, is_alive=runs.is_alive)
    ctx = ProjectContext.open(path)
    try:
        note = goes_on_note(ctx)
    finally:
        ctx.close()
    assert note is not None and f"run #{run_id} goes on" in note and "5/16 done" in note
    assert f"gridtune status {path} --watch" in note
    app = GridtuneApp(path, start_mode="review")
    said: list[object] = []
    exit_app = app.exit
    app.exit = lambda *a, **kw: (said.append(kw.get("message")), exit_app(*a, **kw))  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("q")
        await pilot.pause()
    # Printed on the terminal after the app is gone: the last thing the person sees.
    assert said and "goes on in the background" in str(said[-1])
    with Store.open(path) as store:
        assert store.get_run(run_id).state == "running"  # quitting the TUI never stops a run


def test_no_run_no_note(tmp_path: Path):
    path = small_project(tmp_path / "p.gridtune", done=5)
    ctx = ProjectContext.open(path)
    try:
        assert goes_on_note(ctx) is None
    finally:
        ctx.close()
