"""Snapshots of the grid and generate screens at 80x24, in the states a person looks at.

Update the baselines with ``pytest tests/test_snapshots_generate_grid.py --snapshot-update``
after looking at the new rendering. Nothing time-dependent is on screen: the
completions are fixed texts, a run's progress is a stored snapshot (its process
is this test's, so an active one counts as alive), the backend label is fixed,
the text cursor does not blink, and toasts are cleared unless they are the point.
"""

from __future__ import annotations

import os
import socket

import pytest

from gridtune.pipeline.generation import runs
from gridtune.pipeline.spec.grid import demo_spec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store
from gridtune.tui.app import GridtuneApp
from tests.test_tui_export import fill
from tests.test_tui_generate import small_spec
from tests.tui_helpers import steady

SIZE = (80, 24)


@pytest.fixture
def demo(tmp_path):
    path = tmp_path / "demo.gridtune"
    create_project(path, demo_spec()).close()
    return path


@pytest.fixture
def project(tmp_path):
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    return path


async def _steady(pilot, *, keep_toasts: bool = False) -> None:
    await steady(pilot, keep_toasts=keep_toasts)

def _run(path, state: str, progress: dict, *, error: str | None = None, pending_last: bool = True) -> int:
    """A run recorded by this process: active ("running") or ended with ``state``."""
    fill(path)
    with Store.open(path) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher-model",
                                 params={"temperature": 0.7, "max_tokens": 50, "concurrency": 4, "rpm": None,
                                         "tpm": None}, is_alive=runs.is_alive)
        if pending_last:  # one cell not done: the run is on it (running), or was (pending)
            status = "running" if state == "running" else "pending"
            store._conn.execute(f"UPDATE completions SET status = '{status}', run_id = ?, text = NULL, "
                                "grade = NULL WHERE id = (SELECT max(id) FROM completions)", (run_id,))
        progress = {"run_id": run_id, "state": state, "total": 4, **progress}
        store.heartbeat(run_id, progress)
        if state != "running":
            store.finish_run(run_id, state, error=error, progress=progress)
    return run_id


# -- grid ----------------------------------------------------------------------------


def test_grid_screen_on_the_demo_spec(snap_compare, demo):
    assert snap_compare(GridtuneApp(demo, start_mode="grid"), terminal_size=SIZE, run_before=_steady)


def test_grid_screen_with_an_inline_error(snap_compare, demo):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("end", *" {nope}")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(demo, start_mode="grid"), terminal_size=SIZE, run_before=before)


def test_grid_screen_with_unsaved_edits(snap_compare, demo):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("end", *" Keep it short.")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(demo, start_mode="grid"), terminal_size=SIZE, run_before=before)


def test_grid_screen_focus_moved_to_the_training_template(snap_compare, demo):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("tab")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(demo, start_mode="grid"), terminal_size=SIZE, run_before=before)


def test_help_from_the_grid_with_f1(snap_compare, demo):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("f1")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(demo, start_mode="grid"), terminal_size=SIZE, run_before=before)


# -- generate ------------------------------------------------------------------------


def test_generate_before_any_run_with_the_estimate(snap_compare, project):
    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=_steady)


def test_generate_options_form_open(snap_compare, project):
    async def before(pilot):
        await _steady(pilot)
        await pilot.press("o")
        await pilot.pause()
        await pilot.press("tab", "end", "backspace", *"0.7")
        await _steady(pilot)

    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=before)


def test_generate_run_in_progress(snap_compare, project):
    _run(project, "running", {"done": 3, "in_flight": 1, "requests_per_s": 1.5, "tokens_per_s": 42.0,
                              "cost_usd": 0.0012, "eta_s": 2.0, "elapsed_s": 75.0,
                              "estimate": "about 2 min on the local server"})
    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=_steady)


def test_generate_o_during_a_run_says_why(snap_compare, project):
    _run(project, "running", {"done": 3, "in_flight": 1, "requests_per_s": 1.5, "tokens_per_s": 42.0,
                              "elapsed_s": 75.0})

    async def before(pilot):
        await _steady(pilot)
        await pilot.press("o")
        await _steady(pilot, keep_toasts=True)

    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=before)


def test_generate_finished_run(snap_compare, project):
    _run(project, "finished", {"done": 4, "requests_per_s": 1.2, "tokens_per_s": 40.0, "cost_usd": 0.0016,
                               "elapsed_s": 200.0}, pending_last=False)
    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=_steady)


def test_generate_failed_run_with_retry_reasons(snap_compare, project):
    _run(project, "failed", {"done": 3, "failed": 0, "requests_per_s": 0.4, "tokens_per_s": 12.0,
                             "elapsed_s": 95.0, "retries": 7,
                             "retry_reasons": {"timeout": 4, "rate_limited": 2, "server_error": 1}},
         error="HTTP 500: the server fell over")
    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=_steady)


def test_generate_nothing_to_generate_notice(snap_compare, project):
    fill(project)

    async def before(pilot):
        await _steady(pilot)
        await pilot.press("s")
        await _steady(pilot, keep_toasts=True)

    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=before)
