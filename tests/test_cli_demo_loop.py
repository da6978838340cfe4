"""Issue 21, the command line: the README's loop as a new user runs it, each line reading true
(export's markers, the validation file, validate's model check, a stopped run's status,
a queued job followed, interrupted, asked and cancelled)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.generation import runs
from gridtune.store import Store
from tests.bigproject import small_project
from tests.server_support import chat_examples, write_jsonl
from tests.test_finetune_cli import local, server  # noqa: F401 - fixtures
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

GRIDTUNE = [sys.executable, "-c", "from gridtune.cli.main import main; main()"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _finished_project(tmp_path):
    """16 finished completions, each ending its last sentence with a full stop."""
    path = small_project(tmp_path / "p.gridtune", done=16)
    with Store.open(path) as store:
        for c in store.completions(status="done"):
            store.edit_text(c.id, f"In {c.values['year']} {c.values['place']} changed. It went on calmly.")
    return path


def test_export_names_the_separator_and_stop_as_its_header_does_and_the_validation_file_has_no_epochs(tmp_path):
    project = _finished_project(tmp_path)
    r = run("export", str(project), "-o", str(tmp_path / "p.jsonl"), "--format", "completion",
            "--validation-fraction", "0.25")
    assert r.exit_code == 0, r.output
    assert "separator `\\n\\n###\\n\\n`, stop ` END`" in r.output  # the header
    # The report's notes say the same markers, not the text's last characters before them.
    assert r.output.count("all prompts end with the separator `\\n\\n###\\n\\n`") == 2
    assert r.output.count("all completions end with the stop ` END`") == 2
    assert "`.\\n\\n###\\n\\n`" not in r.output and "`. END`" not in r.output
    valid_part = r.output[r.output.index("p.valid.jsonl: "):]
    assert "epoch(s) by default" not in valid_part.split("cost:")[0]  # trained on: never
    assert "it is not trained on" in valid_part


def test_validate_refuses_a_prompt_completion_file_for_a_model_that_tunes_chat_only(tmp_path):
    project = _finished_project(tmp_path)
    assert run("export", str(project), "-o", str(tmp_path / "p.jsonl"), "--format", "completion").exit_code == 0
    r = run("validate", str(tmp_path / "p.jsonl"), "--model", "gpt-4o-mini")
    assert r.exit_code == 1, r.output
    assert "No errors found" not in r.output and "completion_format_not_tuned_by_model" in r.output
    assert "$" not in r.output  # not priced: it cannot be trained there
    assert "export --format chat" in r.output
    # The same file, with no model named (babbage-002 counts its tokens): the export's own check.
    assert run("validate", str(tmp_path / "p.jsonl")).exit_code == 0


def test_status_of_a_stopped_run_shows_no_eta(tmp_path):
    project = small_project(tmp_path / "p.gridtune", done=4)
    with Store.open(project) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher",
                                 params={"concurrency": 4}, is_alive=runs.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 16, "done": 4, "in_flight": 4,
                                 "eta_s": 95.0, "requests_per_s": 0.5, "elapsed_s": 8.0})
        store.finish_run(run_id, "stopped")
    r = run("status", str(project))
    assert r.exit_code == 0, r.output
    assert f"run #{run_id} stopped" in r.output
    assert "ETA" not in r.output and "4 in flight" not in r.output
    status = json.loads(run("status", str(project), "--json").output)
    assert status["run"]["state"] == "stopped"


# -- a job queued behind another, on a real local server -------------------------------------------

@pytest.fixture
def busy(local, tmp_path):  # noqa: F811
    """A long job that keeps the local trainer busy: the next job waits in the queue."""
    train = write_jsonl(tmp_path / "long.jsonl", chat_examples(20) * 100)
    r = run("finetune", str(train), "--model", local.model, "--epochs", "50", "--suffix", "long", "--json")
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    yield job
    run("jobs", "cancel", job["id"])


def _queued_job(local, tmp_path, suffix: str) -> dict:  # noqa: F811
    train = write_jsonl(tmp_path / f"{suffix}.jsonl", chat_examples(20))
    r = run("finetune", str(train), "--model", local.model, "--epochs", "1", "--suffix", suffix, "--json")
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    deadline = time.monotonic() + 30
    while job["status"] != "queued" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = next(j for j in json.loads(run("jobs", "--json").stdout)["jobs"] if j["id"] == job["id"])
    assert job["status"] == "queued"
    return job


@pytest.mark.local
def test_ask_on_a_queued_jobs_model_says_queued_and_jobs_cancel_cancels_it(local, busy, tmp_path):  # noqa: F811
    job = _queued_job(local, tmp_path, "q")
    model = f"ft:{local.model}:local:q:{job['id']}"
    r = run("ask", model, "AGI scenario. Place: Oslo.")
    assert r.exit_code == 1
    assert f"{model} is not ready: its job {job['id']} is queued" in r.output and "does not exist" not in r.output
    r = run("jobs", "cancel", job["id"])
    assert r.exit_code == 0 and r.output.strip() == f"job {job['id']} cancelled"
    listed = {j["id"]: j["status"] for j in json.loads(run("jobs", "--json").stdout)["jobs"]}
    assert listed[job["id"]] == "cancelled" and listed[busy["id"]] in ("running", "queued", "validating_files")
    assert run("jobs", "cancel", "ftjob-nope").exit_code == 1  # one line, not a traceback


@pytest.mark.local
def test_following_a_queued_job_says_queued_and_ctrl_c_says_the_job_goes_on(local, busy, tmp_path):  # noqa: F811
    train = write_jsonl(tmp_path / "w.jsonl", chat_examples(20))
    proc = subprocess.Popen([*GRIDTUNE, "finetune", str(train), "--model", local.model, "--epochs", "1",
                             "--suffix", "w", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = ""
        while not started.startswith("job "):  # "uploading …", then "job ftjob-… validating_files on …"
            started = proc.stderr.readline()
            assert started, "the command ended before starting a job"
        job_id = started.split()[1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = {j["id"]: j["status"] for j in json.loads(run("jobs", "--json").stdout)["jobs"]}
            if listed.get(job_id) == "queued":
                break
            time.sleep(0.2)
        time.sleep(1.5)  # a poll or two while queued
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    bars = [line for line in err.splitlines() if "━" in line]  # the progress line, as left at the end
    assert bars and all(line.startswith("queued ") for line in bars) and "0/?" not in err  # not "training 0/?"
    assert f"stopped following job {job_id}; the job goes on" in err and f"gridtune jobs cancel {job_id}" in err
    listed = {j["id"]: j["status"] for j in json.loads(run("jobs", "--json").stdout)["jobs"]}
    assert listed[job_id] == "queued"  # it does go on
    run("jobs", "cancel", job_id)
