"""Snapshots of the generate screen at 80x24 (export and playground: test_snapshots_export_playground.py).

Update the baselines with ``pytest tests/test_snapshots_other.py --snapshot-update``
after looking at the new rendering. Nothing time-dependent is on screen: the
completions are fixed texts, the run's progress is a stored snapshot (its
process is this test's, so it counts as alive), the backend label is fixed and
the replies come from a deterministic streaming fake.
"""

from __future__ import annotations

import os
import socket

import pytest

from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store, runlock
from gridtune.tui.app import GridtuneApp
from tests.test_tui_export import fill
from tests.test_tui_generate import small_spec
from tests.tui_helpers import settle, steady

SIZE = (80, 24)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # export paths stay relative, so the report is stable
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    return path


async def _steady(pilot) -> None:
    await steady(pilot)

def test_generate_screen_attached_to_a_running_run(snap_compare, project):
    fill(project)
    with Store.open(project) as store:
        # one cell back to pending: a run is going on it
        store._conn.execute("UPDATE completions SET status = 'pending', text = NULL, grade = NULL WHERE id = "
                            "(SELECT max(id) FROM completions)")
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher-model",
                                 params={}, is_alive=runlock.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 4, "done": 3, "in_flight": 1,
                                 "requests_per_s": 1.5, "tokens_per_s": 42.0, "cost_usd": 0.0012,
                                 "eta_s": 2.0, "elapsed_s": 75.0})
    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=_steady)


def test_generate_screen_with_a_bad_setting(snap_compare, project):
    async def before(pilot):
        await _steady(pilot)
        pilot.app.screen.query_one("#set-temperature").value = "9"
        await pilot.press("s")
        await settle(pilot)

    assert snap_compare(GridtuneApp(project, start_mode="generate"), terminal_size=SIZE, run_before=before)
