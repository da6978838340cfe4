"""Snapshots of the export & fine-tune screen and the playground at 80x24.

Update the baselines with ``pytest tests/test_snapshots_export_playground.py --snapshot-update``
after looking at the new rendering. Nothing time-dependent is on screen: the
completions are fixed texts, paths are relative to the test's directory, the
backend label is fixed, a job's state is posted as the JobTracker would post it,
and replies come from a deterministic streaming fake.
"""

from __future__ import annotations

import pytest

from gridtune.pipeline.format.validate import validate_examples
from gridtune.pipeline.spec.project import create_project
from gridtune.pipeline.training.finetune import JobState
from gridtune.store import Store
from gridtune.tui.app import GridtuneApp
from gridtune.tui.screens.export import JobChanged
from tests.test_tui_export import fill
from tests.test_tui_generate import small_spec
from tests.test_tui_playground import fake, streaming_server  # noqa: F401 - fixtures
from tests.tui_helpers import settle, steady, wait_until

SIZE = (80, 24)
LOSSES = [2.5, 2.1, 1.8, 1.5, 1.3, 1.1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths show relative, so the report is stable
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    return path


def export_file(project, fmt="chat"):
    from gridtune.pipeline.training.export import export_project

    with Store.open(project) as store:
        return export_project(store, project.with_suffix(".jsonl"), format=fmt)


def record_job(project, status="succeeded", tuned="ft:fake-model:tiny:9", export_id=None):
    with Store.open(project) as store:
        store.record_job(id="ftjob-9", base_url=None, model="fake-model", training_file="file-1",
                         validation_file=None, export_id=export_id, status="running")
        store.update_job("ftjob-9", status=status, fine_tuned_model=tuned)


async def _steady(pilot) -> None:
    await steady(pilot)

def export_app(project):
    return GridtuneApp(project, start_mode="export")


# -- export & fine-tune -----------------------------------------------------------------

def test_export_empty_project(snap_compare, project):
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_steady)


def test_export_before_any_export_with_graded_data(snap_compare, project):
    fill(project)
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_steady)


def test_export_after_an_export_report_with_a_warning(snap_compare, project):
    fill(project)

    async def before(pilot):
        await _steady(pilot)
        screen = pilot.app.screen
        await pilot.press("e")
        await wait_until(pilot, lambda: screen.export is not None and not screen.busy, what="the export")
        await _steady(pilot)

    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=before)


def test_export_report_with_errors(snap_compare, project):
    fill(project)
    bad = validate_examples([{"messages": [{"role": "user", "content": "Place: Oslo. Year: 2030."}]},
                             {"messages": "not a list"}, {"prompt": 1}] + [{"messages": []}] * 3)
    bad.path = str(project.with_name("bad.jsonl"))
    with Store.open(project) as store:
        store.record_export(path=bad.path, valid_path=None, format="chat", min_grade=None, separator=None,
                            stop=None, validation_fraction=0.0, n_train=6, n_valid=0, report=bad.to_dict())
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_steady)


def test_export_options_form_open(snap_compare, project):
    fill(project)

    async def before(pilot):
        await _steady(pilot)
        await pilot.press("o", "enter", "down", "enter", "tab", "3")  # completion, min grade 3
        await settle(pilot)

    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=before)


def _with_job(state: JobState):
    async def before(pilot):
        await _steady(pilot)
        screen = pilot.app.screen
        await wait_until(pilot, lambda: screen.export is not None, what="the export")
        screen.post_message(JobChanged(state))
        await _steady(pilot)

    return before


def test_export_job_running_with_the_loss_chart(snap_compare, project):
    fill(project)
    export_file(project)
    state = JobState(id="ftjob-test", status="running", model="base-model",
                     events=("Step 6/8: training loss=1.1000, validation loss=1.3000",), steps=(1, 2, 3, 4, 5, 6),
                     losses=tuple(LOSSES), valid_steps=(3, 6), valid_losses=(1.9, 1.3), total_steps=8)
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_with_job(state))


def test_export_job_succeeded(snap_compare, project):
    fill(project)
    export_file(project)
    state = JobState(id="ftjob-test", status="succeeded", model="base-model",
                     fine_tuned_model="ft:base-model:local::ftjob-test", events=("New fine-tuned model created",),
                     steps=tuple(range(1, 9)), losses=tuple(LOSSES + [1.0, 0.95]), total_steps=8)
    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=_with_job(state))


def test_export_job_failed_with_its_one_line_error(snap_compare, project):
    fill(project)
    export_file(project)
    record_job(project, status="failed", tuned=None)
    with Store.open(project) as store:
        store.update_job("ftjob-9", status="failed", error="Out of memory while training step 3 (batch of 4)")

    async def before(pilot):
        await _steady(pilot)
        screen = pilot.app.screen
        await wait_until(pilot, lambda: screen.job.status == "failed", what="the failed job")
        await _steady(pilot)

    assert snap_compare(export_app(project), terminal_size=SIZE, run_before=before)


# -- playground ------------------------------------------------------------------------

def playground_app(project):
    return GridtuneApp(project, start_mode="playground")


async def _playground_ready(pilot, models_in_a: str = "") -> None:
    await _steady(pilot)
    screen = pilot.app.screen
    await wait_until(pilot, lambda: screen.spec is not None and screen.models, what="the playground")
    if models_in_a:
        await wait_until(pilot, lambda: screen.query_one("#pg-model-a").value == models_in_a, what="model A")
    await _steady(pilot)


def test_playground_empty_no_export(snap_compare, project, fake):
    fill(project)
    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=_playground_ready)


def test_playground_follows_a_completion_export_with_tuned_and_base(snap_compare, project, fake):
    fill(project)
    result = export_file(project, "completion")
    record_job(project, export_id=result.export_id)

    async def before(pilot):
        await _playground_ready(pilot, "ft:fake-model:tiny:9")

    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=before)


def test_playground_replies_side_by_side(snap_compare, project, fake):
    fill(project)
    result = export_file(project, "completion")
    record_job(project, export_id=result.export_id)
    fake.reply = "Oslo in 2060 runs on quiet power and the harbour hums."

    async def before(pilot):
        await _playground_ready(pilot, "ft:fake-model:tiny:9")
        screen = pilot.app.screen
        await pilot.press("r")
        await wait_until(pilot, lambda: len(screen._streams) == 2
                         and all(s.get("done") for s in screen._streams.values()), what="both replies")
        await _steady(pilot)

    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=before)


def test_playground_with_a_repeating_reply(snap_compare, project, fake):
    fill(project)
    fake.reply = "In 2050 Tokyo hums. The city grew. The city grew. The city grew. The city grew and grew."

    async def before(pilot):
        await _playground_ready(pilot)
        screen = pilot.app.screen
        screen.query_one("#pg-max_tokens").value = "14"
        await pilot.press("r")
        await wait_until(pilot, lambda: screen._streams.get("a", {}).get("done"), what="the reply")
        await _steady(pilot)

    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=before)


def test_playground_model_picker(snap_compare, project, fake):
    fill(project)
    record_job(project)

    async def before(pilot):
        await _playground_ready(pilot, "ft:fake-model:tiny:9")
        await pilot.press("b")
        await settle(pilot)

    assert snap_compare(playground_app(project), terminal_size=SIZE, run_before=before)
