"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent
events, one word a chunk, with ``stream_options.include_usage``) and ``GET
/v1/models``; its reply is deterministic from the prompt (it echoes the prompt,
then a number of words that depends on the prompt, so lengths vary and grading by
length means something). Each test can make it slow (``latency`` before the reply,
``chunk_delay_s`` between streamed words), rate-limit, fail, stall or answer
garbage, bound its queue (``max_in_flight``: a 429 with Retry-After past it, as
the local server does), advertise a ``gridtune`` field on its models (what the
local server says about its engine), and reads back every request it got.

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
    no choices), "huge" (200 with a well-formed reply whose text is ``size`` bytes,
    plain or as one giant stream chunk; ``huge_sent`` counts what the client took), "html"
    (200 with a web page), "bad-utf8" (200, JSON with invalid UTF-8 in the text); the
    last two answer a streamed request the same way. It applies to requests whose prompt contains ``match`` (any
    when None), to the first ``count`` of them (all when None), with
    probability ``prob`` (seeded, so runs repeat).
    """

    kind: str = "status"  # also "huge", "html", "bad-utf8" (see below)
    status: int = 500
    code: str | None = None
    message: str | None = None
    count: int | None = None
    match: str | None = None
    prob: float = 1.0
    retry_after: str | None = None
    retry_after_ms: str | None = None
    stall_s: float = 5.0
    size: int = 50 * 2**20  # "huge": the text's bytes, sent 64 KiB at a time (chunked: no length up front)


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
        self.chunk_delay_s = 0.0  # between streamed words
        self.gridtune: dict[str, Any] | None = None  # the extra field on each model object
        self.max_in_flight: int | None = None  # more at once: 429 with Retry-After
        self.busy_retry_after = "0.2"
        self.ignore_stream = False  # answer one JSON body even when asked to stream
        self.reject_stream_options = False  # a 400 for stream_options, as older servers answer
        # Canned replies: (substring, text); a request whose prompt contains the substring
        # (the first that matches) gets ``text`` instead of the echo (a judge's grade, ...).
        self.replies: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.huge_sent = 0  # bytes of "huge" replies the clients read (they should stop early)
        # Rate limits enforced over a sliding window, as a provider does (set_limits): a request
        # past them gets a 429 (a "breach"); every answer carries x-ratelimit-* headers then.
        self.limit_rpm: int | None = None
        self.limit_tpm: int | None = None
        self.limit_window_s = 60.0
        self.limit_headers = True
        self.breaches = 0
        self._admitted: list[tuple[float, int]] = []  # (arrival, tokens charged) within the window
        self._epoch = 0
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
            seed: int | None = None, chunk_delay_s: float | None = None, gridtune: dict | None = None,
            max_in_flight: int | None = None, ignore_stream: bool | None = None,
            replies: list[tuple[str, str]] | None = None) -> FakeOpenAI:
        with self._lock:
            if replies is not None:
                self.replies = [tuple(r) for r in replies]
            if chunk_delay_s is not None:
                self.chunk_delay_s = chunk_delay_s
            if gridtune is not None:
                self.gridtune = gridtune
            if max_in_flight is not None:
                self.max_in_flight = max_in_flight
            if ignore_stream is not None:
                self.ignore_stream = ignore_stream
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
            self.chunk_delay_s, self.gridtune, self.max_in_flight, self.ignore_stream = 0.0, None, None, False
            self.reject_stream_options = False
            self.replies = []
            self.in_flight = self.peak_in_flight = self.huge_sent = 0
            self._epoch += 1  # a request of before the reset that ends after it no longer counts
            self.limit_rpm = self.limit_tpm = None
            self.limit_window_s, self.limit_headers, self.breaches, self._admitted = 60.0, True, 0, []

    def set_limits(self, rpm: int | None = None, tpm: int | None = None, window_s: float = 60.0,
                   headers: bool = True) -> FakeOpenAI:
        """Enforce rpm/tpm over a sliding ``window_s`` (tokens charged as ``charged_tokens``);
        ``headers``: send OpenAI's x-ratelimit-* headers with every answer."""
        with self._lock:
            self.limit_rpm, self.limit_tpm, self.limit_window_s, self.limit_headers = rpm, tpm, window_s, headers
            self._admitted, self.breaches = [], 0
        return self

    def _admit(self, body: Any) -> tuple[bool, dict[str, str]]:
        """Count a request against the limits: (admitted, headers: the x-ratelimit-* ones as
        of its admission, as a provider's limiter computes them, and a 429's retry-after)."""
        now, tokens = time.monotonic(), charged_tokens(body)
        with self._lock:
            self._expire(now)
            in_window = sum(t for _, t in self._admitted)
            over_requests = self.limit_rpm is not None and len(self._admitted) + 1 > self.limit_rpm
            over_tokens = self.limit_tpm is not None and in_window + tokens > self.limit_tpm
            if not (over_requests or over_tokens):
                self._admitted.append((now, tokens))
                return True, self._limit_headers(now)
            self.breaches += 1
            oldest = self._admitted[0][0] if self._admitted else now
            wait = max(oldest + self.limit_window_s - now, 0.001)
            return False, {"retry-after-ms": str(int(wait * 1000)), "retry-after": str(max(1, round(wait))),
                           **self._limit_headers(now)}

    def _expire(self, now: float) -> None:
        edge = now - self.limit_window_s
        while self._admitted and self._admitted[0][0] <= edge:
            self._admitted.pop(0)

    def _limit_headers(self, now: float) -> dict[str, str]:
        """x-ratelimit-* as OpenAI sends them: what remains, and the time until the
        budget is whole again (the newest admitted request leaves the window)."""
        if not self.limit_headers:
            return {}
        reset = duration(self._admitted[-1][0] + self.limit_window_s - now) if self._admitted else "0s"
        headers = {}
        if self.limit_rpm is not None:
            headers.update({"x-ratelimit-limit-requests": str(self.limit_rpm), "x-ratelimit-reset-requests": reset,
                            "x-ratelimit-remaining-requests": str(max(0, self.limit_rpm - len(self._admitted)))})
        if self.limit_tpm is not None:
            used = sum(t for _, t in self._admitted)
            headers.update({"x-ratelimit-limit-tokens": str(self.limit_tpm), "x-ratelimit-reset-tokens": reset,
                            "x-ratelimit-remaining-tokens": str(max(0, self.limit_tpm - used))})
        return headers

    def chat_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- the API -------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "gridtune-tests"}
        if self.gridtune is not None:
            model["gridtune"] = dict(self.gridtune, in_flight=self.in_flight)
        return JSONResponse({"object": "list", "data": [model]})

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
        if self.reject_stream_options and isinstance(body, dict) and "stream_options" in body:
            record.status, record.fault = 400, "stream_options"
            return JSONResponse({"error": {"message": "Unrecognized request argument supplied: stream_options",
                                           "type": "invalid_request_error", "param": None, "code": None}},
                                status_code=400)
        with self._lock:
            busy = self.max_in_flight is not None and self.in_flight >= self.max_in_flight
        if busy:  # the local server's queue limit
            record.status, record.fault = 429, "busy"
            return JSONResponse({"error": {"message": "the server is busy: too many requests queued",
                                           "type": "server_busy", "param": None, "code": "server_busy"}},
                                status_code=429, headers={"retry-after": self.busy_retry_after})
        if self.limit_rpm is not None or self.limit_tpm is not None:
            admitted, limit_headers = self._admit(body)
            if not admitted:
                record.status, record.fault = 429, "rate_limit"
                return JSONResponse({"error": {"message": "Rate limit reached", "type": "requests",
                                               "param": None, "code": "rate_limit_exceeded"}},
                                    status_code=429, headers=limit_headers)
        else:
            limit_headers = {}
        fault = self._pick_fault(prompt)
        record.fault = fault.kind if fault else None
        epoch = self._enter()
        streaming = False
        try:
            if fault and fault.kind == "stall":
                await asyncio.sleep(fault.stall_s)
            elif self.latency:
                await asyncio.sleep(self.latency)
            if (isinstance(body, dict) and body.get("stream") is True and not self.ignore_stream
                    and not (fault and fault.kind in ("status", "html", "bad-utf8"))):
                streaming = True
                record.status = 200
                return self._stream(body, prompt, fault, limit_headers)
            response = self._answer(body, prompt, fault, limit_headers)
            record.status = response.status_code
            return response
        finally:
            if not streaming:
                self._leave(epoch)

    def _enter(self) -> int:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return self._epoch

    def _leave(self, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:
                self.in_flight -= 1

    def _stream(self, body: dict, prompt: str, fault: Fault | None, headers: dict | None = None) -> Response:
        """The reply as server-sent events, a word a chunk, ``chunk_delay_s`` apart."""
        from starlette.responses import StreamingResponse

        text, finish = self._reply(body, prompt)
        words = text.split(" ")
        epoch = self._epoch
        cid, created, model = f"chatcmpl-{len(self.requests)}", int(time.time()), body.get("model") or self.model
        usage_wanted = (body.get("stream_options") or {}).get("include_usage")

        def event(choices: list, usage: dict | None = None) -> bytes:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices}
            if usage_wanted:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        async def events():
            try:
                if fault and fault.kind == "huge":
                    yield b'data: {"id": "' + cid.encode() + b'", "object": "chat.completion.chunk", "choices": ' \
                        b'[{"index": 0, "delta": {"content": "'
                    async for piece in self._huge(fault.size):
                        yield piece
                    yield b'"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
                    return
                if fault and fault.kind == "malformed":
                    yield b'data: {"id": "chatcmpl-broken", "choices": [{"del\n\n'
                    return
                if fault and fault.kind == "empty":
                    yield b"data: [DONE]\n\n"
                    return
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                for i, word in enumerate(words):
                    if self.chunk_delay_s:
                        await asyncio.sleep(self.chunk_delay_s)
                    piece = word if i == 0 else " " + word
                    yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
                yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
                if usage_wanted:
                    n = len(text.split())  # as the plain reply counts them
                    yield event([], {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                                     "total_tokens": len(prompt.split()) + n})
                yield b"data: [DONE]\n\n"
            finally:
                self._leave(epoch)

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def _huge(self, size: int):
        """``size`` bytes of text, 64 KiB at a time, counted in ``huge_sent`` as they go."""
        piece = b"a" * 65536
        left = size
        while left > 0:
            chunk = piece[:min(left, len(piece))]
            left -= len(chunk)
            with self._lock:
                self.huge_sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)

    def _reply(self, body: dict, prompt: str) -> tuple[str, str]:
        # A match "model:NAME" answers every request to that model (a base and a tuned one).
        model = f"model:{body.get('model')}"
        text = next((reply for match, reply in self.replies if match in prompt or match == model), None)
        text, finish = (reply_text(prompt) if text is None else text), "stop"
        max_tokens = body.get("max_tokens")
        words = text.split(" ")
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        return text, finish

    def _answer(self, body: Any, prompt: str, fault: Fault | None, limit_headers: dict | None = None) -> Response:
        if fault and fault.kind == "status":
            headers = dict(limit_headers or {})
            if fault.retry_after is not None:
                headers["retry-after"] = str(fault.retry_after)
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
            error = {"message": fault.message or f"fake error {fault.status}",
                     "type": fault.code or "fake_error", "param": None, "code": fault.code}
            return JSONResponse({"error": error}, status_code=fault.status, headers=headers)
        if fault and fault.kind == "malformed":
            return Response('{"id": "chatcmpl-broken", "choices": [{"mess', media_type="application/json")
        if fault and fault.kind == "html":  # a proxy's or a captive portal's page, with a 200
            return Response("<html><body><h1>Welcome</h1></body></html>", media_type="text/html")
        if fault and fault.kind == "bad-utf8":
            return Response(b'{"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "'
                            b'\xff\xfe\xc3"}, "finish_reason": "stop"}]}', media_type="application/json")
        if fault and fault.kind == "huge":
            from starlette.responses import StreamingResponse

            async def body_pieces():
                yield b'{"id": "chatcmpl-huge", "object": "chat.completion", "choices": [{"index": 0, ' \
                      b'"message": {"role": "assistant", "content": "'
                async for piece in self._huge(fault.size):
                    yield piece
                yield b'"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 50}}'

            return StreamingResponse(body_pieces(), media_type="application/json")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return JSONResponse({"error": {"message": "messages is required", "type": "invalid_request_error",
                                           "param": "messages", "code": None}}, status_code=400)
        text, finish = self._reply(body, prompt)
        choices = [] if fault and fault.kind == "empty" else [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]
        return JSONResponse(headers=limit_headers, content={
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
        if "limits" in data:
            self.set_limits(**data["limits"])
        self.set(latency=data.get("latency"), faults=faults, seed=data.get("seed"),
                 chunk_delay_s=data.get("chunk_delay_s"), gridtune=data.get("gridtune"),
                 max_in_flight=data.get("max_in_flight"), ignore_stream=data.get("ignore_stream"),
                 replies=data.get("replies"))
        return JSONResponse({"ok": True})

    async def _requests(self, request: Request) -> Response:
        with self._lock:
            if request.query_params.get("summary"):  # counts only (a long benchmark run)
                return JSONResponse({"requests": len(self.requests), "breaches": self.breaches,
                                     "answered": sum(r.status == 200 for r in self.requests),
                                     "huge_sent": self.huge_sent})
            return JSONResponse([asdict(r) for r in self.requests])

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
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


def charged_tokens(body: Any) -> int:
    """What the fake provider charges a request against its tpm, as providers do up
    front: about a token per 4 characters of every message (plus 4 a message and 3),
    and max_tokens for each of the n choices."""
    if not isinstance(body, dict):
        return 0
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    prompt = sum(-(-len(str(m.get("content") or "")) // 4) + 4 for m in messages if isinstance(m, dict)) + 3
    max_tokens = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else 16
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    return prompt + max_tokens * n


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(seconds // 60)}m{seconds % 60:.0f}s"


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
