"""generate --batch against the real local server (tiny model) and its /v1/batches:
every cell done exactly once, a killed follower resumes without a second batch, an
error line is recorded and retried by a new batch, a small limit splits the grid."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.format.cost import generation_cost
from gridtune.pipeline.generation import batch as batch_api
from gridtune.pipeline.generation.generate import GenerateOptions
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store, batches as stored
from tests.server_support import (
    gridtune_cmd,
    local,  # noqa: F401 - fixture
    wait_for,
)
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.local


def make_project(tmp_path, places=("Oslo", "Lima", "Rome"), years=(2030, 2040)):
    spec = GridSpec(name="batch", generation="Say something about {place} in {year}.",
                    variables={"place": list(places), "year": list(years)},
                    settings=GenerationSettings(temperature=1.0, max_tokens=6, samples=1))
    project = tmp_path / "batch.gridtune"
    with create_project(project, spec):
        pass
    return project


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def server_batches(srv):
    return srv.client().batches.list(limit=100).data


def items_of(project):
    with Store.open(project) as store:
        rows = store._query("SELECT batch_row, completion_id, state FROM batch_items ORDER BY batch_row")
        return [tuple(r) for r in rows]


def test_a_small_grid_through_the_batch_api_ends_every_cell_done_exactly_once(local, tmp_path):
    project = make_project(tmp_path)
    r = run("generate", str(project), "--batch")
    assert r.exit_code == 0, r.output
    with Store.open(project) as store:
        done = store.completions(status="done")
        assert len(done) == 6 and store.status_counts().pending == 0
        assert all(c.attempts == 1 and c.finish_reason in ("stop", "length") and c.completion_tokens for c in done)
        assert all(c.model == local.model for c in done)
        [b] = stored.latest_batches(store, 10)
        assert b.status == "completed" and not b.open and b.counts == {"total": 6, "completed": 6, "failed": 0}
    assert sorted(cid for _row, cid, state in items_of(project) if state == "done") == sorted(c.id for c in done)
    [remote] = server_batches(local)
    assert remote.status == "completed" and remote.output_file_id and remote.error_file_id is None
    lines = [json.loads(x) for x in local.client().files.content(remote.output_file_id).content.splitlines()]
    assert {x["custom_id"] for x in lines} == {str(c.id) for c in done}
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["object"] == "chat.completion"
               for x in lines)
    # nothing left: another --batch creates no batch
    r = run("generate", str(project), "--batch")
    assert r.exit_code == 0 and "nothing left to generate" in r.output
    assert len(server_batches(local)) == 1


def test_a_killed_follower_resumes_the_batch_instead_of_creating_another(local, tmp_path, _isolated_home):
    project = make_project(tmp_path)
    gate = threading.Event()
    original = local.state.batches.run_request

    async def gated(body):  # the batch waits here until the follower has been killed
        while not gate.is_set():
            await asyncio.sleep(0.05)
        return await original(body)

    local.state.batches.run_request = gated
    proc = subprocess.Popen(gridtune_cmd("generate", str(project), "--batch"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, GRIDTUNE_HOME=str(_isolated_home)))
    try:
        def created():
            with Store.open(project) as store:
                return [b for b in stored.open_batches(store) if b.batch_id]
        [b] = wait_for(created, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(server_batches(local)) == 1
    with Store.open(project) as store:
        assert store.status_counts().done == 0
    gate.set()
    r = run("generate", str(project), "--batch")
    assert r.exit_code == 0, r.output
    assert "picking up 1 batch(es) in progress" in r.output
    [remote] = server_batches(local)
    assert remote.id == b.batch_id
    with Store.open(project) as store:
        assert store.status_counts().done == 6
        assert len(stored.latest_batches(store, 10)) == 1
        assert all(c.attempts == 1 for c in store.completions(status="done"))
        runs = store._query("SELECT state FROM runs ORDER BY id")
        assert [r[0] for r in runs] == ["died", "finished"]


def test_an_error_line_is_recorded_and_retried_by_a_new_batch(local, tmp_path):
    project = make_project(tmp_path)
    with Store.open(project) as store:
        work = store.pending_work()
    flaky, refused = str(work[1].completion_id), str(work[4].completion_id)
    seen: list[str] = []

    def fault(custom_id):
        seen.append(custom_id)
        if custom_id == flaky and seen.count(flaky) == 1:
            return 500, {"error": {"message": "the engine tripped", "type": "server_error", "param": None,
                                   "code": None}}
        if custom_id == refused:
            return 400, {"error": {"message": "this one is refused", "type": "invalid_request_error",
                                   "param": "messages", "code": None}}
        return None

    local.state.batches.fault = fault
    r = run("generate", str(project), "--batch")
    assert r.exit_code == 1, r.output  # one cell failed for good
    with Store.open(project) as store:
        first, second = sorted(stored.latest_batches(store, 10), key=lambda b: b.id)
        assert first.counts == {"total": 6, "completed": 4, "failed": 2}
        assert second.requests == 1  # only the transient failure is sent again; the 400 is not
        done = store.get_completion(int(flaky))
        assert done.status == "done" and done.attempts == 2 and done.error is None
        bad = store.get_completion(int(refused))
        assert bad.status == "failed" and bad.error_kind == "permanent"
        assert "HTTP 400" in bad.error and "this one is refused" in bad.error
        assert store.status_counts().done == 5
    states = items_of(project)
    assert (first.id, int(flaky), "failed") in states and (second.id, int(flaky), "done") in states
    assert (first.id, int(refused), "failed") in states
    assert len(server_batches(local)) == 2


def test_a_small_limit_splits_the_grid_into_several_batches(local, tmp_path):
    project = make_project(tmp_path)
    options = batch_api.BatchOptions(GenerateOptions(), max_requests=2)
    result = asyncio.run(batch_api.run_batch(project, options))
    assert result.state == "finished" and result.progress.done == 6
    with Store.open(project) as store:
        made = stored.latest_batches(store, 10)
        assert len(made) == 3 and all(b.requests == 2 and b.status == "completed" for b in made)
        assert store.status_counts().done == 6
    assert len(server_batches(local)) == 3
    assert len({cid for _row, cid, _state in items_of(project)}) == 6  # each cell in one batch only


def test_split_lines_keeps_each_file_within_both_limits():
    lines = [b"x" * 10 + b"\n"] * 7
    assert [len(r) for r in batch_api.split_lines(lines, max_requests=3, max_bytes=10_000)] == [3, 3, 1]
    assert [len(r) for r in batch_api.split_lines(lines, max_requests=100, max_bytes=25)] == [2, 2, 2, 1]
    with pytest.raises(batch_api.GenerateError):
        batch_api.split_lines([b"y" * 40], max_bytes=30)


def test_the_batch_price_is_half_the_live_price():
    live = generation_cost("gpt-4o-mini", 1_000_000, 1_000_000)
    assert live and batch_api.batch_cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(live / 2)
    assert batch_api.batch_cost("no-such-model-xyz", 10, 10) is None


def test_the_local_server_refuses_a_bad_input_file_and_cancels_a_batch(local):
    client = local.client()
    bad = client.files.create(file=("bad.jsonl", b'{"custom_id": "a", "method": "GET", "url": "/v1/x"}\n'),
                              purpose="batch")
    failed = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(lambda: (b := client.batches.retrieve(failed.id)).status == "failed" and b)
    assert {e.code for e in failed.errors.data} >= {"invalid_method", "invalid_url"}
    local.state.batches.run_request = _never
    body = {"model": local.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    data = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}).encode() + b"\n" for i in range(3))
    good = client.files.create(file=("good.jsonl", data), purpose="batch")
    running = client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(running.id).status == "in_progress")
    cancelled = client.batches.cancel(running.id)
    assert cancelled.status == "cancelled" and cancelled.error_file_id
    lines = [json.loads(x) for x in client.files.content(cancelled.error_file_id).content.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["r0", "r1", "r2"]
    assert all(x["error"]["code"] == "batch_cancelled" and x["response"] is None for x in lines)


async def _never(body):
    await asyncio.Event().wait()


async def test_b_on_the_generate_screen_sends_the_grid_as_a_batch_followed_in_the_background(local, tmp_path):
    from tests.test_tui_generate import GridtuneApp, wait_for as pilot_wait

    project = make_project(tmp_path)
    app = GridtuneApp(project)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.pause()
        assert screen.check_action("start_batch", ())
        await pilot.press("b")

        def counts():
            with Store.open(project) as store:
                return store.status_counts().done

        assert await pilot_wait(pilot, lambda: counts() == 6, timeout=60), counts()
        assert await pilot_wait(pilot, lambda: screen.snap and screen.snap.run
                                and screen.snap.run.state == "finished")
    with Store.open(project) as store:
        run = store.latest_run()
        assert run.params["batch"] is True and run.pid != os.getpid()  # followed by a detached process
        assert len(stored.latest_batches(store, 10)) == 1


def test_status_writes_the_results_of_a_batch_nobody_follows(local, tmp_path):
    project = make_project(tmp_path, places=("Oslo", "Lima"))
    options = batch_api.BatchOptions(GenerateOptions())

    async def send_only():  # record and create the batch, then stop following (as a dropped SSH session)
        stop = asyncio.Event()

        async def stop_once_sent():
            while True:
                with Store.open(project) as store:
                    if any(b.batch_id for b in stored.open_batches(store)):
                        stop.set()
                        return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(stop_once_sent())
        result = await batch_api.run_batch(project, options, stop_event=stop)
        await watcher
        return result

    assert asyncio.run(send_only()).state == "stopped"
    [remote] = server_batches(local)
    wait_for(lambda: local.client().batches.retrieve(remote.id).status == "completed")
    r = run("status", str(project), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["done"] == 4 and report["pending"] == 0
    assert report["batches"][0]["batch_id"] == remote.id and report["batches"][0]["open"] is False
