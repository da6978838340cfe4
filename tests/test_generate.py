"""The generation runner against a real HTTP server on 127.0.0.1 (tests/fakeserver.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.format.tokens import count_message_tokens
from gridtune.pipeline.generation import runs
from gridtune.pipeline.generation.generate import GenerateOptions, NothingToDo, run_generation
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import RunConflict, Store
from tests.fakeserver import TEST_KEY, Fault, max_in_window, reply_text
from tests.server_support import varied_model_dir  # noqa: F401 - fixture

FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, progress_interval_s=0.1)


def make_project(tmp_path: Path, n_a: int = 4, n_b: int = 3, samples: int = 1,
                 model: str | None = "gpt-4o-mini", name: str = "p.gridtune") -> Path:
    spec = GridSpec(
        name="test", system="You are terse.", generation="Write about {a} and {b}.",
        variables={"a": list(range(1, n_a + 1)), "b": [chr(ord("p") + i) for i in range(n_b)]},
        settings=GenerationSettings(model=model, temperature=0.7, max_tokens=50, samples=samples, seed=7),
    )
    path = tmp_path / name
    create_project(path, spec).close()
    return path


def prompt(a: int, b: str) -> str:
    return f"Write about {a} and {b}."


def generate(path: Path, **kw) -> asyncio.Future:
    options = GenerateOptions(**{**FAST, **kw})
    return asyncio.run(run_generation(path, options))


def completions(path: Path, status: str | None = None):
    with Store.open(path) as store:
        return store.completions(status=status)


def test_every_completion_is_generated_and_saved_whole(tmp_path, fake_openai):
    path = make_project(tmp_path, samples=2)
    result = generate(path, concurrency=4)
    assert (result.state, result.exit_code, result.progress.done, result.progress.failed) == ("finished", 0, 24, 0)
    rows = completions(path)
    assert len(rows) == 24 and {r.status for r in rows} == {"done"}
    for r in rows:
        assert r.text == reply_text(prompt(r.values["a"], r.values["b"]))
        assert r.model == "gpt-4o-mini"  # as the server reported it
        assert r.params == {"temperature": 0.7, "max_tokens": 50, "seed": 7 + r.sample}  # samples differ
        assert r.prompt_tokens == 5 and r.completion_tokens == len(r.text.split())
        assert r.finish_reason == "stop" and r.attempts == 1 and r.latency_s > 0
    sent = fake_openai.chat_requests()
    assert len(sent) == 24
    assert {r.headers["authorization"] for r in sent} == {f"Bearer {TEST_KEY}"}
    body = sent[0].body
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-4o-mini", 0.7, 50)
    assert Counter(r.body["seed"] for r in sent) == {7: 12, 8: 12}
    # The key never reaches the project file (database, WAL or log).
    for f in tmp_path.iterdir():
        assert TEST_KEY.encode() not in f.read_bytes(), f


def test_rerun_resumes_only_what_is_left(tmp_path, fake_openai):
    path = make_project(tmp_path)
    first = generate(path, limit=5)
    assert first.progress.total == 5 and first.progress.done == 5
    second = generate(path, concurrency=3)
    assert second.progress.total == 7 and second.exit_code == 0
    prompts = [r.prompt for r in fake_openai.chat_requests()]
    assert len(prompts) == 12 and len(set(prompts)) == 12  # no cell asked twice
    with pytest.raises(NothingToDo, match="nothing left to generate: all 12 completions are done"):
        generate(path)  # nothing left: no request and no empty run
    with Store.open(path) as store:
        assert store.latest_run().id == 2
    assert len(fake_openai.chat_requests()) == 12


def test_model_override_and_overrides_are_sent(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=1, n_b=2)
    generate(path, model="other-model", temperature=0.1, max_tokens=3)
    sent = fake_openai.chat_requests()
    assert {(r.body["model"], r.body["temperature"], r.body["max_tokens"]) for r in sent} == {("other-model", 0.1, 3)}
    rows = completions(path)
    assert {r.model for r in rows} == {"other-model"}
    assert {r.finish_reason for r in rows} == {"length"}  # the fake cut the reply at max_tokens words


def test_429_storm_still_ends_with_every_cell_done(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=5, n_b=4)
    fake_openai.set(faults=[Fault(status=429, prob=0.6, retry_after_ms="10", code="rate_limit_exceeded")])
    result = generate(path, concurrency=8, max_attempts=30)
    assert result.exit_code == 0 and result.progress.done == 20
    statuses = Counter(r.status for r in fake_openai.chat_requests())
    assert statuses[429] >= 10 and statuses[200] == 20
    assert result.progress.retries == statuses[429]
    assert max(r.attempts for r in completions(path)) > 1


def test_retry_after_headers_are_honoured(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=1)
    fake_openai.set(faults=[
        Fault(status=429, count=1, match=prompt(1, "p"), retry_after_ms="400"),
        Fault(status=503, count=1, match=prompt(2, "p"), retry_after="1"),
    ])
    assert generate(path, concurrency=2).exit_code == 0  # backoff alone would wait ~0.01 s
    times = defaultdict(list)
    for r in fake_openai.chat_requests():
        times[r.prompt].append(r.t)
    gap_ms = times[prompt(1, "p")][1] - times[prompt(1, "p")][0]
    gap_s = times[prompt(2, "p")][1] - times[prompt(2, "p")][0]
    assert 0.4 <= gap_ms < 1.0 and 1.0 <= gap_s < 2.0


@pytest.mark.parametrize("status, code", [
    (400, None), (401, "invalid_api_key"), (403, None), (404, "model_not_found"), (422, None),
    (429, "insufficient_quota"),
])
def test_permanent_errors_are_recorded_and_not_retried(tmp_path, fake_openai, status, code):
    path = make_project(tmp_path, n_a=2, n_b=2)
    bad = prompt(2, "q")
    fake_openai.set(faults=[Fault(status=status, code=code, match=bad, message="you cannot do that")])
    result = generate(path, max_attempts=5)
    assert result.exit_code == 1 and (result.progress.done, result.progress.failed) == (3, 1)
    [failed] = completions(path, "failed")
    assert failed.values == {"a": 2, "b": "q"} and failed.error_kind == "permanent" and failed.attempts == 1
    assert failed.error.startswith(f"HTTP {status}") and "you cannot do that" in failed.error
    if code:
        assert code in failed.error
    assert [r.prompt for r in fake_openai.chat_requests()].count(bad) == 1


def test_transient_failure_that_outlasts_its_retries_is_recorded(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=1, n_b=2)
    bad = prompt(1, "q")
    fake_openai.set(faults=[Fault(status=500, match=bad)])
    result = generate(path, max_attempts=3)
    assert result.exit_code == 1
    [failed] = completions(path, "failed")
    assert (failed.error_kind, failed.attempts) == ("transient", 3) and "HTTP 500" in failed.error
    assert [r.prompt for r in fake_openai.chat_requests()].count(bad) == 3
    # A rerun tries the failed cell again, and only it; this time it works.
    fake_openai.set(faults=[])
    assert generate(path).exit_code == 0
    assert [r.prompt for r in fake_openai.chat_requests()].count(bad) == 4
    assert [r.prompt for r in fake_openai.chat_requests()].count(prompt(1, "p")) == 1
    [row] = [r for r in completions(path) if r.values["b"] == "q"]
    assert (row.status, row.error, row.attempts) == ("done", None, 4)


def test_timeouts_and_malformed_replies_are_retried(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=2)
    fake_openai.set(faults=[Fault(kind="stall", count=1, stall_s=2.0), Fault(kind="malformed", count=2),
                            Fault(kind="empty", count=1)])
    result = generate(path, timeout_s=0.5)
    assert result.exit_code == 0 and result.progress.done == 4
    assert sum(r.attempts - 1 for r in completions(path)) == 4
    assert Counter(r.fault for r in fake_openai.chat_requests())["stall"] == 1


def test_rpm_limit_holds_over_every_window(tmp_path, fake_openai):
    # The limiter's "minute" is scaled to 2 s so the test is short; the same
    # leaky bucket is used with 60 s in real runs. 6 per window, 14 requests:
    # a bucket sized naively (6 at once, then leaking 6 per window) puts 11 in the first.
    path = make_project(tmp_path, n_a=7, n_b=2)
    result = generate(path, concurrency=8, rpm=6, rate_period_s=2.0)
    assert result.exit_code == 0
    times = [r.t for r in fake_openai.chat_requests()]
    assert len(times) == 14
    assert max_in_window(times, 2.0) <= 6
    assert max_in_window(times, 2.0) >= 5  # and the limit is used, not starved


def test_tpm_limit_holds_over_every_window(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=5, n_b=2)
    result = generate(path, concurrency=8, tpm=400, rate_period_s=2.0)
    assert result.exit_code == 0
    sent = sorted(fake_openai.chat_requests(), key=lambda r: r.t)
    cost = [count_message_tokens(r.body["messages"], "gpt-4o-mini") + r.body["max_tokens"] for r in sent]
    assert 50 < cost[0] < 100
    worst = max(sum(c for r, c in zip(sent, cost) if first.t <= r.t <= first.t + 2.0) for first in sent)
    assert worst <= 400


def test_stop_event_cancels_in_flight_work_and_leaves_no_half_written_row(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=5, n_b=4)
    fake_openai.set(latency=0.3)
    seen = []

    async def go():
        stop = asyncio.Event()

        def on_progress(p):
            seen.append(p)
            if p.done >= 4:
                stop.set()

        return await run_generation(path, GenerateOptions(concurrency=4, **FAST), on_progress, stop)

    result = asyncio.run(go())
    assert result.state == "stopped" and 4 <= result.progress.done < 20
    assert seen[-1].state == "stopped" and seen[-1].in_flight == 0
    rows = completions(path)
    assert {r.status for r in rows} == {"done", "pending"}
    for r in rows:
        complete = (r.text, r.model, r.completion_tokens, r.finish_reason)
        assert all(v is not None for v in complete) if r.status == "done" else r.text is None
    with Store.open(path) as store:
        assert store.latest_run().state == "stopped"
    assert generate(path).progress.total == 20 - result.progress.done  # the rest, resumed


def test_stop_requested_through_the_store_is_noticed(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=5, n_b=4)
    fake_openai.set(latency=0.3)
    outcome = {}

    def stopper():
        import time
        time.sleep(0.8)
        outcome["run"] = runs.request_stop(path, wait_s=5)

    thread = threading.Thread(target=stopper)
    thread.start()
    result = generate(path, concurrency=2, progress_interval_s=0.2)
    thread.join()
    assert result.state == "stopped" and result.exit_code == 0 and result.progress.done < 20
    assert outcome["run"].state == "stopped" and not outcome["run"].active
    assert all(r.status in ("done", "pending") for r in completions(path))


def test_cancelling_the_task_stops_the_run_cleanly(tmp_path, fake_openai):
    """What the TUI does when it closes mid-run: cancel the task running it."""
    path = make_project(tmp_path, n_a=5, n_b=4)
    fake_openai.set(latency=0.3)

    def broken_display(p):
        raise RuntimeError("a display bug")  # must not stop the heartbeat or the run

    async def go():
        task = asyncio.create_task(run_generation(path, GenerateOptions(concurrency=4, **FAST), broken_display))
        while len(completions(path, "done")) < 4:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert {r.status for r in completions(path)} == {"done", "pending"}
    with Store.open(path) as store:
        run = store.latest_run()
    assert run.state == "stopped" and run.progress["done"] >= 4 and run.progress["in_flight"] == 0


def test_a_second_run_is_refused_naming_the_first(tmp_path, fake_openai):
    path = make_project(tmp_path)
    fake_openai.set(latency=0.3)

    async def go():
        first = asyncio.create_task(run_generation(path, GenerateOptions(concurrency=1, **FAST)))
        await asyncio.sleep(0.5)
        with pytest.raises(RunConflict, match=r"run #1 is already running"):
            await run_generation(path, GenerateOptions(**FAST))
        return await first

    assert asyncio.run(go()).exit_code == 0  # the refusal did not disturb the first run


# -- the command line --------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--rpm", "-5"], "--rpm must be positive"),
    (["--tpm", "0"], "--tpm must be positive"),
    (["--limit", "-1"], "--limit must be 0 or more"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--temperature", "3"], "--temperature must be within 0..2"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--timeout", "nan"], "--timeout must be positive"),
    (["--rpm", "inf"], "--rpm must be positive"),
    (["--tpm", "nan"], "--tpm must be positive"),
    (["--concurrency", "many"], "'many' is not a valid integer"),
    (["--bogus"], "No such option"),
])
def test_bad_options_exit_2_and_send_nothing(tmp_path, fake_openai, args, message):
    path = make_project(tmp_path)
    result = CliRunner().invoke(main, ["generate", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert fake_openai.chat_requests() == []


def test_no_model_and_no_project_exit_2(tmp_path, fake_openai):
    path = make_project(tmp_path, model=None)
    result = CliRunner().invoke(main, ["generate", str(path)])
    assert result.exit_code == 2 and "no model to generate with: pass --model" in result.output
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "missing.gridtune")])
    assert result.exit_code == 2 and "no such project" in result.output
    assert fake_openai.chat_requests() == []


def test_cli_exit_codes_and_status_json(tmp_path, fake_openai):
    import json

    path = make_project(tmp_path, n_a=2, n_b=2)
    fake_openai.set(faults=[Fault(status=401, match=prompt(1, "p"), message="bad key")])
    result = CliRunner().invoke(main, ["generate", str(path), "--concurrency", "2"])
    assert result.exit_code == 1, result.output
    assert "3 done, 1 failed of 4" in result.output and "HTTP 401: bad key" in result.output
    status = CliRunner().invoke(main, ["status", str(path), "--json"])
    assert status.exit_code == 0
    data = json.loads(status.stdout)
    assert {k: data[k] for k in ("cells", "completions", "done", "failed", "pending", "graded")} == \
        {"cells": 4, "completions": 4, "done": 3, "failed": 1, "pending": 0, "graded": 0}
    assert data["grades"] == {str(g): 0 for g in range(1, 6)}
    assert data["run"]["id"] == 1 and data["run"]["state"] == "finished"
    assert data["run"]["progress"]["done"] == 3
    fake_openai.set(faults=[])
    result = CliRunner().invoke(main, ["generate", str(path)])
    assert result.exit_code == 0 and "1 done, 0 failed of 1" in result.output


async def test_store_writer_group_commits_in_order_and_keeps_a_failure_from_the_others(tmp_path):
    from gridtune.pipeline.generation.generate import _Writer

    path = make_project(tmp_path, n_a=2, n_b=2)
    store = Store.open(path)
    items = store.pending_work()
    writer = _Writer(store)

    def broken(*_args):
        raise sqlite3.OperationalError("disk I/O error")

    for n, item in enumerate(items):
        if n == 1:
            writer.later(broken)
        writer.later(store.save_done, item.completion_id, text=f"reply {n}", model="m", params=None,
                     prompt_tokens=1, completion_tokens=1, latency_s=0.0, finish_reason="stop", attempts=1)
    assert await writer.call(store.status_counts) is not None  # a result comes back through the queue
    await writer.close()
    assert isinstance(writer.error, sqlite3.OperationalError)
    with Store.open(path) as fresh:
        assert fresh.status_counts().done == len(items)  # the failed write lost nothing else
        assert [fresh.get_completion(i.completion_id).text for i in items] == [f"reply {n}" for n in range(len(items))]
    store.close()


# -- a slow server is not a failure; retries say why; concurrency follows the server -----


def test_streamed_replies_slower_than_the_timeout_in_total_finish_with_no_retries(tmp_path, fake_openai):
    # Every reply takes 0.6-4 s in all, far past the 0.5 s timeout, but a word comes every 0.05 s:
    # the timeout is between chunks, so nothing times out and nothing is asked twice.
    path = make_project(tmp_path, n_a=3, n_b=2)
    fake_openai.set(chunk_delay_s=0.05)
    result = generate(path, concurrency=6, timeout_s=0.5)
    assert (result.exit_code, result.progress.done, result.progress.retries) == (0, 6, 0)
    sent = fake_openai.chat_requests()
    assert len(sent) == 6
    assert all(r.body["stream"] is True and r.body["stream_options"] == {"include_usage": True} for r in sent)
    for r in completions(path):
        words = reply_text(prompt(r.values["a"], r.values["b"])).split(" ")
        assert r.text == " ".join(words[:50])  # max_tokens 50 words in the fake
        assert r.finish_reason == ("length" if len(words) > 50 else "stop")
        assert r.prompt_tokens == 5 and r.completion_tokens == len(r.text.split())  # from the usage chunk
        assert r.latency_s > 0.05 * len(r.text.split(" ")) * 0.9
    assert max(r.latency_s for r in completions(path)) > 0.5  # slower than the timeout, and not a failure


def test_the_plain_request_is_used_for_openai_and_on_request(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=1)
    assert generate(path, stream=False).exit_code == 0
    assert all("stream" not in r.body for r in fake_openai.chat_requests())
    assert [r.text for r in completions(path)] == [reply_text(prompt(a, "p")) for a in (1, 2)]


def test_a_server_that_ignores_stream_true_is_read_as_a_plain_reply(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=1)
    fake_openai.set(ignore_stream=True)
    result = generate(path)
    assert (result.exit_code, result.progress.retries) == (0, 0)
    assert {r.finish_reason for r in completions(path)} == {"stop"}


def test_queue_limit_429_with_retry_after_is_waited_out_and_counted_by_reason(tmp_path, fake_openai):
    # The local server's queue limit: past 2 requests at once it answers 429 + Retry-After.
    path = make_project(tmp_path, n_a=4, n_b=3)
    fake_openai.set(max_in_flight=2, chunk_delay_s=0.01)
    fake_openai.busy_retry_after = "0.1"
    result = generate(path, concurrency=6, max_attempts=2)  # 429s do not use up the attempts
    assert (result.exit_code, result.progress.done, result.progress.failed) == (0, 12, 0)
    busy = sum(r.status == 429 for r in fake_openai.chat_requests())
    assert busy >= 4 and result.progress.retries == busy
    assert result.progress.retry_reasons == {"rate_limited": busy}
    assert f"retries {busy}: {busy} busy/rate-limited (429)" in result.progress.summary()
    status = CliRunner().invoke(main, ["status", str(path), "--json"])
    import json

    data = json.loads(status.stdout)
    assert data["retries"] == busy
    assert data["retry_reasons"] == {"timeout": 0, "rate_limited": busy, "server_error": 0, "connection": 0,
                                     "malformed": 0, "other": 0}
    text = CliRunner().invoke(main, ["status", str(path)]).output
    assert f"retries {busy}: {busy} busy/rate-limited (429)" in text


def test_retry_reasons_name_timeouts_server_errors_and_malformed_replies(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=2)
    fake_openai.set(faults=[Fault(kind="stall", count=1, stall_s=2.0), Fault(status=503, count=2),
                            Fault(kind="malformed", count=1)])
    result = generate(path, timeout_s=0.5, concurrency=1)
    assert result.exit_code == 0 and result.progress.done == 4
    assert result.progress.retry_reasons == {"timeout": 1, "server_error": 2, "malformed": 1}
    assert result.progress.retry_text() == \
        "retries 4: 1 timeout, 2 server errors (5xx), 1 malformed reply"


def test_concurrency_defaults_to_what_the_server_batches(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=4, n_b=3)
    fake_openai.set(latency=0.2, gridtune={"max_batch": 3, "context_length": 2048, "in_flight": 0, "decoding": 0,
                                           "stream_tokens_per_s": 20.0, "batch_tokens_per_s": 45.0,
                                           "generated_tokens": 0})
    result = generate(path)
    assert result.exit_code == 0 and fake_openai.peak_in_flight == 3
    with Store.open(path) as store:
        assert store.latest_run().params["concurrency"] == 3
    # An explicit value wins, but one far above the batch is capped at twice it, with a note.
    fake_openai.peak_in_flight = 0
    out = CliRunner().invoke(main, ["generate", str(path), "--concurrency", "100"])
    assert out.exit_code == 0 and "nothing left to generate" in out.output
    with Store.open(path) as store:
        store._conn.execute("UPDATE completions SET status = 'pending', text = NULL")
    out = CliRunner().invoke(main, ["generate", str(path), "--concurrency", "100"])
    assert out.exit_code == 0, out.output
    assert "concurrency 100 is far above what the server decodes at once (3); using 6" in out.output
    with Store.open(path) as store:
        assert store.latest_run().params["concurrency"] == 6
    assert 3 < fake_openai.peak_in_flight <= 6


def test_no_gridtune_field_means_the_old_default(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=5, n_b=4)
    # Long enough that all eight are in flight together even on a loaded machine.
    fake_openai.set(latency=2.5)
    assert generate(path).exit_code == 0
    assert fake_openai.peak_in_flight == 8


# -- against the real local server (the tiny test model) -----------------------------------


@pytest.fixture
def local_server(varied_model_dir, tmp_path, _isolated_home):
    from tests.server_support import InProcessServer

    with InProcessServer(varied_model_dir, tmp_path / "srv") as server:
        server.write_state(_isolated_home / "server")
        yield server
        # its pid is this test process: conftest must not find it in server.json and stop it
        (_isolated_home / "server" / "server.json").unlink(missing_ok=True)


@pytest.mark.local
def test_streamed_and_plain_runs_on_the_local_server_store_the_same_replies_and_counts(tmp_path, local_server):
    from gridtune.pipeline.client.resolve import resolve_backend

    backend = resolve_backend(start_local=False)
    assert backend.kind == "local"
    outcomes = {}
    for stream in (True, False):
        path = make_project(tmp_path, n_a=2, n_b=2, model=None, name=f"stream-{stream}.gridtune")
        result = generate(path, stream=stream, temperature=0.0, max_tokens=12)
        assert (result.exit_code, result.progress.done, result.progress.retries) == (0, 4, 0)
        outcomes[stream] = [(r.values, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens)
                            for r in completions(path)]
        with Store.open(path) as store:
            assert store.latest_run().params["stream"] is stream
    assert outcomes[True] == outcomes[False]  # greedy: the same text, finish reason and usage either way
    for _values, _text, finish, prompt_tokens, completion_tokens in outcomes[True]:
        assert finish in ("stop", "length") and prompt_tokens > 0 and 0 < completion_tokens <= 12


def test_a_server_that_refuses_stream_options_gets_plain_requests(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=3, n_b=2)
    fake_openai.reject_stream_options = True
    result = generate(path, concurrency=1)
    assert (result.exit_code, result.progress.done, result.progress.failed) == (0, 6, 0)
    sent = fake_openai.chat_requests()
    assert [r.status for r in sent] == [400] + [200] * 6  # refused once, then plain requests only
    assert all("stream" not in r.body for r in sent[1:])
    assert [r.attempts for r in completions(path)] == [1] * 6
    # Several in flight when the first refusal comes back: each falls back, none fails.
    path = make_project(tmp_path, n_a=3, n_b=2, name="q.gridtune")
    result = generate(path, concurrency=6)
    assert (result.exit_code, result.progress.done, result.progress.failed) == (0, 6, 0)


def test_eta_comes_from_streamed_tokens_before_any_completion_ends():
    from gridtune.pipeline.generation.progress import Tracker

    clock = _Clock()
    tracker = Tracker(10, run_id=1, expected_tokens=100, clock=clock)
    for _ in range(10):
        tracker.started()
    assert tracker.snapshot("running").eta_s is None and tracker.snapshot().phase == "waiting for the first tokens"
    clock.now += 5  # 5 s waiting for the first tokens (the prompts read): not the decoding speed
    tracker.streamed(10)
    clock.now += 4
    tracker.streamed(30)  # 40 tokens in the 4 s since the first: 10 tok/s
    p = tracker.snapshot("running")
    assert p.phase is None and p.tokens_per_s == pytest.approx(10, rel=0.01) and p.done == 0
    assert p.eta_s == pytest.approx((10 * 100 - 40) / 10, rel=0.01)  # 960 tokens left at 10 tok/s


class _Clock:
    """Time that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _simulated_run(seed: int = 7) -> list[tuple[float, float | None, int]]:
    """64 requests, 8 at once, after 6 s of reading prompts; tokens arrive in bursts every
    2 s (a batching server) at a speed that wanders (a slower patch), and the last replies
    are the longest (280 tokens against a mean near 110): (time, ETA, in flight) every half
    second, as a run's heartbeat sees it."""
    import random

    from gridtune.pipeline.generation.progress import Tracker

    rng = random.Random(seed)
    clock = _Clock()
    start = clock.now
    tracker = Tracker(64, run_id=1, expected_tokens=100, clock=clock)
    queue = [rng.randint(260, 300) for _ in range(5)] + [rng.randint(60, 140) for _ in range(59)]
    flying: dict[int, list[int]] = {}  # id -> [tokens so far, length]
    next_id, seen = 0, []
    while queue or flying:
        while queue and len(flying) < 8:
            flying[next_id] = [0, queue.pop()]
            tracker.started()
            next_id += 1
        clock.now += 0.5
        t = clock.now - start
        if t > 6 and int(t * 2) % 4 == 0:
            per_stream = 4 if 40 < t < 55 else 8  # tokens/s per stream
            for cid, item in list(flying.items()):
                step = min(item[1] - item[0], max(0, round(per_stream * 2 * rng.uniform(0.2, 1.8))))
                item[0] += step
                tracker.streamed(step)
                if item[0] >= item[1]:
                    tracker.done(cid, "x", item[1], None, streamed=item[1])
                    del flying[cid]
        seen.append((t, tracker.snapshot("running").eta_s, len(flying)))
    return seen


def test_the_eta_is_steady_and_never_zero_with_requests_in_flight():
    """Issue 21: the ETA swung 26 h -> 13 h -> 1 h 19 m -> 11 m -> 3 m -> 17 m and read 0 s
    for 40 s with 13 requests in flight. On a run with bursty, uneven speed it now starts
    near the truth, moves without jumps once measured, and says more than 0 s while
    anything is in flight. (Before: a first ETA of 449 s for 146 s, jumps of 74 s between
    heartbeats, and 0 s in 56 heartbeats with requests in flight.)"""
    from gridtune.pipeline.generation.progress import ETA_SMOOTHING_S

    seen = _simulated_run()
    end = seen[-1][0]
    measured = [(t, eta, flying) for t, eta, flying in seen if eta is not None]
    first_t, first_eta, _ = measured[0]
    assert first_eta < 2 * (end - first_t)
    for (t0, a, _), (_t1, b, _) in zip(measured, measured[1:], strict=False):
        if t0 > 6 + ETA_SMOOTHING_S + 1:  # measured long enough to be smoothed
            assert abs(b - a) <= 0.35 * a + 2.0, (t0, a, b)
    assert all(eta > 0 for _, eta, flying in measured if flying)
    assert seen[-1][1] == 0.0
