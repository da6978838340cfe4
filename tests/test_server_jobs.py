"""Real fine-tuning jobs on the local server: succeed and serve, fail on bad data, cancel,
and survive a server that is killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import time

import openai
import pytest

from tests.server_support import (
    InProcessServer,
    chat_examples,
    serve_subprocess,
    wait_for,
    write_jsonl,
)
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.local


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):  # noqa: F811
    with InProcessServer(tiny_model_dir, tmp_path_factory.mktemp("jobs-srv")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def _upload(client, path):
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune")


def _wait_done(client, job_id, timeout=300):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in
                    ("succeeded", "failed", "cancelled") and j, timeout=timeout)


def test_job_succeeds_and_its_model_answers(client, server, tmp_path):
    train = _upload(client, write_jsonl(tmp_path / "train.jsonl", chat_examples(20)))
    job = client.fine_tuning.jobs.create(
        model=server.model, training_file=train.id, suffix="scen", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}}})
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    done = _wait_done(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{server.model}:local:scen:{job.id}"
    assert done.hyperparameters.n_epochs == 1 and done.hyperparameters.batch_size == 4
    assert done.trained_tokens and done.finished_at

    events = list(reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data))
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1].message.startswith("Step 5/5: training loss=")
    messages = [e.message for e in events]
    assert messages[0].startswith("Created fine-tuning job") and "successfully completed" in messages[-1]
    assert len(messages) == len(set(e.id for e in events))
    # paging with after (newest first, like OpenAI)
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    rest = client.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=100)
    assert [e.id for e in first.data + rest.data] == [e.id for e in reversed(events)]

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(ckpts) == 1 and ckpts[0].step_number == 5 and ckpts[0].metrics.train_loss is not None

    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    chat = client.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=10,
                                          messages=[{"role": "user", "content": "AGI scenario. Place: Rome."}])
    base = client.chat.completions.create(model=server.model, temperature=0, max_tokens=10,
                                          messages=[{"role": "user", "content": "AGI scenario. Place: Rome."}])
    assert chat.model == done.fine_tuned_model and chat.choices[0].message.content
    assert chat.choices[0].message.content != base.choices[0].message.content  # the adapter is applied
    legacy = client.completions.create(model=done.fine_tuned_model, prompt="AGI scenario.", max_tokens=5)
    assert legacy.choices[0].finish_reason in ("stop", "length")
    # the base model is still itself after the adapter was used
    again = client.chat.completions.create(model=server.model, temperature=0, max_tokens=10,
                                           messages=[{"role": "user", "content": "AGI scenario. Place: Rome."}])
    assert again.choices[0].message.content == base.choices[0].message.content
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50).data]


def test_invalid_training_file_fails_the_job_with_the_validators_message(client, server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    f = _upload(client, bad)
    job = client.fine_tuning.jobs.create(model=server.model, training_file=f.id)
    done = _wait_done(client, job.id, timeout=60)
    assert done.status == "failed"
    assert "error" in done.error.message and done.error.code == "invalid_training_file"
    assert "line" in done.error.message


@pytest.mark.parametrize("kwargs, param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"suffix": "has:colon"}, "suffix"),
])
def test_bad_job_requests_are_refused(client, server, tmp_path, kwargs, param):
    f = _upload(client, write_jsonl(tmp_path / "t.jsonl", chat_examples(10)))
    args = {"model": server.model, "training_file": f.id, **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(**args)
    assert exc.value.body["param"] == param


def test_cancel_stops_a_running_job(client, server, tmp_path):
    f = _upload(client, write_jsonl(tmp_path / "t.jsonl", chat_examples(20)))
    job = client.fine_tuning.jobs.create(model=server.model, training_file=f.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    queued = client.fine_tuning.jobs.create(model=server.model, training_file=f.id)
    later = client.fine_tuning.jobs.create(model=server.model, training_file=f.id)  # most likely the same second
    wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data))
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # one job trains at a time
    assert [j.id for j in client.fine_tuning.jobs.list(limit=3).data] == [later.id, queued.id, job.id]  # newest first
    page = client.fine_tuning.jobs.list(limit=1, after=later.id)
    assert [j.id for j in page.data] == [queued.id] and page.has_more
    server.state.last_activity -= 3600  # no request for an hour, but a job runs: not idle, and the clock restarts
    assert server.state.idle_for == 0 and time.monotonic() - server.state.last_activity < 60
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_for(lambda: client.fine_tuning.jobs.retrieve(queued.id).status != "queued")  # first in, first out
    assert client.fine_tuning.jobs.retrieve(later.id).status == "queued"
    assert client.fine_tuning.jobs.cancel(later.id).status == "cancelled"
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None


def test_a_worker_killed_mid_training_fails_the_job_with_a_reason(client, server, tmp_path):
    f = _upload(client, write_jsonl(tmp_path / "t.jsonl", chat_examples(20)))
    job = client.fine_tuning.jobs.create(model=server.model, training_file=f.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data))
    state = json.loads((server.state.jobs.root / job.id / "state.json").read_text())
    os.kill(state["local"]["worker_pid"], signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
    done = _wait_done(client, job.id, timeout=60)
    assert done.status == "failed" and done.error.message.startswith("the training worker was killed by SIGKILL")
    assert client.fine_tuning.jobs.list_events(job.id).data[0].message == f"Fine-tuning job failed: {done.error.message}"


def test_an_interrupted_worker_resumes_instead_of_failing(client, server, tmp_path):
    """Ctrl-C on a foreground `gridtune serve` reaches the worker too (one process group)."""
    f = _upload(client, write_jsonl(tmp_path / "t.jsonl", chat_examples(20)))
    job = client.fine_tuning.jobs.create(model=server.model, training_file=f.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 5})
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data)
    pid = json.loads((server.state.jobs.root / job.id / "state.json").read_text())["local"]["worker_pid"]
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: any("resumed from checkpoint" in e.message
                         for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_files_jobs_and_models_survive_a_killed_server(tiny_model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    train = write_jsonl(tmp_path / "train.jsonl", chat_examples(20))
    with serve_subprocess(tiny_model_dir, data) as (proc, state):
        client = openai.OpenAI(base_url=state["base_url"], api_key=state["token"], max_retries=0)
        f = _upload(client, train)
        first = client.fine_tuning.jobs.create(model=state["model"], training_file=f.id,
                                               hyperparameters={"n_epochs": 1, "batch_size": 5})
        assert _wait_done(client, first.id).status == "succeeded"
        long = client.fine_tuning.jobs.create(model=state["model"], training_file=f.id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 1})
        wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(long.id).data)
        waiting = client.fine_tuning.jobs.create(model=state["model"], training_file=f.id)
        wait_for(lambda: client.fine_tuning.jobs.retrieve(waiting.id).status == "queued")
        worker_pid = json.loads((data / "jobs" / long.id / "state.json").read_text())["local"]["worker_pid"]
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: the worker is orphaned mid-job
        proc.wait()
    with serve_subprocess(tiny_model_dir, data) as (proc, state):
        client = openai.OpenAI(base_url=state["base_url"], api_key=state["token"], max_retries=0)
        assert f.id in [x.id for x in client.files.list()]
        ft = client.fine_tuning.jobs.retrieve(first.id)
        assert ft.status == "succeeded" and ft.fine_tuned_model in [m.id for m in client.models.list()]
        assert client.chat.completions.create(model=ft.fine_tuned_model, max_tokens=4,
                                              messages=[{"role": "user", "content": "hi"}]).choices
        assert not os.path.exists(f"/proc/{worker_pid}") or \
            "train_worker" not in open(f"/proc/{worker_pid}/cmdline").read()  # the orphan was stopped
        resumed = wait_for(lambda: [e for e in client.fine_tuning.jobs.list_events(long.id, limit=100).data
                                    if "resumed from checkpoint" in e.message])
        assert resumed
        # the orphan was interrupted, not cancelled: its history says so
        messages = [e.message for e in client.fine_tuning.jobs.list_events(long.id, limit=100).data]
        assert "Fine-tuning job cancelled" not in messages and any("Training interrupted" in m for m in messages)
        assert client.fine_tuning.jobs.retrieve(long.id).status in ("running", "succeeded")
        assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"  # still waiting its turn
        client.fine_tuning.jobs.cancel(long.id)
        assert client.fine_tuning.jobs.retrieve(long.id).status in ("cancelled", "succeeded")
        assert _wait_done(client, waiting.id).status == "succeeded"  # and then it runs
