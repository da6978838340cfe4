"""The export & fine-tune screen's exit: x exports the tuned model for another engine
(hf, gguf [quant], ollama, vllm) on the local server and shows where it wrote and the
command to run it; a refusal is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridtune.pipeline.training.finetune import JobState
from gridtune.tui.screens.export import ExportScreen, parse_exit
from tests.server_support import chat_examples, local, wait_for, write_jsonl  # noqa: F401 - fixture
from tests.test_tui_export import project, wait_for as wait_pilot  # noqa: F401 - fixture
from tests.test_tui_generate import HostApp
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture


def test_parse_exit():
    base = Path("/p/agi")
    assert parse_exit("gguf", base) == ("gguf", None, Path("/p/agi-gguf"))
    assert parse_exit("GGUF q8_0 out dir", base) == ("gguf", "q8_0", Path("out dir"))
    assert parse_exit("vllm ~/x", base) == ("vllm", None, Path("~/x").expanduser())
    assert parse_exit("hf q8_0", base) == ("hf", None, Path("q8_0"))  # a quant only for gguf/ollama
    with pytest.raises(ValueError, match="start with hf, gguf, ollama, vllm"):
        parse_exit("onnx out", base)


@pytest.mark.local
async def test_x_exports_the_tuned_model_and_shows_the_command(project, local, tmp_path):  # noqa: F811
    with local.client() as client:
        with open(write_jsonl(tmp_path / "t.jsonl", chat_examples(10)), "rb") as fh:
            f = client.files.create(file=fh, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=local.model, training_file=f.id, hyperparameters={"n_epochs": 1})
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "succeeded" and j)
    app = HostApp(project, ExportScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert screen.check_action("export_model", ()) is False  # no tuned model yet
        screen.job = JobState(id=done.id, status="succeeded", model=local.model, fine_tuned_model=done.fine_tuned_model)
        await pilot.press("x")
        await pilot.pause()
        box = app.screen.query_one("#ask-input")
        assert box.value.startswith("gguf ") and box.value.endswith("tiny-gguf")  # beside the project
        out = tmp_path / "exit"
        box.value = f"gguf q8_0 {out}"
        await pilot.press("enter")
        assert await wait_pilot(pilot, lambda: screen.query_one("#exp-exit").display, timeout=120), screen.error
        shown = str(screen.query_one("#exp-exit").render())
        gguf = next(out.glob("*.q8_0.gguf"))
        assert "gguf →" in shown and "$ llama-server -m" in shown and gguf.name in shown
        # the same directory again: refused in one line, what is there left alone
        await pilot.press("x")
        await pilot.pause()
        app.screen.query_one("#ask-input").value = f"ollama {out}"
        await pilot.press("enter")
        assert await wait_pilot(pilot, lambda: bool(screen.error), timeout=60)
        assert screen.error.startswith("export model:") and "not an empty directory" in screen.error
        assert "\n" not in screen.error and [p.name for p in out.iterdir()] == [gguf.name]
