"""The export & fine-tune screen, driven by its keys; checked in the project file,
the written JSONL and (for fine-tuning) a real local server with a tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gridtune.pipeline.spec.project import create_project
from gridtune.pipeline.training.finetune import JobState, JobTracker
from gridtune.store import Store
from gridtune.tui.screens.export import ExportOptions, ExportScreen, fit_path
from tests.server_support import varied_model_dir  # noqa: F401 - fixture
from tests.test_tui_generate import HostApp, small_spec


def fill(path, texts=None):
    """Mark every completion done (varied lengths) and grade them by hand."""
    with Store.open(path) as store:
        for i, item in enumerate(store.pending_work()):
            text = (texts or {}).get(i) or f"Scenario {i}: " + "the grid city changes. " * (i + 1)
            store.save_done(item.completion_id, text=text, model="teacher", params={}, prompt_tokens=5,
                            completion_tokens=len(text.split()), latency_s=0.1, finish_reason="stop", attempts=1)
            store.set_grade(item.completion_id, 1 + i % 5)


@pytest.fixture
def project(tmp_path):
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    fill(path)
    return path


async def wait_for(pilot, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await pilot.pause(0.1)
    return predicate()


def test_options_parse():
    opts = ExportOptions.parse({"format": "completion", "min_grade": "3", "separator": "\\n###\\n",
                                "stop": " END", "validation_fraction": "0.25", "out_path": "/tmp/x.jsonl",
                                "base_model": "", "epochs": "2", "suffix": ""}, default_path=None)
    assert opts.separator == "\n###\n" and opts.stop == " END" and opts.min_grade == 3
    assert opts.validation_fraction == 0.25 and opts.epochs == 2 and opts.base_model is None
    with pytest.raises(ValueError, match="min grade"):
        ExportOptions.parse({"min_grade": "9"}, default_path="/tmp/x.jsonl")
    with pytest.raises(ValueError, match="validation fraction"):
        ExportOptions.parse({"validation_fraction": "1.5"}, default_path="/tmp/x.jsonl")


# Events and polls as the local server hands them out for a two-step job with a validation file
# (recorded from a real job; see server/train.py and server/jobs.py for where each comes from).
RECORDED_EVENTS = [
    {"id": "ftevent-1", "object": "fine_tuning.job.event", "created_at": 1, "level": "info",
     "message": "Created fine-tuning job: ftjob-rec", "type": "message", "data": None},
    {"id": "ftevent-2", "object": "fine_tuning.job.event", "created_at": 2, "level": "info",
     "message": "Step 1/2: training loss=2.5000", "type": "metrics",
     "data": {"step": 1, "total_steps": 2, "train_loss": 2.5, "valid_loss": None, "epoch": 1, "tokens_per_s": 9.0}},
    {"id": "ftevent-3", "object": "fine_tuning.job.event", "created_at": 3, "level": "info",
     "message": "Step 2/2: training loss=1.7500, validation loss=1.9000", "type": "metrics",
     "data": {"step": 2, "total_steps": 2, "train_loss": 1.75, "valid_loss": 1.9, "epoch": 1, "tokens_per_s": 9.5}},
    {"id": "ftevent-4", "object": "fine_tuning.job.event", "created_at": 4, "level": "info",
     "message": "Epoch 1/1 done", "type": "message", "data": {"epoch": 1, "step": 2}},
]


def _job(status, fine_tuned_model=None, error=None):
    from openai.types.fine_tuning import FineTuningJob

    return FineTuningJob.model_validate({
        "id": "ftjob-rec", "object": "fine_tuning.job", "created_at": 1, "model": "base-model",
        "organization_id": "local", "result_files": [], "seed": 0, "status": status, "training_file": "file-1",
        "validation_file": None, "fine_tuned_model": fine_tuned_model, "finished_at": None,
        "hyperparameters": {"n_epochs": 1}, "trained_tokens": None,
        "error": {"code": "job_failed", "message": error, "param": None} if error else None,
    })


def test_job_tracker_folds_events_and_records_each_status_change(project):
    from openai.types.fine_tuning import FineTuningJobEvent

    with Store.open(project) as store:
        store.record_job(id="ftjob-rec", base_url=None, model="base-model", training_file="file-1",
                         validation_file=None, export_id=None, status="validating_files")
        tracker = JobTracker("ftjob-rec", model="base-model", store=store)
        assert tracker.on_job(_job("running")) is True  # a new status: recorded
        for event in RECORDED_EVENTS:
            tracker.on_event(FineTuningJobEvent.model_validate(event))
        assert tracker.on_job(_job("running")) is False  # nothing new to record
        state = tracker.state
        assert state.steps == (1.0, 2.0) and state.losses == (2.5, 1.75)
        assert state.valid_steps == (2.0,) and state.valid_losses == (1.9,) and state.total_steps == 2
        assert state.message == "Epoch 1/1 done" and len(state.events) == 4
        assert store.jobs()[0].status == "running"
        assert tracker.on_job(_job("failed", error="Out of memory\nTraceback (most recent call last): ...")) is True
        record = store.jobs()[0]
    assert tracker.state.finished and tracker.state.error == "Out of memory"  # one line, as recorded
    assert record.status == "failed" and record.error == "Out of memory"
    assert JobState.from_record(record) == JobState(id="ftjob-rec", status="failed", model="base-model",
                                                    error="Out of memory")


def test_fit_path_is_relative_when_shorter_else_elided_in_the_middle(tmp_path):
    inside = tmp_path / "data" / "tiny.jsonl"
    assert fit_path(inside, 40, cwd=tmp_path) == "data/tiny.jsonl"
    long = Path("/very/long/directory/name/for/the/user/data/of/gridtune/demo.jsonl")
    shown = fit_path(long, 30, cwd="/elsewhere/entirely/somewhere/deep/inside/a/tree")
    assert len(shown) == 30 and shown.endswith("gridtune/demo.jsonl") and "…" in shown
    assert fit_path(long, 200, cwd="/") == str(long).lstrip("/")


async def test_export_from_keys_writes_the_file_and_records_it(project, tmp_path):
    out = tmp_path / "train.jsonl"
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        await pilot.press("o")  # into the options: format first
        await pilot.press("enter", "down", "enter")  # open the select, pick "completion"
        await pilot.press("tab")
        await pilot.press(*"2")  # min grade 2
        for _ in range(4):
            await pilot.press("tab")  # separator, stop, valid frac -> output
        out_input = screen.query_one("#opt-out_path")
        assert out_input.has_focus
        out_input.value = ""
        await pilot.press(*str(out))
        await pilot.press("escape", "e")
        assert await wait_for(pilot, lambda: screen.export is not None)
        report = str(screen.query_one("#exp-report").render())
        assert "No errors found." in report and "export #1 · completion · 3 train" in report
        assert "train.jsonl\n" in report  # the file name is never the part cut off
        assert screen.check_action("finetune", ()) is True
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(set(x) == {"prompt", "completion"} for x in lines)
    with Store.open(project) as store:
        export = store.latest_export()
    assert export.path == str(out.resolve()) and export.format == "completion" and export.min_grade == 2
    assert export.stop and lines[0]["completion"].endswith(export.stop)


async def test_the_whole_report_is_reachable_by_keys_at_80x24(project, tmp_path):
    """The cost estimate and the verdict sit below the report's box: pgdn brings them in view."""
    from tests.tui_helpers import wait_until

    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#opt-out_path").value = str(tmp_path / "train.jsonl")
        await pilot.press("e")
        await wait_until(pilot, lambda: screen.result is not None, what="the export")
        box, job = screen.query_one("#exp-report-box"), screen.query_one("#exp-job")
        await wait_until(pilot, lambda: box.max_scroll_y > 0 and job.border_title, what="the hint")
        assert "pgdn" in job.border_title and box.scroll_y == 0
        for _ in range(10):
            await pilot.press("pagedown")
        await wait_until(pilot, lambda: box.scroll_y == box.max_scroll_y, what="the report's end")
        assert box.scroll_y > 0 and "start of the report" in job.border_title
        await pilot.press("pageup")
        await wait_until(pilot, lambda: box.scroll_y < box.max_scroll_y, what="scrolling back")


async def test_export_error_is_inline_and_writes_nothing(project, tmp_path):
    out = tmp_path / "nowhere" / "train.jsonl"
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#opt-out_path").value = str(out)
        await pilot.press("e")
        assert await wait_for(pilot, lambda: screen.query_one("#exp-error").display)
        assert "no such directory" in str(screen.query_one("#exp-error").render())
        assert screen.check_action("finetune", ()) is None  # shown, greyed: no good export
    with Store.open(project) as store:
        assert store.latest_export() is None


async def test_refused_job_is_one_clear_message(project, tmp_path, fake_openai):
    # The fake server has no files endpoint: the upload is refused with a 404.
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        screen.query_one("#opt-out_path").value = str(tmp_path / "t.jsonl")
        screen.query_one("#opt-base_model").value = "fake-model"
        await pilot.press("e")
        assert await wait_for(pilot, lambda: screen.result is not None)
        await pilot.press("f")
        assert await wait_for(pilot, lambda: screen.job.status == "refused")
        status = str(screen.query_one("#exp-job-status").render())
        assert "404" in status and "\n" in status  # status line, then the one-line reason
        assert screen.busy is None and screen.check_action("playground", ()) is False
    with Store.open(project) as store:
        assert store.jobs() == []  # nothing recorded for a job that never started


@pytest.mark.local
async def test_finetune_on_the_local_server_follows_to_the_playground(project, tmp_path, monkeypatch,
                                                                      varied_model_dir):
    from tests.server_support import InProcessServer

    with InProcessServer(varied_model_dir, tmp_path / "srv") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "not-needed")
        app = HostApp(project, ExportScreen)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            screen = app.screen
            screen.poll_s = 0.2
            screen.query_one("#opt-out_path").value = str(tmp_path / "t.jsonl")
            screen.query_one("#opt-base_model").value = server.model
            screen.query_one("#opt-epochs").value = "1"
            await pilot.press("e")
            assert await wait_for(pilot, lambda: screen.result is not None)
            await pilot.press("f")
            assert await wait_for(pilot, lambda: screen.job.status in ("succeeded", "failed", "cancelled"),
                                  timeout=240), screen.job
            assert screen.job.status == "succeeded", screen.job.error
            await pilot.pause(0.3)
            assert screen.job.losses  # the loss chart has points
            await pilot.press("p")
            assert app.playground_calls == [{"model": screen.job.fine_tuned_model}]
        with Store.open(project) as store:
            job = store.jobs()[-1]
        assert job.status == "succeeded" and job.fine_tuned_model == screen.job.fine_tuned_model


async def test_header_follows_changes_another_process_makes_while_shown(project):
    """The header read "129 done · 2 graded" while the project had 256/256: it re-reads the
    store on every change, here a grade and a rejection made through another connection."""
    from gridtune.tui.app import GridtuneApp
    from tests.tui_helpers import wait_until

    app = GridtuneApp(project, start_mode="export")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        title = lambda: str(screen.query_one("#exp-title").render())  # noqa: E731
        await wait_until(pilot, lambda: "4 done · 4 kept · 0 rejected" in title(), what="the header")
        with Store.open(project) as other:
            ids = [row[0] for row in other._conn.execute("SELECT id FROM completions ORDER BY id")]
            other.set_grade(ids[0], 0)  # 0 rejects
        await wait_until(pilot, lambda: "3 kept · 1 rejected" in title(), what="the header to follow the file")


async def test_the_default_output_is_beside_the_project(project, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert screen.query_one("#opt-out_path").value == "../tiny.jsonl"  # relative: shorter
        await pilot.press("e")
        assert await wait_for(pilot, lambda: screen.export is not None)
    assert (tmp_path / "tiny.jsonl").is_file()
    with Store.open(project) as store:
        assert store.latest_export().path == str(tmp_path / "tiny.jsonl")
