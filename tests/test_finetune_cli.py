"""`gridtune finetune`, `jobs`, `ask` and `export-model` against a real local server,
found the way every gridtune process finds it (server.json in the data directory)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.client.ask import ask, chat_messages, stream_pieces
from gridtune.pipeline.client.backend import Backend
from gridtune.pipeline.client.resolve import resolve_backend
from gridtune.pipeline.training import finetune as ft
from tests.server_support import InProcessServer, chat_examples, write_jsonl
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.local


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):  # noqa: F811
    with InProcessServer(tiny_model_dir, tmp_path_factory.mktemp("cli-srv")) as srv:
        yield srv


@pytest.fixture
def local(server, _isolated_home):
    server.write_state(_isolated_home / "server")
    yield server
    # the pid in it is this test process: conftest stops servers it finds in server.json
    (_isolated_home / "server" / "server.json").unlink(missing_ok=True)


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_backend_discovery_finds_the_running_server(local):
    backend = resolve_backend(start_local=False)
    assert backend.kind == "local" and backend.base_url == local.base_url
    assert backend.default_model == local.model


def test_finetune_wait_jobs_ask_and_export(local, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_examples(20))
    r = run("finetune", str(train), "--model", local.model, "--epochs", "1", "--suffix", "cli", "--wait", "--json")
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith(f"ft:{local.model}:local:cli:")

    r = run("jobs", "--json")
    assert r.exit_code == 0
    assert job["id"] in [j["id"] for j in json.loads(r.stdout)["jobs"]]

    r = run("ask", job["fine_tuned_model"], "AGI scenario. Place: Oslo.", "--max-tokens", "5", "--temperature", "0")
    assert r.exit_code == 0 and len(r.stdout) > 1  # the reply (the tiny model likes newlines) + newline

    out = tmp_path / "merged"
    r = run("export-model", job["fine_tuned_model"], "-o", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def test_finetune_human_output_with_progress(local, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_examples(12))
    r = run("finetune", str(train), "--model", local.model, "--epochs", "1", "--wait")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].startswith(f"ft:{local.model}:local::ftjob-")
    assert "Step" in r.stderr or "training" in r.stderr


def test_ask_with_stop_cuts_the_reply(local):
    backend = resolve_backend(start_local=False)
    full = ask(backend, local.model, "Count: one two", temperature=0, max_tokens=20)
    assert isinstance(full, str) and full
    pieces = list(ask(backend, local.model, "Count: one two", temperature=0, max_tokens=20, stream=True))
    assert "".join(pieces) == full
    final = list(stream_pieces(backend, local.model, messages=chat_messages("Count: one two"), temperature=0,
                               max_tokens=20))
    assert "".join(p.text for p in final) == full
    assert final[-1].done and final[-1].finish_reason in ("stop", "length")
    assert len(full) >= 6
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle of the greedy reply
    cut = ask(backend, local.model, "Count: one two", temperature=0, max_tokens=20, stop=[stop])
    assert stop not in cut and full.startswith(cut)


def test_invalid_file_is_a_usage_error_and_uploads_nothing(local, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    r = run("finetune", str(bad), "--model", local.model)
    assert r.exit_code == 2 and "validation error" in r.stderr
    with local.client() as c:
        assert all(f.filename != "bad.jsonl" for f in c.files.list())


def test_a_refused_job_is_one_clear_message(local, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_examples(10))
    r = run("finetune", str(train), "--model", "gpt-4o-mini")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("gridtune: error:") and "refused the fine-tuning job" in lines[-1]
    assert "Traceback" not in r.output


def test_refusal_raises_finetune_refused(local, tmp_path):
    backend = Backend("local", local.base_url, "x", local.model)
    f = ft.upload_file(backend, write_jsonl(tmp_path / "t.jsonl", chat_examples(5)))
    with pytest.raises(ft.FinetuneRefused, match="cannot be fine-tuned"):
        ft.create_job(backend, f.id, "gpt-4o-mini")


def test_follow_job_yields_events_in_order_and_records_the_job(local, tmp_path):
    from gridtune.store import Store

    backend = resolve_backend(start_local=False)
    train = write_jsonl(tmp_path / "train.jsonl", chat_examples(8))
    store = Store.open(tmp_path / "p.gridtune", create=True)
    try:
        job = ft.start_finetune(backend, train, local.model, epochs=1, store=store)
        seen, updates = [], []
        tracker = ft.JobTracker(job.id, model=local.model, status=job.status, store=store)
        final = tracker.follow(backend, poll_s=0.3, on_event=seen.append,
                               on_update=lambda state, recorded: updates.append((state.status, recorded)))
        assert final.status == "succeeded"
        assert updates[-1] == ("succeeded", True) and tracker.state.fine_tuned_model == final.fine_tuned_model
        assert tracker.state.losses and tracker.state.steps[-1] == tracker.state.total_steps
        assert [s for s, recorded in updates if recorded] == list(dict.fromkeys(s for s, _ in updates))
        assert [e.created_at for e in seen] == sorted(e.created_at for e in seen)
        assert seen[0].message.startswith("Created") and "successfully" in seen[-1].message
        rec = store.jobs()[0]
        assert rec.id == job.id and rec.status == "succeeded" and rec.fine_tuned_model == final.fine_tuned_model
    finally:
        store.close()


def test_a_server_that_ignores_streaming_is_a_clear_error(fake_openai):
    """A server that answers stream=true with a plain JSON body, as some servers do."""
    fake_openai.set(ignore_stream=True)
    backend = Backend("compatible", fake_openai.base_url, "sk-test")
    with pytest.raises(ft.FinetuneError, match="no streamed reply"):
        list(stream_pieces(backend, "m", messages=chat_messages("hello")))


def test_finetune_project_wait_exports_beside_it_and_records_the_job(local, tmp_path):
    """`gridtune finetune PROJECT --wait`: the export lands beside the project, and the
    job's status changes reach the project through the same JobTracker the TUI uses."""
    from gridtune.pipeline.spec.project import create_project
    from gridtune.store import Store
    from tests.test_tui_export import fill
    from tests.test_tui_generate import small_spec

    project = tmp_path / "tiny.gridtune"
    create_project(project, small_spec(samples=3)).close()
    fill(project)
    r = run("finetune", str(project), "--model", local.model, "--epochs", "1", "--wait")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tiny.jsonl").is_file()
    with Store.open(project) as store:
        job = store.jobs()[-1]
        export = store.latest_export()
    assert job.status == "succeeded" and job.fine_tuned_model == r.stdout.strip().splitlines()[-1]
    assert job.export_id == export.id and export.path == str(tmp_path / "tiny.jsonl")
