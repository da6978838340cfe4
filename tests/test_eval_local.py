"""The seed's own observation, measured: a model tuned on answers that always end
(the end of turn) stops on held-out prompts where its base runs to max tokens.

The real local server, the tiny test model, a real fine-tuning job and `gridtune eval`.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.client.resolve import resolve_backend
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.pipeline.training import finetune as ft
from gridtune.store import Store
from tests.server_support import local  # noqa: F401 - fixture
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.local


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_model_tuned_to_stop_beats_its_base_on_stop_rate(local, tmp_path):
    spec = GridSpec(name="stops", generation="Say something about {place} in {year}.",
                    training="Place: {place}. Year: {year}.",
                    variables={"place": ["Oslo", "Lima", "Rome", "Kyiv"], "year": [2030, 2040, 2050]},
                    settings=GenerationSettings(temperature=0.7, max_tokens=50, samples=4))
    project = tmp_path / "stops.gridtune"
    with create_project(project, spec) as store:
        for item in store.pending_work():
            store.save_done(item.completion_id, text="Fine.", model="teacher", params={}, prompt_tokens=5,
                            completion_tokens=2, latency_s=0.1, finish_reason="stop", attempts=1)
    out = tmp_path / "stops.jsonl"
    r = run("export", str(project), "-o", str(out), "--hold-out", "place=Kyiv", "--json")
    assert json.loads(r.stdout)["held_out"]["cells"] == 3, r.output
    backend = resolve_backend()
    file = ft.upload_file(backend, out)
    job = ft.create_job(backend, file.id, local.model, epochs=8)
    ft.follow_job(backend, job.id)
    tuned = ft.get_job(backend, job.id).fine_tuned_model
    assert tuned
    with Store.open(project) as store:  # the job ran on a file: record it so eval finds the base itself
        store.record_job(id="job-test", base_url=None, model=local.model, training_file=None, validation_file=None,
                         export_id=store.latest_export().id, status="running")
        store.update_job("job-test", status="succeeded", fine_tuned_model=tuned)
    # Greedy: the tiny model's distribution stays nearly flat after a few steps, so sampling
    # would measure its noise; its most likely answer is what training changed.
    r = run("eval", str(project), "--model", tuned, "--samples", "2", "--max-tokens", "24", "--temperature", "0",
            "--json")
    report = json.loads(r.stdout)
    assert report["against"] == local.model
    assert report["tuned"]["stop_rate"]["value"] > report["base"]["stop_rate"]["value"]
    stop_row = next(row for row in report["comparison"] if row["metric"] == "stop_rate")
    assert stop_row["better"] == "tuned", report
    assert r.exit_code in (0, 1)  # the gate also weighs format; stop rate is what this test is about
