"""Cut-off completions (finish_reason "length"): marked, graded below finished ones,
left out of the export by default, warned about by validation, and regenerated
with more max tokens (issue 9). Real project files and the loopback fake server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.curation.grading import grade_by_length
from gridtune.pipeline.format.validate import ends_mid_sentence, validate_examples
from gridtune.pipeline.generation.estimate import ServerInfo, training_cost_line
from gridtune.pipeline.generation.generate import (
    GenerateError,
    GenerateOptions,
    redo_completion,
    run_generation,
    suggested_redo_max_tokens,
)
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.pipeline.training.export import export_project
from gridtune.store import Store

FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, progress_interval_s=0.1)


def planted(tmp_path: Path, rows: list[tuple[int, str]]) -> Path:
    """A 4x4 project whose first completions are (length, finish_reason) as given."""
    spec = GridSpec(name="t", system=None, generation="Tell about {a} and {b}.",
                    variables={"a": [1, 2, 3, 4], "b": ["p", "q", "r", "s"]},
                    settings=GenerationSettings(model="gpt-4o-mini", max_tokens=50))
    path = tmp_path / "p.gridtune"
    with create_project(path, spec) as store:
        for item, (n, finish) in zip(store.pending_work(limit=len(rows)), rows):
            text = ("word " * n)[: n - 1] + ("." if finish == "stop" else "w")
            store.save_done(item.completion_id, text=text, model="m", params={"max_tokens": 50},
                            prompt_tokens=1, completion_tokens=n // 5, latency_s=0.0, finish_reason=finish,
                            attempts=1)
    return path


# Ten finished completions of 20..200 characters, five cut off that are longer than all of them.
ROWS = [(20 * (i + 1), "stop") for i in range(10)] + [(400 + i, "length") for i in range(5)]


def test_cut_off_completions_are_marked_and_counted(tmp_path):
    with Store.open(planted(tmp_path, ROWS)) as store:
        rows = store.review_rows(where="done", sort="grid")
        cut = store.cut_off_among([r[0] for r in rows])
        assert len(cut) == 5
        assert {r[0] for r in store.review_rows(where="cut_off")} == cut
        assert store.status_counts().cut_off == 5 and store.status_counts().to_dict()["cut_off"] == 5
        assert all(store.get_completion(cid).cut_off for cid in cut)
        assert not any(store.get_completion(r[0]).cut_off for r in rows if r[0] not in cut)
    res = CliRunner().invoke(main, ["status", str(tmp_path / "p.gridtune"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["cut_off"] == 5


def test_grading_by_length_never_ranks_a_cut_off_completion_above_a_finished_one(tmp_path):
    with Store.open(planted(tmp_path, ROWS)) as store:
        result = grade_by_length(store)
        rows = store.review_rows(where="done", sort="grid")
        cut = store.cut_off_among([r[0] for r in rows])
        cut_grades = {store.get_completion(c).grade for c in cut}
        finished = [store.get_completion(r[0]).grade for r in rows if r[0] not in cut]
        assert cut_grades == {1}  # the longest of all, yet the lowest grade
        assert min(finished) >= max(cut_grades) and max(finished) == 5
        # the bands are quintiles of the finished ones only: two per grade
        assert sorted(finished) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert result.set_aside == 5 and result.to_dict()["set_aside_cut_off"] == 5
        assert "Set aside 5 cut-off completion(s)" in result.summary()
        # sorted by grade, best first: no cut-off one before a finished one
        order = [r[0] for r in store.review_rows(where="done", sort="grade", descending=True)]
        assert all(order.index(c) >= 8 for c in cut)


def test_export_leaves_cut_off_out_by_default_and_says_so(tmp_path):
    with Store.open(planted(tmp_path, ROWS)) as store:
        result = export_project(store, tmp_path / "out.jsonl")
        assert result.n_train == 10 and result.n_cut_off == 0 and result.n_cut_off_left_out == 5
        assert any("5 cut-off completion(s) left out" in w for w in result.warnings)
        answers = [json.loads(line)["messages"][-1]["content"] for line in (tmp_path / "out.jsonl").open()]
        assert all(a.endswith(".") for a in answers)
        assert result.report.stats["n_mid_sentence"] == 0


def test_include_cut_off_keeps_them_without_a_silent_stop(tmp_path):
    with Store.open(planted(tmp_path, ROWS)) as store:
        result = export_project(store, tmp_path / "out.jsonl", format="completion", include_cut_off=True)
        assert result.n_train == 15 and result.n_cut_off == 5
        stop = result.stop
        lines = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
        with_stop = [ex for ex in lines if ex["completion"].endswith(stop)]
        without = [ex for ex in lines if not ex["completion"].endswith(stop)]
        assert len(with_stop) == 10 and len(without) == 5
        assert all(ex["completion"].endswith("w") for ex in without)  # cut mid-word, as generated
        said = "\n".join(result.warnings)
        assert "5 cut-off completion(s) included" in said and f"without the stop `{stop}`" in said
        # validation warns with the count and share, both what the export knows and what the text shows
        assert "5 of 15 example(s) (33%) were cut off at max tokens" in result.report.warnings[-1]
        assert any("5 of 15 example(s) (33%) end mid-sentence" in w for w in result.report.warnings)
        assert result.to_dict()["cut_off"] == 5
        chat = export_project(store, tmp_path / "chat.jsonl", include_cut_off=True)
        assert chat.n_train == 15 and any("ends its turn" in w for w in chat.warnings)


def test_cli_export_include_cut_off_and_cost_line(tmp_path, monkeypatch):
    path = planted(tmp_path, ROWS)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used-0123456789")  # the OpenAI backend; nothing is called
    runner = CliRunner()
    default = runner.invoke(main, ["export", str(path), "-o", str(tmp_path / "a.jsonl"), "--json"])
    assert default.exit_code == 0, default.output
    d = json.loads(default.stdout)
    assert d["train"] == 10 and d["cut_off_left_out"] == 5 and d["include_cut_off"] is False
    assert "gpt-4o-mini-2024-07-18 on OpenAI" in d["cost_line"] and "as of 2025-04-14" in d["cost_line"]
    kept = runner.invoke(main, ["export", str(path), "-o", str(tmp_path / "b.jsonl"), "--include-cut-off",
                                "--format", "completion"])
    assert kept.exit_code == 0 and "5 cut-off completion(s) included" in kept.output
    assert "babbage" not in kept.output.split("cost:")[-1] or "retired" in kept.output
    assert "none can be priced" in kept.output


def test_cost_line_follows_the_backend():
    local = training_cost_line(backend_kind="local", model=None, tokens_total=30_000, epochs=3,
                               info=ServerInfo(prefill_tokens_per_s=300.0))
    # Rough: the prompt speed / 1.7 for forward + backward (issue 21: / 3 said 25 min for a 13 m 51 s job).
    assert local.startswith("no charge") and "~176 tokens/s" in local and "3 min" in local and "rough" in local
    measured = training_cost_line(backend_kind="local", model=None, tokens_total=30_000, epochs=3,
                                  info=ServerInfo(train_tokens_per_s=50.0, prefill_tokens_per_s=300.0))
    assert "10 min" in measured and "measured" in measured
    unknown = training_cost_line(backend_kind="local", model=None, tokens_total=30_000, epochs=3, info=None)
    assert "no charge" in unknown and "unknown" in unknown and "$" not in unknown
    retired = training_cost_line(backend_kind="openai", model="babbage-002", tokens_total=1_000_000, epochs=3)
    assert "gpt-4o-mini-2024-07-18" in retired and "$3.00" in retired and "can no longer be fine-tuned" in retired
    # served, but not among OpenAI's last fine-tunable snapshots
    nano = training_cost_line(backend_kind="openai", model="gpt-4.1-nano", tokens_total=1_000_000, epochs=3)
    assert "gpt-4o-mini-2024-07-18" in nano and "gpt-4.1-nano can no longer be fine-tuned" in nano
    mini = training_cost_line(backend_kind="openai", model="gpt-4.1-mini", tokens_total=1_000_000, epochs=3)
    assert "gpt-4.1-mini-2025-04-14" in mini and "$5.00" in mini
    legacy = training_cost_line(backend_kind="openai", model=None, tokens_total=10, epochs=3, legacy_format=True)
    assert "none can be priced" in legacy and "$" not in legacy


def test_validation_of_a_file_counts_mid_sentence_endings():
    assert ends_mid_sentence("It went on and") and not ends_mid_sentence('He said "stop."')
    assert not ends_mid_sentence("Really?)  ") and not ends_mid_sentence("**Done.**")
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "An answer."}]}
    cut = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "An answer that"}]}
    report = validate_examples([good] * 3 + [cut])
    assert report.stats["n_mid_sentence"] == 1
    assert any("1 of 4 example(s) (25%) end mid-sentence" in w for w in report.warnings)
    legacy = [{"prompt": f"p{i} ->", "completion": f" text {i} ends here. END"} for i in range(8)]
    legacy += [{"prompt": "p9 ->", "completion": " text cut in the END"}]
    report = validate_examples(legacy)
    assert report.stats["n_mid_sentence"] == 1  # the stop ` END` is not the end of the sentence


# -- redo with more max tokens, through the fake server ------------------------------------


def make_project(tmp_path: Path, max_tokens: int = 12) -> Path:
    spec = GridSpec(name="t", system=None, generation="Write about {a} and {b}.",
                    variables={"a": [1, 2, 3], "b": ["p", "q", "r", "s"]},
                    settings=GenerationSettings(model="gpt-4o-mini", temperature=0.7, max_tokens=max_tokens, seed=3))
    path = tmp_path / "g.gridtune"
    create_project(path, spec).close()
    return path


def test_redo_cut_off_regenerates_exactly_those_with_the_new_max_tokens(tmp_path, fake_openai):
    path = make_project(tmp_path)
    first = asyncio.run(run_generation(path, GenerateOptions(**FAST)))
    assert first.state == "finished"
    with Store.open(path) as store:
        before = {r.id: r for r in store.completions()}
        cut = {cid for cid, r in before.items() if r.finish_reason == "length"}
        assert 0 < len(cut) < len(before)  # the fake server cuts replies longer than max_tokens words
        grade_by_length(store)
        store.set_grade(min(cut), 4, "person")
        assert suggested_redo_max_tokens(store) == 24
    fake_openai.requests.clear()
    runner = CliRunner()
    bad = runner.invoke(main, ["generate", str(path), "--redo-cut-off"])
    assert bad.exit_code == 2 and "--max-tokens" in bad.stderr
    res = runner.invoke(main, ["generate", str(path), "--redo-cut-off", "--max-tokens", "200"])
    assert res.exit_code == 0, res.output
    assert f"redo: {len(cut)} cut-off completion(s) with max_tokens 200" in res.stderr
    sent = fake_openai.chat_requests()
    assert len(sent) == len(cut) and {r.body["max_tokens"] for r in sent} == {200}
    with Store.open(path) as store:
        after = {r.id: r for r in store.completions()}
        for cid, r in after.items():
            if cid in cut:
                assert r.finish_reason == "stop" and r.params["max_tokens"] == 200
                assert len(r.text) > len(before[cid].text)
                assert r.grade is None  # the old text's grades (a person's too) are withdrawn ...
                assert [g.undone for g in store.grade_history(cid)] == [True] * len(store.grade_history(cid))
            else:
                assert (r.text, r.updated_at, r.grade) == (before[cid].text, before[cid].updated_at,
                                                           store.get_completion(cid).grade)
        assert store.status_counts().cut_off == 0
    # Again: nothing left to redo (none is cut off), no request sent.
    fake_openai.requests.clear()
    again = runner.invoke(main, ["generate", str(path), "--redo-cut-off", "--max-tokens", "200"])
    assert again.exit_code == 0 and fake_openai.chat_requests() == []


def test_redo_skips_those_already_redone_with_as_many_tokens(tmp_path, fake_openai):
    path = make_project(tmp_path, max_tokens=6)
    asyncio.run(run_generation(path, GenerateOptions(**FAST)))
    with Store.open(path) as store:
        cut = {r.id for r in store.completions() if r.finish_reason == "length"}
    # A redo at 10 tokens leaves some still cut off; repeating it at 10 redoes none of them.
    asyncio.run(run_generation(path, GenerateOptions(redo_cut_off=True, max_tokens=10, **FAST)))
    with Store.open(path) as store:
        still = {r.id for r in store.completions() if r.finish_reason == "length"}
    assert still and still <= cut
    fake_openai.requests.clear()
    try:  # a run with nothing to do may also be refused up front, saying so
        asyncio.run(run_generation(path, GenerateOptions(redo_cut_off=True, max_tokens=10, **FAST)))
    except GenerateError as exc:
        assert "nothing to redo" in str(exc)
    assert fake_openai.chat_requests() == []
    asyncio.run(run_generation(path, GenerateOptions(redo_cut_off=True, max_tokens=11, **FAST)))
    assert len(fake_openai.chat_requests()) == len(still)


def test_redo_one_completion(tmp_path, fake_openai):
    path = make_project(tmp_path)
    asyncio.run(run_generation(path, GenerateOptions(**FAST)))
    with Store.open(path) as store:
        target = next(r for r in store.completions() if r.finish_reason == "length")
        others = {r.id: r.updated_at for r in store.completions() if r.id != target.id}
    fake_openai.requests.clear()
    result = asyncio.run(redo_completion(path, target.id, max_tokens=100))
    assert result.state == "finished" and result.progress.done == 1
    assert len(fake_openai.chat_requests()) == 1
    with Store.open(path) as store:
        redone = store.get_completion(target.id)
        assert redone.finish_reason == "stop" and redone.params["max_tokens"] == 100
        assert {r.id: r.updated_at for r in store.completions() if r.id != target.id} == others
    try:
        asyncio.run(redo_completion(path, 99999, max_tokens=100))
    except ValueError as exc:
        assert "no completion #99999" in str(exc)
    else:
        raise AssertionError("a missing id must be refused")
