"""OpenAI's fine-tuning wind-down: after 2027-01-06, or when OpenAI refuses a job because
fine-tuning is closed to the organisation, `finetune` ends with one line and the local
command that runs the same file. The date is injected, so both sides are tested any day."""

from __future__ import annotations

import socket
import threading
import time
from datetime import date

import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gridtune.cli.main import main
from gridtune.pipeline.client.backend import OPENAI_URL, Backend
from gridtune.pipeline.format import cost
from gridtune.pipeline.training import finetune as ft, sunset
from tests.server_support import chat_examples, write_jsonl

CLOSED_TEXT = "Fine-tuning is no longer available to your organization."


class ClosedOpenAI:
    """An OpenAI-shaped server that takes uploads and refuses every fine-tuning job the way
    OpenAI does for an organisation its fine-tuning is closed to (403 + a message)."""

    def __init__(self, message: str = CLOSED_TEXT, status: int = 403):
        import uvicorn

        async def upload(request: Request) -> JSONResponse:
            await request.body()
            self.uploads += 1
            return JSONResponse({"id": f"file-{self.uploads}", "object": "file", "bytes": 1, "created_at": 0,
                                 "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"})

        async def create_job(request: Request) -> JSONResponse:
            await request.json()
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": None}}, status_code=status)

        self.uploads = 0
        app = Starlette(routes=[Route("/v1/files", upload, methods=["POST"]),
                                Route("/v1/fine_tuning/jobs", create_job, methods=["POST"])])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ClosedOpenAI:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def train(tmp_path):
    return write_jsonl(tmp_path / "agi.jsonl", chat_examples(12))


def test_after_the_close_openai_gets_no_job_and_the_line_names_the_local_command(train):
    backend = Backend("openai", OPENAI_URL, "sk-test")  # nothing is sent: it refuses before uploading
    with pytest.raises(ft.FinetuneRefused) as exc:
        ft.start_finetune(backend, train, "gpt-4o-mini", epochs=2, suffix="agi", today=date(2027, 1, 6))
    assert str(exc.value) == ("OpenAI takes no new fine-tuning jobs since 2027-01-06; run the same file on the "
                              f"local backend: env -u OPENAI_API_KEY -u OPENAI_BASE_URL gridtune finetune {train} "
                              "--epochs 2 --suffix agi --wait")


def test_the_cli_says_it_in_one_line_on_the_injected_date(train, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv(sunset.TODAY_ENV, "2027-02-01")
    r = CliRunner().invoke(main, ["finetune", str(train), "--model", "gpt-4o-mini"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "OpenAI takes no new fine-tuning jobs since 2027-01-06" in lines[0]
    assert lines[0].endswith(f"gridtune finetune {train} --wait")


def test_before_the_close_and_elsewhere_nothing_is_said():
    command = sunset.local_command("a.jsonl")
    openai_backend = Backend("openai", OPENAI_URL, "sk-test")
    assert sunset.closed_message(openai_backend, command, on=date(2026, 12, 4)) is None
    assert sunset.closed_message(openai_backend, command, on=date(2027, 1, 5)) is None
    assert sunset.closed_message(Backend("compatible", "http://127.0.0.1:8000/v1", "x"), command,
                                 on=date(2030, 1, 1)) is None
    # OPENAI_BASE_URL pointing at OpenAI itself is OpenAI
    assert sunset.closed_message(Backend("compatible", "https://api.openai.com/v1", "sk"), command,
                                 on=date(2027, 1, 6))


def test_today_reads_the_override(monkeypatch):
    monkeypatch.setenv(sunset.TODAY_ENV, "2027-01-07")
    assert sunset.today() == date(2027, 1, 7)
    assert sunset.today(date(2026, 1, 1)) == date(2026, 1, 1)
    monkeypatch.setenv(sunset.TODAY_ENV, "not a date")
    assert sunset.today() == date.today()


def test_a_job_refused_because_fine_tuning_is_closed_names_the_local_command(train):
    with ClosedOpenAI() as server:
        backend = Backend("openai", server.url, "sk-test")
        with pytest.raises(ft.FinetuneRefused) as exc:
            ft.start_finetune(backend, train, "gpt-4o-mini-2024-07-18", today=date(2026, 12, 4))
    message = str(exc.value)
    assert "\n" not in message and CLOSED_TEXT.rstrip(".") in message
    assert message.endswith(f"OpenAI's fine-tuning is closed to this organisation; run the same file on the local "
                            f"backend: env -u OPENAI_API_KEY -u OPENAI_BASE_URL gridtune finetune {train} --wait")


def test_another_refusal_stays_as_it_was(train):
    with ClosedOpenAI("Invalid file format: expected JSONL.", status=400) as server:
        backend = Backend("openai", server.url, "sk-test")
        with pytest.raises(ft.FinetuneRefused) as exc:
            ft.start_finetune(backend, train, "gpt-4o-mini", today=date(2026, 12, 4))
    assert "Invalid file format" in str(exc.value) and "local backend" not in str(exc.value)


@pytest.mark.parametrize("text", [
    "Fine-tuning is no longer available to your organization.",
    "Your organization does not have access to fine-tuning.",
    "fine-tuning jobs are not available for this model",
    "Creating new fine-tuning jobs has been discontinued.",
])
def test_closure_wordings_are_recognised(text):
    assert sunset.refusal_message(Backend("openai", OPENAI_URL, "k"), text, "CMD")


def test_the_price_table_names_what_openai_still_tunes_with_shutdown_dates():
    tunable = sorted(name for name, row in cost._table()["models"].items() if row.get("tunable") and name != "local")
    assert tunable == ["gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14", "gpt-4o-2024-08-06",
                       "gpt-4o-mini-2024-07-18"]
    for name in tunable:
        assert cost._table()["models"][name]["shutdown"] == "2027-01-14"
    assert "babbage-002" not in cost._table()["models"] and "davinci-002" not in cost._table()["models"]
