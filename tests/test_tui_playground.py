"""The playground, driven by its keys against a real loopback server that streams
(the shared fake server, taught to stream here)."""

from __future__ import annotations

import json
import time

import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store
from gridtune.tui.events import OpenPlayground
from gridtune.tui.screens.playground import PlaygroundScreen, parse_stops
from tests.fakeserver import FakeOpenAI
from tests.test_tui_export import fill
from tests.test_tui_generate import HostApp, small_spec


class StreamingFake(FakeOpenAI):
    """The fake OpenAI server, streaming chat and legacy completions as SSE; the
    reply is ``self.reply`` (word-split, cut at max_tokens words, and at a stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.reply = "A calm answer about the place."
        self.app.router.routes.insert(0, Route("/v1/completions", self._legacy, methods=["POST"]))

    async def _chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        if not body.get("stream"):
            return await super()._chat(request)
        self.requests.append(body)
        return self._sse(body, chat=True)

    async def _legacy(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests.append(body)
        return self._sse(body, chat=False)

    def _sse(self, body: dict, chat: bool) -> Response:
        words = self.reply.split(" ")
        finish = "stop"
        if len(words) > body.get("max_tokens", 10**6):
            words, finish = words[: body["max_tokens"]], "length"
        text = " ".join(words)
        for stop in body.get("stop") or []:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1].rstrip(" ")

        def chunk(piece: str | None, reason: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": reason}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            return "data: " + json.dumps({"id": "x", "object": obj, "created": 0, "model": body["model"],
                                          "choices": [choice]}) + "\n\n"

        async def gen():
            for piece in pieces:
                yield chunk(piece, None)
            yield chunk(None, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def streaming_server():
    server = StreamingFake().start()
    yield server
    server.stop()


@pytest.fixture
def fake(streaming_server, monkeypatch):
    streaming_server.reset()
    streaming_server.requests = []
    streaming_server.reply = "A calm answer about the place."
    monkeypatch.setenv("OPENAI_BASE_URL", streaming_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return streaming_server


@pytest.fixture
def project(tmp_path):
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    fill(path)
    return path


async def wait_for(pilot, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await pilot.pause(0.05)
    return predicate()


def text_of(screen, selector):
    return str(screen.query_one(selector).render())


def test_parse_stops():
    assert parse_stops("") == []
    assert parse_stops(" END") == [" END"]
    assert parse_stops("\\n\\n | ###") == ["\n\n", "###"]


async def test_reply_streams_with_repetition_and_max_tokens_warnings(project, fake):
    fake.reply = "The city grew. " * 12 + "Then it stopped."
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.spec is not None and screen.models)
        await pilot.pause()
        assert screen.query_one("#pg-model-a").value == "fake-model"  # the backend's list
        assert "held-out values" in text_of(screen, "#pg-mark")  # suggested values, not the grid's
        screen.query_one("#pg-max_tokens").value = "20"
        await pilot.press("r")
        assert await wait_for(pilot, lambda: screen._streams.get("a", {}).get("done"))
        await pilot.pause()
        out = text_of(screen, "#pg-out-a")
        assert out.startswith("The city grew. The city grew.")
        warn = text_of(screen, "#pg-warn-a")
        assert "ran to max tokens (20) without a stop" in warn
        assert "repeats itself" in warn and "the city grew" in warn
        # the repeated span is highlighted in the reply
        assert screen._streams["a"]["repetition"].spans[0][0] == 0
    sent = fake.requests[-1]
    assert sent["max_tokens"] == 20 and sent["stream"] is True
    assert sent["messages"][-1]["content"].startswith("Place: ")  # the training template


async def test_clean_reply_has_no_warning_and_stop_is_sent(project, fake):
    fake.reply = "Oslo in 2060 runs on quiet power. END and more text"
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.spec is not None and screen.models)
        screen.query_one("#pg-stop").value = " END"
        await pilot.press("r")
        assert await wait_for(pilot, lambda: screen._streams.get("a", {}).get("done"))
        await pilot.pause()
        assert text_of(screen, "#pg-out-a") == "Oslo in 2060 runs on quiet power."
        assert text_of(screen, "#pg-warn-a") == ""
    assert fake.requests[-1]["stop"] == [" END"]


async def test_two_models_side_by_side(project, fake):
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.spec is not None and screen.models)
        screen.query_one("#pg-model-b").value = "other-model"
        await pilot.press("r")
        assert await wait_for(pilot, lambda: all(s.get("done") for s in screen._streams.values())
                              and len(screen._streams) == 2)
        await pilot.pause()
        assert screen.query_one("#pg-pane-b").display
        assert text_of(screen, "#pg-out-a") == text_of(screen, "#pg-out-b") == fake.reply
    assert sorted(r["model"] for r in fake.requests) == ["fake-model", "other-model"]


async def test_marks_trained_and_untrained_combinations(project, fake):
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.spec is not None)
        await pilot.press("t")  # a combination from the training data
        assert "in the training data" in text_of(screen, "#pg-mark")
        await pilot.press("n")  # held-out values
        assert "held-out values" in text_of(screen, "#pg-mark")
        values = screen.values()
        assert values["place"] not in ("Oslo", "Lima") and values["year"] not in (2030, 2040)


async def test_untrained_combination_when_some_cells_were_left_out(project, fake, tmp_path):
    from gridtune.pipeline.training.export import export_project_async

    with Store.open(project) as store:
        await export_project_async(store, tmp_path / "t.jsonl", min_grade=3)  # only 2 of 4 cells trained
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.spec is not None)
        assert len(screen.trained) == 2
        await pilot.press("h")
        assert "held-out combination" in text_of(screen, "#pg-mark")


async def test_opened_directly_the_latest_tuned_model_is_in_a_and_its_base_in_b(project, fake):
    with Store.open(project) as store:
        for job_id, tuned in (("ftjob-1", "ft:fake-model:old"), ("ftjob-2", "ft:fake-model:new")):
            store.record_job(id=job_id, base_url=None, model="fake-model", training_file="f", validation_file=None,
                             export_id=None, status="running")
            store.update_job(job_id, status="succeeded", fine_tuned_model=tuned)
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.query_one("#pg-model-a").value == "ft:fake-model:new")
        assert screen.query_one("#pg-model-b").value == "fake-model" and screen.query_one("#pg-pane-b").display
        assert "no export yet" in text_of(screen, "#pg-title")
        screen.post_message(OpenPlayground("ft:fake-model:old"))  # as the app forwards it
        assert await wait_for(pilot, lambda: screen.query_one("#pg-model-a").value == "ft:fake-model:old")
        assert screen.query_one("#pg-model-b").value == "fake-model"


async def test_legacy_format_uses_the_completions_endpoint(project, fake, tmp_path):
    from gridtune.pipeline.training.export import export_project_async

    with Store.open(project) as store:
        result = await export_project_async(store, tmp_path / "t.jsonl", format="completion")
    app = HostApp(project, PlaygroundScreen)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.spec is not None and screen.models)
        assert screen.format == "completion"
        await pilot.press("r")
        assert await wait_for(pilot, lambda: screen._streams.get("a", {}).get("done"))
    sent = fake.requests[-1]
    assert sent["prompt"].endswith(result.separator) and sent["stop"] == [result.stop]


async def test_p_after_a_completion_tune_then_a_chat_export_the_playground_follows(project, fake, tmp_path,
                                                                                  monkeypatch):
    """Through the real app: `p` right after a completion-format export and a tune opens
    the tuned model in A, its base in B, prompts in completion format with the export's
    separator and stop; a new chat export on the export screen moves it to chat."""
    from gridtune.pipeline.training.export import export_project_async
    from gridtune.tui.app import GridtuneApp

    monkeypatch.chdir(tmp_path)
    with Store.open(project) as store:
        result = await export_project_async(store, tmp_path / "t.jsonl", format="completion")
        store.record_job(id="ftjob-9", base_url=None, model="fake-model", training_file="f", validation_file=None,
                         export_id=result.export_id, status="running")
        store.update_job("ftjob-9", status="succeeded", fine_tuned_model="ft:fake-model:tiny:9")
    app = GridtuneApp(project, start_mode="export")
    async with app.run_test(size=(80, 24)) as pilot:
        export = app.screen
        assert await wait_for(pilot, lambda: export.job.id == "ftjob-9" and export.check_action("playground", ()))
        await pilot.press("p")
        assert await wait_for(pilot, lambda: isinstance(app.screen, PlaygroundScreen))
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.export is not None
                              and screen.query_one("#pg-model-a").value == "ft:fake-model:tiny:9")
        assert screen.query_one("#pg-model-b").value == "fake-model"  # its base beside it
        assert screen.format == "completion" and screen.separator == result.separator
        assert parse_stops(screen.query_one("#pg-stop").value) == [result.stop]
        title = text_of(screen, "#pg-title")
        assert f"follows export #{result.export_id} · completion" in title and "stop ' END'" in title
        assert text_of(screen, "#pg-prompt").endswith(result.separator.replace("\n", "\\n"))

        await pilot.press("f5")  # export again, in chat format, from the export screen's keys
        assert await wait_for(pilot, lambda: app.screen is export)
        await pilot.press("o", "enter", "up", "enter", "escape", "e")
        assert await wait_for(pilot, lambda: export.export is not None and export.export.format == "chat")
        await pilot.press("f6")
        assert await wait_for(pilot, lambda: app.screen is screen and screen.format == "chat")
        assert f"follows export #{export.export.id} · chat" in text_of(screen, "#pg-title")
        assert screen.query_one("#pg-stop").value == "" and screen.separator is None
        assert screen.query_one("#pg-model-a").value == "ft:fake-model:tiny:9"  # the models stay
        await pilot.press("r")
        assert await wait_for(pilot, lambda: all(s.get("done") for s in screen._streams.values())
                              and len(screen._streams) == 2)
    assert "messages" in fake.requests[-1] and "stop" not in fake.requests[-1]
