"""The pool of one-shot requests (pipeline/request_pool.py: the judge's grades, the
evaluation's answers) against the real loopback fake server: a request waiting out a
Retry-After or a backoff gives its slot to another and comes back ahead of fresh work;
429s are waited out, not counted; other transient failures count against max_attempts;
a permanent error stops the pool. Orders, not tight timings: the suite runs loaded."""

from __future__ import annotations

import asyncio
import time

import pytest

from gridtune.pipeline.client.request_pool import Pool, PoolOptions, Request
from gridtune.pipeline.client.resolve import resolve_backend
from tests.fakeserver import Fault


def ask(i: int) -> Request:
    return Request("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": f"item-{i}."}]}, 10)


def run_pool(items, stop_event=None, **options):
    """Run a pool over ``items``: (pool, {item: (reply text or None, error, latency)}, result order)."""
    results: dict[int, tuple[str | None, str | None, float]] = {}
    order: list[int] = []

    async def on_result(item, reply, error, latency):
        assert item not in results, f"item {item} got two results"
        results[item] = (None if reply is None else reply.text, error, latency)
        order.append(item)

    pool: Pool[int] = Pool(resolve_backend(), PoolOptions(**{"backoff_initial_s": 0.01, **options}))
    asyncio.run(pool.run(items, ask, on_result, stop_event))
    return pool, results, order


def sent(fake_openai) -> list[int]:
    """The items the server was asked for, in the order it had them."""
    return [int(r.prompt.split("-")[1].rstrip(".")) for r in sorted(fake_openai.chat_requests(), key=lambda r: r.t)]


def test_a_request_waiting_out_a_retry_after_gives_its_slot_and_comes_back_first(fake_openai):
    # One worker. Item 0 is told to come back in 1 s; while it waits the worker answers
    # the next items (at most ~11 in that time at 0.1 s each); back, it goes before the
    # fresh items still queued.
    fake_openai.set(latency=0.1, faults=[Fault(status=429, count=1, match="item-0.", retry_after_ms="1000",
                                               code="rate_limit_exceeded")])
    items = list(range(16))
    pool, results, order = run_pool(items, concurrency=1, max_attempts=2)
    assert pool.stopped is None
    assert all(results[i][0] and results[i][1] is None for i in items)
    seq = sent(fake_openai)
    back = seq.index(0, 1)  # its second send
    # Told to wait, it held no slot: others went meanwhile; back, it went ahead of the rest.
    assert seq == [0, *range(1, back), 0, *range(back, 16)]
    assert 2 <= back < 16, seq
    times = sorted(r.t for r in fake_openai.chat_requests() if r.prompt == "item-0.")
    assert times[1] - times[0] >= 0.95  # the Retry-After was honoured
    assert results[0][2] >= 0.95  # its latency counts from its first send
    assert order.index(0) == back - 1


def test_429s_past_max_attempts_are_waited_out(fake_openai):
    fake_openai.set(faults=[
        Fault(status=429, count=5, match="item-0.", retry_after_ms="20", code="rate_limit_exceeded"),
        Fault(status=429, count=4, match="item-1.", code="rate_limit_exceeded"),  # no Retry-After: backoff
    ])
    pool, results, _ = run_pool(list(range(4)), concurrency=2, max_attempts=2)
    assert pool.stopped is None
    assert all(results[i][0] and results[i][1] is None for i in range(4))
    seq = sent(fake_openai)
    assert seq.count(0) == 6 and seq.count(1) == 5 and seq.count(2) == seq.count(3) == 1


def test_429s_end_only_at_the_time_bound(fake_openai):
    fake_openai.set(faults=[Fault(status=429, match="item-0.", retry_after_ms="50", code="rate_limit_exceeded")])
    started = time.monotonic()
    pool, results, _ = run_pool(list(range(3)), concurrency=2, max_attempts=2, rate_limit_wait_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert pool.stopped is None  # a rate limit is not a permanent error
    text, error, latency = results[0]
    assert text is None and error.startswith("HTTP 429 [rate_limit_exceeded]") and latency >= 0.3
    assert sent(fake_openai).count(0) >= 4  # far past max_attempts=2
    assert results[1][0] and results[2][0]


def test_a_server_error_repeated_max_attempts_times_fails_that_item_only(fake_openai):
    fake_openai.set(faults=[
        Fault(status=500, match="item-1.", message="boom"),
        Fault(status=503, count=2, match="item-2.", retry_after="0"),  # recovers on its third try
    ])
    pool, results, order = run_pool(list(range(6)), concurrency=2, max_attempts=3)
    assert pool.stopped is None
    text, error, _ = results[1]
    assert text is None and error.startswith("HTTP 500") and "boom" in error
    assert all(results[i][0] and results[i][1] is None for i in (0, 2, 3, 4, 5))
    assert sorted(order) == list(range(6))
    seq = sent(fake_openai)
    assert seq.count(1) == 3 and seq.count(2) == 3
    assert all(seq.count(i) == 1 for i in (0, 3, 4, 5))


@pytest.mark.parametrize("status, code", [(401, "invalid_api_key"), (404, "model_not_found")])
def test_a_permanent_error_stops_the_pool(fake_openai, status, code):
    fake_openai.set(faults=[Fault(status=status, match="item-2.", code=code, message="no such thing")])
    pool, results, order = run_pool(list(range(6)), concurrency=1)
    assert pool.stopped is not None and pool.stopped.startswith(f"HTTP {status} [{code}]")
    assert order == [0, 1, 2] and results[2][0] is None and results[2][1] == pool.stopped
    assert sent(fake_openai) == [0, 1, 2]  # nothing sent after it, and it was not retried


def test_a_stop_drops_the_requests_waiting_to_be_tried_again(fake_openai):
    # Item 0 waits out a 5 s Retry-After; item 1's 404 stops the pool meanwhile: the pool
    # ends at once, item 0 without a result (a next pass asks it again).
    fake_openai.set(latency=0.05, faults=[
        Fault(status=429, match="item-0.", retry_after="5", code="rate_limit_exceeded"),
        Fault(status=404, match="item-1.", code="model_not_found"),
    ])
    started = time.monotonic()
    pool, results, order = run_pool(list(range(5)), concurrency=2)
    assert time.monotonic() - started < 4
    assert pool.stopped and pool.stopped.startswith("HTTP 404")
    assert 0 not in results and results[1][1] == pool.stopped
    assert sent(fake_openai).count(0) == 1


def test_a_stop_event_ends_the_pool_and_a_cancelled_run_leaves_no_timer(fake_openai):
    got = []

    async def on_result(item, reply, error, latency):
        got.append(item)

    async def main(cancel: bool):
        loop = asyncio.get_running_loop()
        handles = []
        call_later = loop.call_later

        def recording(*args, **kwargs):
            handle = call_later(*args, **kwargs)
            handles.append(handle)
            return handle

        loop.call_later = recording  # type: ignore[method-assign]
        stop = asyncio.Event()
        pool: Pool[int] = Pool(resolve_backend(), PoolOptions(concurrency=2))
        task = asyncio.create_task(pool.run([0, 1, 2], ask, on_result, stop))
        async def settled():  # 0 waits on a timer; 1 and 2 are done
            while not any(h for h in handles if not h.cancelled()) or len(got) < 2:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(settled(), 20)
        if cancel:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            stop.set()
            await asyncio.wait_for(task, 4)
        assert pool.stopped is None
        return handles

    for cancel in (False, True):
        fake_openai.reset()
        fake_openai.set(faults=[Fault(status=429, match="item-0.", retry_after="5", code="rate_limit_exceeded")])
        got.clear()
        handles = asyncio.run(main(cancel))
        assert sorted(got) == [1, 2]  # item 0 was waiting: no result
        assert handles and all(h.cancelled() for h in handles)
        assert sent(fake_openai).count(0) == 1


def test_every_answer_tells_the_limiter_what_the_provider_reported(fake_openai, monkeypatch):
    # Each reply, and each error that has a response (a 429), goes to limits.observe with
    # the mark acquire gave its send: the limiter learns the x-ratelimit-* budget, and
    # when the server had the request.
    from gridtune.pipeline.client.ratelimit import RateLimits

    marks, observed = [], []
    acquire, observe = RateLimits.acquire, RateLimits.observe

    async def spy_acquire(self, tokens=0):
        mark = await acquire(self, tokens)
        marks.append(mark)
        return mark

    def spy_observe(self, headers, mark=None, now=None):
        observed.append((mark, dict(headers or {})))
        return observe(self, headers, mark, now)

    monkeypatch.setattr(RateLimits, "acquire", spy_acquire)
    monkeypatch.setattr(RateLimits, "observe", spy_observe)
    fake_openai.set_limits(rpm=1000)
    fake_openai.set(faults=[Fault(status=429, count=1, match="item-1.", retry_after_ms="10",
                                  code="rate_limit_exceeded")])
    pool, results, _ = run_pool(list(range(4)), concurrency=2)
    assert pool.stopped is None and all(results[i][0] for i in range(4))
    assert len(marks) == 5 and len(set(marks)) == 5  # 4 items, one sent twice
    assert sorted(mark for mark, _ in observed) == sorted(marks)  # each send observed once, with its mark
    assert all("x-ratelimit-remaining-requests" in headers for _, headers in observed)
    assert sum("retry-after-ms" in headers for _, headers in observed) == 1  # the 429's
