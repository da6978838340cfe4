"""A pool of one-shot requests beside the generation run: the judge's grades and the
evaluation's answers.

They share the runner's policy: rpm/tpm limits over every sliding window (and the
provider's x-ratelimit-* budget, read from every answer), retries of transient
failures with the server's Retry-After honoured (a 429 is a queue, not a fault; a
request waiting to be tried again holds no worker, and goes ahead of fresh work when
its wait is over), and a permanent error (400/401/403/404: a wrong model name, a bad
key) stops the pool, since every next request would meet it too. They do not use
``run_generation`` itself: that owns the project's one run lock and the completions
table, and a judge or an evaluation must be able to run while generation does.
Each outcome is handed to ``on_result`` as it arrives, so the caller stores it at
once and an interrupted pass resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx
import openai

from ..client.replies import (
    RATE_LIMIT_WAIT_S,
    MalformedResponse,
    Reply,
    describe,
    is_transient,
    parse_reply,
    retry_delay_s,
)
from .backend import Backend
from .lean_http import ReplyTooLarge
from .ratelimit import MINUTE, RateLimits

T = TypeVar("T")


@dataclass(frozen=True)
class PoolOptions:
    concurrency: int = 4
    rpm: float | None = None
    tpm: float | None = None
    max_attempts: int = 4
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    timeout_s: float = 120.0
    rate_period_s: float = MINUTE  # tests shrink the minute
    rate_limit_wait_s: float = RATE_LIMIT_WAIT_S  # 429s are waited out this long (from the first send), not counted


@dataclass(frozen=True)
class Request:
    """One request: the endpoint path (/chat/completions or /completions), its body
    and an upper estimate of its tokens (prompt + max_tokens) for the tpm limit."""

    path: str
    body: dict
    tokens: int


def parse_any_reply(raw: bytes | str) -> Reply:
    """A chat completion's reply, or a legacy completion's (choices[0].text)."""
    try:
        return parse_reply(raw)
    except MalformedResponse:
        data = json.loads(raw)
        choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
        text = choice.get("text") if isinstance(choice, dict) else None
        if not isinstance(text, str):
            raise
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Reply(text, choice.get("finish_reason"), data.get("model"), usage.get("prompt_tokens"),
                     usage.get("completion_tokens"))


@dataclass(eq=False)
class _Entry(Generic[T]):
    """One item on its way: what it sends, and how its tries went so far."""

    item: T
    req: Request | None = None  # built at its first send: a long pass holds no bodies it has not sent
    first_sent: float | None = None  # time.monotonic() of its first send
    sends: int = 0
    failures: int = 0  # failed attempts (transient failures other than rate limits)
    busy: int = 0  # 429s of a rate limit or a full queue: waited out, not counted
    mark: tuple[int, float] | None = None  # what the limiter's acquire returned for its last send


class Pool(Generic[T]):
    """Send one request per item, at most ``concurrency`` at a time.

    As in the generation runner, a request waiting out a Retry-After or a backoff
    holds no worker: it sits on a timer, and when the wait is over it goes ahead of
    the fresh items still queued."""

    def __init__(self, backend: Backend, options: PoolOptions):
        self.backend = backend
        self.options = options
        self.stopped: str | None = None  # the permanent error that stopped the pool

    async def run(self, items: Sequence[T], request: Callable[[T], Request],
                  on_result: Callable[[T, Reply | None, str | None, float], Awaitable[None]],
                  stop_event: asyncio.Event | None = None) -> None:
        """``on_result(item, reply, error, latency_s)`` for every item sent: a reply,
        or None and a one-line error (credentials redacted); the latency counts from
        the item's first send. After a stop (``stop_event``, or a permanent error) no
        request is sent; those in flight are answered, and an item that was waiting to
        be tried again gets no result (a next pass asks it again)."""
        if not items:
            return
        o = self.options
        largest = max(request(item).tokens for item in items[:200])
        limits = RateLimits(o.rpm, o.tpm, max_request_tokens=largest, period_s=o.rate_period_s)
        stop = stop_event or asyncio.Event()
        loop = asyncio.get_running_loop()
        workers = max(1, min(o.concurrency, len(items)))
        # Ready entries, retries first (0), then fresh items (1) in their order; None lets a
        # worker go: before everything on a stop (-1), after everything when all are done (2).
        ready: asyncio.PriorityQueue[tuple[int, int, _Entry[T] | None]] = asyncio.PriorityQueue()
        for seq, item in enumerate(items):
            ready.put_nowait((1, seq, _Entry(item)))
        seq = len(items)
        left = len(items)  # items without a result yet
        waiting: dict[_Entry[T], asyncio.TimerHandle] = {}  # entries waiting out a Retry-After or a backoff

        def release(priority: int) -> None:
            nonlocal seq
            for _ in range(workers):
                seq += 1
                ready.put_nowait((priority, seq, None))

        def wake(entry: _Entry[T]) -> None:
            """Its wait is over: ahead of fresh work."""
            nonlocal seq
            del waiting[entry]
            if stop.is_set():
                return
            seq += 1
            ready.put_nowait((0, seq, entry))

        async def result(entry: _Entry[T], reply: Reply | None, error: str | None) -> None:
            nonlocal left
            started = entry.first_sent if entry.first_sent is not None else time.monotonic()
            await on_result(entry.item, reply, error, time.monotonic() - started)
            left -= 1
            if left == 0:  # nothing more will come back: let every worker go
                release(2)

        async def failed(entry: _Entry[T], exc: Exception) -> None:
            # The openai package's HTTP types (httpx): a 429 says what is left, and when it resets.
            headers = getattr(getattr(exc, "response", None), "headers", None)
            if headers is not None:
                limits.observe(headers, entry.mark)
            transient = is_transient(exc)
            if transient:
                if stop.is_set():
                    return  # it would wait for a next try that will not come: no result
                delay = retry_delay_s(entry, exc, o)
                if delay is not None:
                    waiting[entry] = loop.call_later(delay, wake, entry)
                    return
            error = self.backend.redact(describe(exc))
            if not transient and isinstance(exc, openai.APIStatusError):
                # Every next request would meet it too (a wrong model name, a bad key).
                self.stopped = self.stopped or error
                stop.set()
            await result(entry, None, error)

        async def send(entry: _Entry[T]) -> None:
            if entry.req is None:
                entry.req = request(entry.item)
            req = entry.req
            entry.mark = await limits.acquire(req.tokens if limits.needs_token_estimate else 0)
            if stop.is_set():  # stopped while it waited for the limits: not sent
                return
            if entry.first_sent is None:
                entry.first_sent = time.monotonic()
            entry.sends += 1
            try:
                response = await client.post(req.path, body=req.body, cast_to=httpx.Response)
                limits.observe(response.headers, entry.mark)
                reply = parse_any_reply(response.content)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retried or recorded by the caller, never raised out of the pool
                if isinstance(exc, ReplyTooLarge):
                    exc = MalformedResponse(str(exc))
                await failed(entry, exc)
                return
            await result(entry, reply, None)

        async def worker() -> None:
            while not stop.is_set():
                _priority, _seq, entry = await ready.get()
                if entry is None or stop.is_set():
                    return
                await send(entry)

        async def on_stop() -> None:
            await stop.wait()
            release(-1)  # idle workers go; busy ones finish the request in flight

        # Each reply is bounded by what its request's max_tokens can explain (lean_http).
        async with self.backend.async_client(timeout=o.timeout_s, bounded=True) as client:
            tasks = [asyncio.create_task(worker()) for _ in range(workers)]
            watcher = asyncio.create_task(on_stop())
            try:
                await asyncio.gather(*tasks)
            finally:  # done, stopped, cancelled, or a failing on_result: nothing left behind
                for handle in waiting.values():
                    handle.cancel()
                waiting.clear()
                for task in (*tasks, watcher):
                    task.cancel()
                await asyncio.gather(*tasks, watcher, return_exceptions=True)
