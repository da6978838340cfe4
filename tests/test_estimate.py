"""Run-time estimates (pipeline/estimate.py): from the speed a server advertises on
GET /v1/models, read over real HTTP from the fake server on 127.0.0.1."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.client.resolve import resolve_backend
from gridtune.pipeline.generation.estimate import ServerInfo, estimate_run, resolve_concurrency, server_info
from gridtune.pipeline.generation.generate import GenerateOptions, preview_run
from gridtune.store import Store
from tests.test_generate import FAST, generate, make_project

LOCAL = {"max_batch": 16, "context_length": 8192, "in_flight": 0, "decoding": 0,
         "stream_tokens_per_s": 60.0, "batch_tokens_per_s": 240.0, "generated_tokens": 0}


def test_speed_for_a_concurrency_interpolates_between_one_stream_and_a_full_batch():
    info = ServerInfo.from_dict(LOCAL)
    assert info.tokens_per_s(1) == 60.0
    assert info.tokens_per_s(16) == 240.0 and info.tokens_per_s(64) == 240.0  # no faster past the batch
    assert info.tokens_per_s(6) == pytest.approx(60 + 180 * 5 / 15)
    assert ServerInfo.from_dict({**LOCAL, "batch_tokens_per_s": None}).tokens_per_s(8) == 60.0
    assert ServerInfo.from_dict({**LOCAL, "stream_tokens_per_s": None}).tokens_per_s(8) == 120.0
    assert ServerInfo.from_dict({"max_batch": 4}).tokens_per_s(4) is None
    # Junk is ignored field by field, not an error.
    junk = ServerInfo.from_dict({"max_batch": "lots", "stream_tokens_per_s": float("nan"), "batch_tokens_per_s": -1})
    assert junk == ServerInfo()
    assert ServerInfo.from_dict("nope") is None


def test_local_estimate_from_advertised_speed():
    info = ServerInfo.from_dict(LOCAL)
    est = estimate_run(requests=256, max_tokens=300, mean_tokens=None, concurrency=16, backend_kind="local",
                       info=info)
    assert est.seconds == pytest.approx(256 * 300 / 240, rel=0.01)  # 320 s
    assert est.text == "up to about 5 min on the local server (≈ 240 tok/s with 16 at once; up to 256 × 300 tokens)"
    # With finished completions, their mean is the expectation and max_tokens the bound.
    est = estimate_run(requests=200, max_tokens=300, mean_tokens=150, concurrency=16, backend_kind="local",
                       info=info, prompt_tokens=60)
    assert est.seconds == pytest.approx(200 * 156 / 240, rel=0.01) and est.max_seconds > est.seconds
    assert est.text.startswith("about 2 min on the local server (≈ 240 tok/s with 16 at once; 200 × ~150 tokens")
    assert "at most 4 min if all run to 300" in est.text
    # Fewer at once: slower in total.
    slow = estimate_run(requests=256, max_tokens=300, mean_tokens=None, concurrency=1, backend_kind="local",
                        info=info)
    assert slow.seconds == pytest.approx(256 * 300 / 60, rel=0.01) and "with 1 at once" in slow.text


def test_other_backends_estimate_from_limits_or_say_they_cannot():
    est = estimate_run(requests=600, max_tokens=500, mean_tokens=None, concurrency=8, backend_kind="openai",
                       backend_label="OpenAI", rpm=300)
    assert est.seconds == 120 and est.text == "at least 2 min on OpenAI (limited by 300 rpm; 600 requests)"
    est = estimate_run(requests=600, max_tokens=500, mean_tokens=None, concurrency=8, backend_kind="openai",
                       backend_label="OpenAI", rpm=300, tpm=60000, prompt_tokens=100)
    assert est.seconds == 360 and "limited by 60000 tpm" in est.text
    est = estimate_run(requests=600, max_tokens=500, mean_tokens=None, concurrency=8, backend_kind="openai",
                       backend_label="OpenAI")
    assert est.seconds is None and est.text.startswith("no time estimate on OpenAI")
    est = estimate_run(requests=0, max_tokens=500, mean_tokens=None, concurrency=8, backend_kind="local")
    assert est.text == "nothing left to generate"
    unmeasured = ServerInfo.from_dict({"max_batch": 16})
    est = estimate_run(requests=10, max_tokens=500, mean_tokens=None, concurrency=8, backend_kind="local",
                       info=unmeasured)
    assert est.seconds is None and "has not measured its speed" in est.text


def test_concurrency_follows_max_batch_and_caps_what_is_far_above():
    info = ServerInfo.from_dict(LOCAL)
    assert resolve_concurrency(None, info) == (16, None)
    assert resolve_concurrency(None, None) == (8, None)
    assert resolve_concurrency(24, info) == (24, None)
    value, note = resolve_concurrency(100, info)
    assert value == 32 and "far above" in note
    assert resolve_concurrency(100, None) == (100, None)


def test_server_info_is_read_from_get_models(fake_openai):
    backend = resolve_backend()
    assert server_info(backend) is None  # a server that does not advertise it
    fake_openai.set(gridtune=LOCAL)
    info = server_info(backend, "fake-model")
    assert info.max_batch == 16 and info.batch_tokens_per_s == 240.0 and info.context_length == 8192


def test_server_info_from_a_server_that_does_not_answer(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert server_info(resolve_backend(), timeout=0.5) is None


def test_preview_uses_the_projects_finished_completions(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=4, n_b=3)
    fake_openai.set(gridtune=LOCAL)
    plan, est = preview_run(path, GenerateOptions(**FAST))
    assert plan.concurrency == 16 and plan.stream
    assert est.requests == 12 and "up to 12 × 50 tokens" in est.text
    assert generate(path, limit=6).exit_code == 0
    with Store.open(path) as store:
        done = store.completions(status="done")
    mean = sum(c.completion_tokens for c in done) / len(done)
    plan, est = preview_run(path, GenerateOptions(**FAST))
    assert est.requests == 6 and f"6 × ~{mean:,.0f} tokens" in est.text


def test_generate_prints_the_estimate_before_it_runs(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=4, n_b=3)
    fake_openai.set(gridtune=LOCAL)
    out = CliRunner().invoke(main, ["generate", str(path)])
    assert out.exit_code == 0, out.output
    first = out.output.splitlines()[0]
    assert first.startswith("estimate: up to about 5 s on ") and "(≈ 192 tok/s with 12 at once" in first  # 12 cells: 12 at once
    assert first.endswith("[concurrency 16, streaming]")
    # The run keeps it: status says what was estimated at its start.
    status = CliRunner().invoke(main, ["status", str(path)])
    assert "estimated at its start: up to about 5 s" in status.output


def test_generate_without_advertised_speed_says_it_cannot_estimate(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=1)
    out = CliRunner().invoke(main, ["generate", str(path), "--rpm", "600"])
    assert out.exit_code == 0, out.output
    assert "estimate: at least 5 s on http://127.0.0.1:" in out.output and "limited by 600 rpm" in out.output
    out = CliRunner().invoke(main, ["generate", str(path), "--limit", "0"])
    # Nothing left: said before any estimate, and no empty run is created.
    assert out.exit_code == 0 and "nothing left to generate" in out.output


def test_prefill_speed_counts_the_prompts_when_the_server_gives_it():
    info = ServerInfo.from_dict({**LOCAL, "prefill_tokens_per_s": 600.0})
    est = estimate_run(requests=224, max_tokens=300, mean_tokens=113, prompt_tokens=65, concurrency=16,
                       backend_kind="local", info=info)
    assert est.seconds == pytest.approx(224 * 113 / 240 + 224 * 65 / 600, rel=0.01)
