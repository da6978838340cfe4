"""The export & fine-tune screen, driven by its keys; checked in the project file,
the written JSONL and (for fine-tuning) a real local server with a tiny model."""

from __future__ import annotations

import json
import time

import pytest

from gridtune.pipeline.project import create_project
from gridtune.screens.export import ExportOptions, ExportScreen, _apply_update, JobView
from gridtune.store import Store
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


def test_job_updates_fold_into_the_view():
    view = JobView(id="ftjob-1")
    view = _apply_update(view, {"object": "fine_tuning.job.event", "message": "Step 1/2: training loss=2.0",
                                "type": "metrics", "data": {"step": 1, "train_loss": 2.0}})
    view = _apply_update(view, {"object": "fine_tuning.job", "status": "succeeded",
                                "fine_tuned_model": "ft:base:x", "error": None})
    assert view.steps == [1.0] and view.losses == [2.0]
    assert view.status == "succeeded" and view.fine_tuned_model == "ft:base:x"


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
        assert await wait_for(pilot, lambda: screen.result is not None)
        report = str(screen.query_one("#exp-report").render())
        assert "No errors found." in report and "exported 3 example(s)" in report
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
