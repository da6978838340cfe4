"""A pool of one-shot requests beside the generation run: the judge's grades and the
evaluation's answers.

They share the runner's policy: rpm/tpm limits over every sliding window, retries of
transient failures with the server's Retry-After honoured (a 429 is a queue, not a
fault), and a permanent error (400/401/403/404: a wrong model name, a bad key) stops
the pool, since every next request would meet it too. They do not use
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

import openai
from tenacity import AsyncRetrying, retry_if_exception

from .backend import Backend
from .generate import MalformedResponse, Reply, _Stop, _Wait, describe, is_transient, parse_reply
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


class Pool(Generic[T]):
    """Send one request per item, at most ``concurrency`` at a time."""

    def __init__(self, backend: Backend, options: PoolOptions):
        self.backend = backend
        self.options = options
        self.stopped: str | None = None  # the permanent error that stopped the pool

    async def run(self, items: Sequence[T], request: Callable[[T], Request],
                  on_result: Callable[[T, Reply | None, str | None, float], Awaitable[None]],
                  stop_event: asyncio.Event | None = None) -> None:
        """``on_result(item, reply, error, latency_s)`` for every item sent: a reply,
        or None and a one-line error (credentials redacted)."""
        if not items:
            return
        o = self.options
        largest = max(request(item).tokens for item in items[:200])
        limits = RateLimits(o.rpm, o.tpm, max_request_tokens=largest, period_s=o.rate_period_s)
        stop = stop_event or asyncio.Event()
        queue: asyncio.Queue[T] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async with self.backend.async_client(timeout=o.timeout_s) as client:

            async def one(item: T) -> None:
                req = request(item)
                retrying = AsyncRetrying(stop=_Stop(o.max_attempts), wait=_Wait(o.backoff_initial_s, o.backoff_max_s),
                                         retry=retry_if_exception(is_transient), reraise=True)
                started = time.monotonic()
                try:
                    async for attempt in retrying:
                        with attempt:
                            await limits.acquire(req.tokens if limits.needs_token_estimate else 0)
                            raw = await client.post(req.path, body=req.body, cast_to=bytes)
                            reply = parse_any_reply(raw)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # recorded by the caller, never raised out of the pool
                    error = self.backend.redact(describe(exc))
                    await on_result(item, None, error, time.monotonic() - started)
                    if not is_transient(exc) and isinstance(exc, openai.APIStatusError):
                        self.stopped = error
                        stop.set()
                    return
                await on_result(item, reply, None, time.monotonic() - started)

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await one(item)

            await asyncio.gather(*(worker() for _ in range(max(1, min(o.concurrency, len(items))))))
