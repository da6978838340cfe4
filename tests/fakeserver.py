"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks ``POST /v1/chat/completions`` and ``GET /v1/models``; its reply is
deterministic from the prompt (it echoes the prompt, then a number of words that
depends on the prompt, so lengths vary and grading by length means something).
Each test can make it slow, rate-limit, fail, stall or answer garbage, and reads
back every request it got.

In the test process: the ``fake_openai`` fixture (a server in a thread, shared
by the session, reset per test, with OPENAI_BASE_URL/OPENAI_API_KEY set).
From another process (the benchmark): ``python tests/fakeserver.py --latency 0.2``
prints ``READY <base_url>``; ``POST /_control`` and ``GET /_requests`` drive it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TEST_KEY = "sk-test-gridtune-0123456789"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@dataclass
class Fault:
    """Something to do instead of answering normally.

    kind: "status" (answer ``status`` with an OpenAI error body, ``code``, and the
    Retry-After headers given), "stall" (wait ``stall_s`` first, then answer
    normally), "malformed" (200 with a truncated JSON body), "empty" (200 with
    no choices). It applies to requests whose prompt contains ``match`` (any
    when None), to the first ``count`` of them (all when None), with
    probability ``prob`` (seeded, so runs repeat).
    """

    kind: str = "status"
    status: int = 500
    code: str | None = None
    message: str | None = None
    count: int | None = None
    match: str | None = None
    prob: float = 1.0
    retry_after: str | None = None
    retry_after_ms: str | None = None
    stall_s: float = 5.0


@dataclass
class Recorded:
    t: float  # time.time() when the request arrived
    path: str
    headers: dict[str, str]
    body: Any
    prompt: str
    status: int = 0  # what the server answered (0: no answer, e.g. the client gave up)
    fault: str | None = None


def reply_text(prompt: str) -> str:
    """The deterministic answer to a prompt: an echo, then 5..40 words."""
    digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    n = 5 * (1 + digest % 8)
    words = " ".join(WORDS[(digest >> (3 * i)) % len(WORDS)] for i in range(n))
    return f"On: {prompt}\n{words}."


class FakeOpenAI:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.latency = 0.0
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self.model = "fake-model"
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/_control", self._control, methods=["POST"]),
            Route("/_requests", self._requests, methods=["GET"]),
        ])

    # -- control -----------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def set(self, *, latency: float | None = None, faults: list[Fault] | None = None,
            seed: int | None = None) -> "FakeOpenAI":
        with self._lock:
            if latency is not None:
                self.latency = latency
            if faults is not None:
                self.faults = list(faults)
            if seed is not None:
                self._rng = random.Random(seed)
        return self

    def reset(self) -> None:
        with self._lock:
            self.latency, self.faults, self.requests = 0.0, [], []
            self._rng = random.Random(0)

    def chat_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- the API -------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "gridtune-tests"}]})

    def _pick_fault(self, prompt: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.match is not None and fault.match not in prompt:
                    continue
                if fault.count is not None and fault.count <= 0:
                    continue
                if fault.prob < 1.0 and self._rng.random() >= fault.prob:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                return fault
        return None

    async def _chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        messages = body.get("messages", []) if isinstance(body, dict) else []
        prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        record = Recorded(time.time(), request.url.path, dict(request.headers), body, prompt)
        with self._lock:
            self.requests.append(record)
        fault = self._pick_fault(prompt)
        record.fault = fault.kind if fault else None
        if fault and fault.kind == "stall":
            await asyncio.sleep(fault.stall_s)
        elif self.latency:
            await asyncio.sleep(self.latency)
        response = self._answer(body, prompt, fault)
        record.status = response.status_code
        return response

    def _answer(self, body: Any, prompt: str, fault: Fault | None) -> Response:
        if fault and fault.kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["retry-after"] = str(fault.retry_after)
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
            error = {"message": fault.message or f"fake error {fault.status}",
                     "type": fault.code or "fake_error", "param": None, "code": fault.code}
            return JSONResponse({"error": error}, status_code=fault.status, headers=headers)
        if fault and fault.kind == "malformed":
            return Response('{"id": "chatcmpl-broken", "choices": [{"mess', media_type="application/json")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return JSONResponse({"error": {"message": "messages is required", "type": "invalid_request_error",
                                           "param": "messages", "code": None}}, status_code=400)
        text, finish = reply_text(prompt), "stop"
        max_tokens = body.get("max_tokens")
        words = text.split(" ")
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        choices = [] if fault and fault.kind == "empty" else [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]
        return JSONResponse({
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or self.model, "choices": choices,
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                      "total_tokens": len(prompt.split()) + len(text.split())},
        })

    async def _control(self, request: Request) -> Response:
        data = await request.json()
        if data.get("reset"):
            self.reset()
        faults = [Fault(**f) for f in data["faults"]] if "faults" in data else None
        self.set(latency=data.get("latency"), faults=faults, seed=data.get("seed"))
        return JSONResponse({"ok": True})

    async def _requests(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse([asdict(r) for r in self.requests])

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
        # without it Nagle + delayed ACK add ~40 ms to every keep-alive request.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=1, backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


def max_in_window(times: list[float], window_s: float) -> int:
    """The most requests in any closed window of ``window_s`` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


try:
    import pytest
except ImportError:  # the benchmark runs this file without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def fake_openai_server():
        server = FakeOpenAI().start()
        yield server
        server.stop()

    @pytest.fixture
    def fake_openai(fake_openai_server, monkeypatch):
        """The fake server, reset, with OPENAI_BASE_URL/OPENAI_API_KEY pointing at it."""
        fake_openai_server.reset()
        monkeypatch.setenv("OPENAI_BASE_URL", fake_openai_server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        yield fake_openai_server
        fake_openai_server.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake OpenAI chat-completions server")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAI().set(latency=args.latency).start()
    print(f"READY {server.base_url}", flush=True)
    try:
        while server._thread and server._thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
