"""Rate limits and retries of the generation runner (issue 12, part 1): the limiter's
sliding window and the provider's x-ratelimit-* headers, the token estimate that
never undercounts, 429s that are not failed attempts, and a waiting request that
gives its slot to another. Against the real loopback fake server."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict

import pytest

from gridtune.pipeline.client.ratelimit import LAG_CAP_S, SKEW_S, SLACK_S, WINDOW_MARGIN, RateLimits, parse_reset
from gridtune.pipeline.format.tokens import count_message_tokens, request_tokens
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from tests.fakeserver import TEST_KEY, Fault, charged_tokens, duration, max_in_window
from tests.test_generate import completions, generate, make_project, prompt


@pytest.mark.parametrize("text, seconds", [("6m0s", 360.0), ("1s", 1.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5),
                                           ("8.64s", 8.64), ("0.5", 0.5), ("0s", 0.0)])
def test_reset_durations_in_openai_formats(text, seconds):
    assert parse_reset(text) == pytest.approx(seconds)
    assert parse_reset(duration(seconds)) == pytest.approx(seconds, abs=0.001 if seconds < 60 else 0.5)


@pytest.mark.parametrize("text", ["", "soon", "5x", "-1", "1s2", None])
def test_unreadable_reset_is_none(text):
    assert parse_reset(text) is None


def send(limits, tokens, at, answered_after=0.05):
    """One request through the limiter's bookkeeping: sent at ``at``, its first reply
    byte ``answered_after`` later (None: no reply yet)."""
    assert limits.wait_s(tokens, now=at) == 0
    mark = limits._record(tokens, at)
    if answered_after is not None:
        limits.observe(None, mark, now=at + answered_after)
    return mark


def test_the_window_allows_its_burst_and_then_waits_for_the_oldest():
    limits = RateLimits(rpm=5, period_s=10.0)
    for i in range(5):  # a whole window's budget at once
        send(limits, 0, 100.0 + i * 0.01)
    wait = limits.wait_s(now=101.0)
    # Until the first leaves the window: a window (plus its margin) after its reply.
    assert wait == pytest.approx(100.05 + 10.0 * (1 + WINDOW_MARGIN) + SLACK_S - 101.0)
    assert limits.wait_s(now=101.0 + wait) == 0


def test_a_request_counts_from_its_reply_so_a_late_arrival_never_breaches():
    # The server counts a request from when it got it; a request held up on its way
    # (a busy loop, a loaded server) is counted from its reply, which comes after.
    limits = RateLimits(rpm=1, period_s=10.0)
    mark = send(limits, 0, 0.0, answered_after=None)
    # No reply yet: it is kept for LAG_CAP_S longer than a window, whatever happens.
    assert limits.wait_s(now=5.0) == pytest.approx(LAG_CAP_S + 10.0 * (1 + WINDOW_MARGIN) + SLACK_S - 5.0)
    limits.observe(None, mark, now=1.5)  # its reply came 1.5 s after it was sent
    assert limits.wait_s(now=5.0) == pytest.approx(1.5 + 10.0 * (1 + WINDOW_MARGIN) + SLACK_S - 5.0)
    assert limits.wait_s(now=1.5 + 10.0 * (1 + WINDOW_MARGIN) + SLACK_S) == 0


def test_tokens_wait_until_enough_have_left_the_window():
    limits = RateLimits(tpm=1000, period_s=10.0)
    window = 10.0 * (1 + WINDOW_MARGIN) + SLACK_S
    for t, tokens in ((0.0, 400), (1.0, 400), (2.0, 100)):
        send(limits, tokens, t, answered_after=0.0)
    assert limits.wait_s(100, now=3.0) == 0
    assert limits.wait_s(500, now=3.0) == pytest.approx(window - 3.0)  # the first must leave
    assert limits.wait_s(600, now=3.0) == pytest.approx(1.0 + window - 3.0)  # the first two must leave
    assert limits.wait_s(5000, now=3.0) > 0  # larger than the budget: waits for an empty window...
    assert limits.wait_s(5000, now=30.0) == 0  # ...but is never refused


def test_headers_gate_requests_until_their_reset():
    limits = RateLimits()  # nothing configured: the provider's word alone
    assert not limits.active
    mark = limits._record(0, 49.9)  # the request whose reply reports: the server counted it
    limits.observe({"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "2",
                    "x-ratelimit-reset-requests": "1.5s"}, mark, now=50.0)
    assert limits.active
    send(limits, 0, 50.0)
    send(limits, 0, 50.1)
    assert limits.wait_s(now=50.2) == pytest.approx(1.3 + SKEW_S)  # spent: wait for the reset
    # Whole again after it: 10, less the two sent since the report.
    for i in range(8):
        send(limits, 0, 51.8 + i * 0.01)
    assert limits.wait_s(now=52.0) > 0  # the limit, less ours in the window, is spent
    limits = RateLimits()
    limits.observe({"x-ratelimit-remaining-tokens": "300", "x-ratelimit-reset-tokens": "20ms"}, now=60.0)
    assert limits.needs_token_estimate
    assert limits.wait_s(290, now=60.0) == 0 and limits.wait_s(400, now=60.0) == pytest.approx(0.02 + SKEW_S)
    limits.observe({"x-request-id": "abc"}, now=61.0)  # no budget in it: changes nothing
    assert limits.wait_s(400, now=60.0) == pytest.approx(0.02 + SKEW_S)


def test_a_report_is_read_right_whatever_order_ours_reached_the_server_in():
    # Three sent at once, the third answered first, having reached the server alone:
    # "3 of 4 left". Ours are the only ones on the key, so what is left is the limit
    # less our three in the window: one more, not three.
    limits = RateLimits()
    marks = [limits._record(0, 10.0 + i * 0.001) for i in range(3)]
    limits.observe({"x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "3",
                    "x-ratelimit-reset-requests": "60s"}, marks[2], now=10.1)
    assert limits.wait_s(now=10.1) == 0
    limits._record(0, 10.1)
    assert limits.wait_s(now=10.2) > 0


def test_a_report_keeps_room_for_what_others_on_the_key_used():
    # Answered before the next two went: "1 of 4 left" with one of ours in the window
    # means others used two. Two more of ours leave nothing.
    limits = RateLimits()
    first = limits._record(0, 10.0)
    limits.observe(None, first, now=10.05)
    limits._record(0, 10.1)
    limits.observe({"x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "1",
                    "x-ratelimit-reset-requests": "60s"}, first, now=10.2)
    assert limits.wait_s(now=10.2) > 0  # 4 - 2 others - 2 ours
    # Without others: "3 of 4 left" after the first leaves room for two beside the second.
    limits = RateLimits()
    first = limits._record(0, 10.0)
    limits.observe(None, first, now=10.05)
    limits._record(0, 10.1)
    limits.observe({"x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "3",
                    "x-ratelimit-reset-requests": "60s"}, first, now=10.2)
    assert limits.wait_s(now=10.2) == 0
    limits._record(0, 10.2)
    assert limits.wait_s(now=10.3) == 0
    limits._record(0, 10.3)
    assert limits.wait_s(now=10.4) > 0


LONG_PROMPTS = {
    # The encoder counts these far below a characters-based bound (a provider's counter
    # may not share our tokenizer) ...
    "repeated": "a" * 3000,
    "spaces": "word " + " " * 2500 + "end",
    # ... and these far above it (many tokens per character).
    "cjk": "\u6f22\u5b57\u306e\u6587\u7ae0\u3002" * 400,
    "digits and symbols": "".join(f"{i * 7919 % 1000:03d}#@!" for i in range(600)),
}


@pytest.mark.parametrize("name", sorted(LONG_PROMPTS))
def test_the_estimate_never_undercounts_a_planted_long_prompt(name):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG_PROMPTS[name]}]
    body = {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 200, "n": 3}
    estimate = request_tokens(messages, "gpt-4o-mini", max_tokens=200, n=3)
    encoded = count_message_tokens(messages, "gpt-4o-mini")
    assert estimate >= encoded + 600  # max_tokens is reserved for each of the n choices
    assert estimate >= sum(len(m["content"]) for m in messages) / 3 + 600
    assert estimate >= charged_tokens(body)  # what the fake provider charges it
    assert estimate <= max(encoded, sum(len(m["content"]) for m in messages) / 3) * 1.2 + 700  # and not wildly over


def test_tpm_enforced_by_the_server_with_a_long_prompt_is_never_breached(tmp_path, fake_openai):
    # One cell's prompt is long and made of text the encoder counts low; the server counts
    # characters. An estimate from the encoder alone would breach; ours never does.
    spec = GridSpec(name="t", generation="Write about {a}.",
                    variables={"a": ["x" * 2400, *[f"short {i}" for i in range(11)]]},
                    settings=GenerationSettings(model="gpt-4o-mini", max_tokens=50))
    path = tmp_path / "long.gridtune"
    create_project(path, spec).close()
    fake_openai.set_limits(tpm=900, window_s=1.5, headers=False)
    result = generate(path, concurrency=8, tpm=900, rate_period_s=1.5)
    assert result.exit_code == 0 and result.progress.done == 12
    assert fake_openai.breaches == 0
    assert Counter(r.status for r in fake_openai.chat_requests()) == {200: 12}


def test_a_429_storm_does_not_use_up_max_attempts(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=3, n_b=2)
    # Every request is rate-limited four times before it is answered; max_attempts is 2.
    fake_openai.set(faults=[Fault(status=429, count=4, match=prompt(a, b), retry_after_ms="20",
                                  code="rate_limit_exceeded") for a in (1, 2, 3) for b in "pq"])
    result = generate(path, concurrency=3, max_attempts=2)
    assert result.exit_code == 0 and result.progress.done == 6 and result.progress.failed == 0
    assert all(r.attempts == 5 for r in completions(path))
    assert result.progress.retry_reasons == {"rate_limited": 24}


def test_only_the_time_bound_ends_a_rate_limit(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=1, n_b=1)
    fake_openai.set(faults=[Fault(status=429, retry_after_ms="50", code="rate_limit_exceeded")])
    result = generate(path, max_attempts=2, rate_limit_wait_s=1.0)
    assert result.progress.failed == 1
    (record,) = completions(path, "failed")
    # More than max_attempts (up to 20 in the bound; fewer on a loaded machine), then the bound.
    assert "HTTP 429" in record.error and record.attempts >= 4


def test_a_failure_other_than_429_still_counts_against_max_attempts(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=1, n_b=1)
    fake_openai.set(faults=[Fault(status=500)])
    result = generate(path, max_attempts=3)
    assert result.progress.failed == 1
    assert len(fake_openai.chat_requests()) == 3


def test_a_request_waiting_out_a_retry_after_gives_its_slot_and_comes_back_first(tmp_path, fake_openai):
    # Concurrency 4. The first four cells are told to come back in 1 s; while they wait,
    # the others are served at the full concurrency; when they return they go ahead of
    # the fresh work still queued.
    path = make_project(tmp_path, n_a=12, n_b=4)  # 48 cells
    waiting = [prompt(1, b) for b in "pqrs"]
    fake_openai.set(latency=0.2, faults=[Fault(status=429, count=1, match=p, retry_after="1") for p in waiting])
    result = generate(path, concurrency=4, max_attempts=2)
    assert result.exit_code == 0 and result.progress.done == 48
    requests = sorted(fake_openai.chat_requests(), key=lambda r: r.t)
    sent = defaultdict(list)
    for r in requests:
        sent[r.prompt].append(r.t)
    told = max(sent[p][0] for p in waiting)
    back = min(sent[p][1] for p in waiting)
    last_back = max(sent[p][1] for p in waiting)
    assert back - told >= 0.9
    # While they waited, the server had the whole concurrency busy with other cells:
    # about 4 slots x 5 rounds of 0.2 s (fewer on a loaded machine); a held slot would leave none.
    fresh = [r.t for r in requests if r.prompt not in waiting]
    assert sum(told < t < back for t in fresh) >= 8
    # Back from waiting (within the 10% jitter of their Retry-After), they went ahead
    # of the fresh work still queued: little of it went while they came back, and
    # much of it after them.
    assert sum(back < t < last_back for t in fresh) <= 6
    assert sum(t > last_back for t in fresh) >= 8


def test_the_providers_headers_slow_the_runner_without_a_429(tmp_path, fake_openai):
    # No --rpm: the server enforces 6 requests per 1.5 s and says so in its headers.
    path = make_project(tmp_path, n_a=5, n_b=3)  # 15 requests
    fake_openai.set(latency=0.05)
    fake_openai.set_limits(rpm=6, window_s=1.5)
    result = generate(path, concurrency=5)
    assert result.exit_code == 0 and result.progress.done == 15
    assert fake_openai.breaches == 0
    times = [r.t for r in fake_openai.chat_requests()]
    assert len(times) == 15 and max_in_window(times, 1.5) <= 6
    assert max(times) - min(times) >= 2 * 1.5 - 0.1  # three windows' worth: it waited for the resets


def test_without_the_headers_the_same_server_turns_requests_away(tmp_path, fake_openai):
    # The contrast: a server that enforces the same limit without saying so; the run
    # still ends with every cell done (429s are waited out), but only after breaches.
    path = make_project(tmp_path, n_a=5, n_b=3)
    fake_openai.set(latency=0.05)
    fake_openai.set_limits(rpm=6, window_s=1.5, headers=False)
    result = generate(path, concurrency=5)
    assert result.exit_code == 0 and result.progress.done == 15
    assert fake_openai.breaches > 0


def test_configured_limits_with_a_burst_stay_within_the_window(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=6, n_b=3)  # 18 requests at 8 per 1.5 s
    fake_openai.set_limits(rpm=8, window_s=1.5, headers=False)
    result = generate(path, concurrency=8, rpm=8, rate_period_s=1.5)
    assert result.exit_code == 0 and fake_openai.breaches == 0
    times = sorted(r.t for r in fake_openai.chat_requests())
    assert max_in_window(times, 1.5) == 8
    assert times[7] - times[0] < 0.8  # the window's burst is used at once, not paced out (1.3 s)
    # Three bursts: two windows (each counted from a reply, with the limiter's margin), not 18/8 of one paced.
    assert times[-1] - times[0] < 2 * (1.5 * (1 + WINDOW_MARGIN) + SLACK_S + 0.25) + 1.0  # room for a loaded machine


def test_request_pool_waits_out_429s_past_max_attempts(fake_openai):
    from gridtune.pipeline.client.request_pool import Pool, PoolOptions, Request
    from gridtune.pipeline.client.resolve import resolve_backend

    fake_openai.set(faults=[Fault(status=429, count=6, retry_after_ms="10", code="rate_limit_exceeded")])
    got = []

    async def on_result(item, reply, error, latency):
        got.append((item, reply is not None, error))

    pool = Pool(resolve_backend(), PoolOptions(concurrency=2, max_attempts=2, backoff_initial_s=0.01))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    asyncio.run(pool.run([1, 2], lambda i: Request("/chat/completions", body, 10), on_result))
    assert sorted(got) == [(1, True, None), (2, True, None)]


# -- the lean HTTP client of plain requests (pipeline/lean_http.py) -----------------------------


@pytest.mark.parametrize("lean", ["1", "0"])
def test_plain_requests_fail_and_retry_alike_through_the_lean_client_and_the_openai_client(
        tmp_path, fake_openai, monkeypatch, lean):
    monkeypatch.setenv("GRIDTUNE_LEAN_HTTP", lean)
    path = make_project(tmp_path, n_a=3, n_b=2)
    fake_openai.set(faults=[
        Fault(status=404, match=prompt(1, "p"), code="model_not_found", message="The model does not exist"),
        Fault(status=429, count=2, match=prompt(1, "q"), retry_after_ms="30", code="rate_limit_exceeded"),
        Fault(status=503, count=1, match=prompt(2, "p"), retry_after="0"),
        Fault(kind="malformed", count=1, match=prompt(2, "q")),
        Fault(kind="stall", count=1, stall_s=1.0, match=prompt(3, "p")),
        Fault(status=429, match=prompt(3, "q"), code="insufficient_quota", message="You exceeded your quota"),
    ])
    result = generate(path, stream=False, concurrency=3, timeout_s=0.4)
    assert result.progress.done == 4 and result.progress.failed == 2
    assert sorted(r.error for r in completions(path, "failed")) == [
        "HTTP 404 [model_not_found]: The model does not exist",
        "HTTP 429 [insufficient_quota]: You exceeded your quota"]
    assert result.progress.retry_reasons == {"rate_limited": 2, "server_error": 1, "malformed": 1, "timeout": 1}
    sent = fake_openai.chat_requests()
    assert all(r.headers["authorization"] == f"Bearer {TEST_KEY}" for r in sent)
    assert all(r.body["model"] == "gpt-4o-mini" and r.body["max_tokens"] == 50 for r in sent)


def test_lean_client_reads_chunked_and_close_delimited_replies_and_reconnects():
    from gridtune.pipeline.client.lean_http import LeanHttpClient

    replies = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Ratelimit-Remaining-Requests: 7\r\n\r\n"
        b"5\r\n{\"a\":\r\n3;ext=1\r\n 1}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\n{\"b\": 2}",
        b"HTTP/1.0 200 OK\r\n\r\n{\"c\": 3}",
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 66\r\nRetry-After: 2\r\n\r\n"
        b"{\"error\": {\"message\": \"slow down\", \"code\": \"rate_limit_exceeded\"}}",
    ]
    connections = []

    async def main():
        async def serve(reader, writer):
            connections.append(writer)
            while replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                reply = replies.pop(0)
                writer.write(reply)
                await writer.drain()
                if b"close" in reply or b"HTTP/1.0" in reply:
                    break
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = LeanHttpClient(f"http://127.0.0.1:{port}/v1", {"Authorization": "Bearer k"}, timeout_s=5)
        got = [await client.post("/x", {"n": i}) for i in range(3)]
        with pytest.raises(__import__("openai").RateLimitError) as caught:
            await client.post("/x", {})
        await client.close()
        server.close()
        return got, caught.value

    got, error = asyncio.run(main())
    assert [json.loads(body) for _, body in got] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert got[0][0]["x-ratelimit-remaining-requests"] == "7"
    assert len(connections) == 3  # kept alive once, then a new connection after each close
    assert error.status_code == 429 and error.response.headers["retry-after"] == "2"


# -- --max-cost (issue 12, part 3; the pipeline side) ------------------------------------------


def test_max_cost_stops_before_spending_more_and_a_rerun_resumes(tmp_path, fake_openai):
    from gridtune.pipeline.format.cost import generation_cost
    from gridtune.pipeline.format.tokens import request_tokens

    path = make_project(tmp_path, n_a=4, n_b=3)  # 12 cells of gpt-4o-mini, max_tokens 50
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt(1, "p")}]
    worst = generation_cost("gpt-4o-mini", request_tokens(messages, "gpt-4o-mini"), 50)
    budget = 4.5 * worst  # room for about four requests at their worst
    result = generate(path, concurrency=2, max_cost=budget)
    assert result.state == "stopped" and result.budget_reached and result.exit_code == 0
    done = completions(path, "done")
    assert 4 <= len(done) < 12 and result.spent <= budget
    assert result.spent == pytest.approx(sum(generation_cost("gpt-4o-mini", r.prompt_tokens, r.completion_tokens)
                                             for r in done))
    assert len(completions(path, "pending")) == 12 - len(done)  # nothing lost, nothing half-written
    again = generate(path, concurrency=2, max_cost=100.0)
    assert again.state == "finished" and not again.budget_reached and again.progress.done == 12 - len(done)


def test_max_cost_needs_a_priced_model_and_a_positive_amount(tmp_path, fake_openai):
    from gridtune.pipeline.generation.generate import GenerateError

    path = make_project(tmp_path, n_a=1, n_b=1, model="my-local-model")
    with pytest.raises(GenerateError, match="--max-cost needs a priced model: no price is known for my-local-model"):
        generate(path, max_cost=1.0)
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(GenerateError, match="--max-cost must be a positive amount in USD"):
            generate(path, max_cost=bad)
    assert fake_openai.chat_requests() == []


def test_cli_generate_max_cost_shows_the_bound_and_stops_at_the_budget(tmp_path, fake_openai):
    from click.testing import CliRunner

    from gridtune.cli.main import main

    path = make_project(tmp_path, n_a=4, n_b=3)
    out = CliRunner().invoke(main, ["generate", str(path), "--concurrency", "2", "--max-cost", "0.0001"])
    assert out.exit_code == 0, out.output
    assert "cost: max cost $0.0001: up to $0.000" in out.output and "stops short of it" in out.output
    assert "run it again to resume" in out.output
    assert 0 < len(completions(path, "done")) < 12
    out = CliRunner().invoke(main, ["generate", str(path), "--max-cost", "-1"])
    assert out.exit_code == 2 and "--max-cost must be a positive amount in USD" in out.output
