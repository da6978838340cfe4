"""Export from a real project file: shapes, filters, the split, separators,
atomic writes, the record in the project, and `gridtune export`'s exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.spec.grid import GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.pipeline.training.export import ExportError, export_project, export_project_async, valid_path_for
from gridtune.store import Store
from tests.tiny_model import tiny_model_dir  # noqa: F401  (session fixture)

WEIRD = 'Zürich "quoted"\nnew line {brace} 東京 ✓'


def make_spec(**overrides) -> GridSpec:
    spec = GridSpec(
        name="t",
        system="You are a careful futurist.",
        generation="Write about {place} in {year}.",
        training="Place: {place}. Year: {year}.",
        variables={"place": ["Oslo", "Lima", WEIRD, "Lagos", "Tokyo"], "year": [2030, 2040, 2050, 2060]},
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def text_for(values: dict) -> str:
    return f"In {values['place']} by {values['year']}, things changed."


@pytest.fixture
def project(tmp_path) -> Path:
    """20 cells, all done; grades by position: 0 (rejected), 1..5, or none."""
    path = tmp_path / "p.gridtune"
    with create_project(path, make_spec()) as store:
        for i, work in enumerate(store.pending_work()):
            store.save_done(
                work.completion_id, text=text_for(work.values), model="m", params=None,
                prompt_tokens=5, completion_tokens=9, latency_s=0.1, finish_reason="stop", attempts=1,
            )
            grade = i % 7  # 0..5 graded, 6 -> left ungraded
            if grade <= 5:
                store.set_grade(work.completion_id, grade)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def grades(path: Path) -> dict[int, int | None]:
    with Store.open(path) as store:
        return {c.id: c.grade for c in store.completions()}


def test_chat_export_shape_and_alignment(project, tmp_path):
    out = tmp_path / "train.jsonl"
    with Store.open(project) as store:
        result = export_project(store, out)
        rejected = sum(1 for c in store.completions() if c.grade == 0)
    rows = read_jsonl(out)
    assert result.ok and result.n_train == len(rows) == 20 - rejected and result.n_valid == 0
    assert result.n_skipped == rejected
    spec = make_spec()
    for row in rows:
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": "You are a careful futurist."}
        assert user["role"] == "user" and assistant["role"] == "assistant"
        # The assistant text was generated for exactly the values in the training prompt.
        place, year = assistant["content"].removeprefix("In ").removesuffix(", things changed.").rsplit(" by ", 1)
        assert user["content"] == spec.render({"place": place, "year": int(year)}).training
    assert any(WEIRD in r["messages"][1]["content"] for r in rows)  # unicode, quotes, newline survive
    assert result.report.ok and result.report.n_examples == len(rows)


def test_no_system_message_when_spec_has_none(tmp_path):
    path = tmp_path / "p.gridtune"
    with create_project(path, make_spec(system=None)) as store:
        for work in store.pending_work():
            store.save_done(work.completion_id, text="x y z", model="m", params=None, prompt_tokens=1,
                            completion_tokens=1, latency_s=0.1, finish_reason="stop", attempts=1)
        export_project(store, tmp_path / "o.jsonl")
    assert [m["role"] for m in read_jsonl(tmp_path / "o.jsonl")[0]["messages"]] == ["user", "assistant"]


def test_min_grade_and_rejected(project, tmp_path):
    g = grades(project)
    with Store.open(project) as store:
        r4 = export_project(store, tmp_path / "g4.jsonl", min_grade=4)
        r0 = export_project(store, tmp_path / "g0.jsonl", min_grade=0)
    assert r4.n_train == sum(1 for v in g.values() if v is not None and v >= 4)
    assert r0.n_train == sum(1 for v in g.values() if v != 0)  # ungraded kept, rejected never
    texts = {r["messages"][2]["content"] for r in read_jsonl(tmp_path / "g0.jsonl")}
    with Store.open(project) as store:
        for c in store.completions():
            assert (c.text in texts) == (c.grade != 0)


def test_completion_format_defaults(project, tmp_path):
    out = tmp_path / "c.jsonl"
    with Store.open(project) as store:
        result = export_project(store, out, format="completion")
    assert (result.separator, result.stop) == ("\n\n###\n\n", " END")
    rows = read_jsonl(out)
    assert set(rows[0]) == {"prompt", "completion"}
    for row in rows:
        assert row["prompt"].endswith("\n\n###\n\n") and row["prompt"].startswith("Place: ")
        assert row["completion"].startswith(" In ") and row["completion"].endswith(" END")
    assert result.report.format == "completion" and result.report.ok


def test_default_separator_and_stop_avoid_the_data(tmp_path):
    path = tmp_path / "p.gridtune"
    spec = make_spec(training="Place: {place}.\n\n###\n\nYear: {year}.")
    with create_project(path, spec) as store:
        for work in store.pending_work():
            store.save_done(work.completion_id, text="The END of it. STOP here.\n\n===\n\n", model="m",
                            params=None, prompt_tokens=1, completion_tokens=1, latency_s=0.1,
                            finish_reason="stop", attempts=1)
        result = export_project(store, tmp_path / "c.jsonl", format="completion")
    assert result.separator == "\n\n---\n\n"  # ### is in the prompts, === in the completions
    assert result.stop == " [END]"  # " END" and " STOP" occur in the text
    for row in read_jsonl(tmp_path / "c.jsonl"):
        assert row["prompt"].count(result.separator) == 1
        assert row["completion"].count(result.stop) == 1


def test_given_separator_and_stop(project, tmp_path):
    with Store.open(project) as store:
        result = export_project(store, tmp_path / "c.jsonl", format="completion", separator=" ->", stop=" changed")
    assert result.separator == " ->" and result.stop == " changed"
    assert any("occurs inside the data" in w for w in result.warnings)  # "changed" is in every text
    assert read_jsonl(tmp_path / "c.jsonl")[0]["completion"].endswith("changed. changed")


def test_deterministic_split(project, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with Store.open(project) as store:
        ra = export_project(store, a, validation_fraction=0.3)
        rb = export_project(store, b, validation_fraction=0.3)
        full = read_jsonl(Path(export_project(store, tmp_path / "all.jsonl").path))
    assert ra.valid_path == valid_path_for(a) == tmp_path / "a.valid.jsonl"
    assert read_jsonl(a) == read_jsonl(b) and read_jsonl(ra.valid_path) == read_jsonl(rb.valid_path)
    train, valid = read_jsonl(a), read_jsonl(ra.valid_path)
    assert ra.n_train == len(train) and ra.n_valid == len(valid) and valid
    assert sorted(map(json.dumps, train + valid)) == sorted(map(json.dumps, full))  # a partition


def test_split_is_roughly_the_fraction(tmp_path):
    path = tmp_path / "big.gridtune"
    spec = make_spec(variables={"place": [f"p{i}" for i in range(40)], "year": list(range(2000, 2025))})
    with create_project(path, spec) as store:
        for work in store.pending_work():
            store.save_done(work.completion_id, text="t", model="m", params=None, prompt_tokens=1,
                            completion_tokens=1, latency_s=0.1, finish_reason="stop", attempts=1)
        result = export_project(store, tmp_path / "o.jsonl", validation_fraction=0.2)
    assert result.n_train + result.n_valid == 1000
    assert 150 <= result.n_valid <= 250  # binomial(1000, 0.2): sd ~13


def test_export_is_recorded(project, tmp_path):
    with Store.open(project) as store:
        result = export_project(store, tmp_path / "o.jsonl", format="completion", min_grade=2,
                                validation_fraction=0.25, model="gpt-3.5-turbo")
        record = store.latest_export()
    assert record.id == result.export_id
    assert (record.format, record.min_grade, record.separator, record.stop) == ("completion", 2, result.separator, result.stop)
    assert (record.n_train, record.n_valid, record.validation_fraction) == (result.n_train, result.n_valid, 0.25)
    assert record.path == str((tmp_path / "o.jsonl").resolve())
    assert record.report["model"] == "gpt-3.5-turbo" and record.report["n_examples"] == result.n_train


@pytest.mark.parametrize("kwargs, message", [
    ({"validation_fraction": 1.0}, "validation-fraction"),
    ({"validation_fraction": -0.1}, "validation-fraction"),
    ({"min_grade": 6}, "min-grade"),
    ({"format": "csv"}, "format"),
    ({"separator": "##"}, "completion only"),
    ({"min_grade": 5, "out": "sub/none/o.jsonl"}, "no such directory"),
    ({"format": "completion", "separator": ""}, "--separator must not be empty"),
    ({"format": "completion", "stop": ""}, "--stop must not be empty"),
    ({"out": "a" * 300 + ".jsonl"}, "too long"),
    ({"out": "a" * 245 + ".jsonl"}, "cannot write"),  # its temporary file's name is too long
])
def test_bad_input_writes_nothing(project, tmp_path, kwargs, message):
    out = tmp_path / kwargs.pop("out", "o.jsonl")
    with Store.open(project) as store:
        with pytest.raises(ExportError, match=message):
            export_project(store, out, **kwargs)
        assert store.exports() == []
    assert not any(p.name.endswith((".jsonl", ".tmp")) for p in tmp_path.rglob("*"))


def test_nothing_to_export_leaves_no_file(tmp_path):
    path = tmp_path / "p.gridtune"
    with create_project(path, make_spec()) as store:
        with pytest.raises(ExportError, match="nothing to export"):
            export_project(store, tmp_path / "o.jsonl")
    assert not any(p.name.endswith((".jsonl", ".tmp")) for p in tmp_path.iterdir())


def test_failure_midway_leaves_previous_file_intact(project, tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    out.write_text("previous export\n")
    import gridtune.pipeline.training.export as export_mod

    calls = {"n": 0}

    def boom(spec, values, text):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return {"messages": []}

    monkeypatch.setattr(export_mod, "chat_example", boom)
    monkeypatch.setattr(export_mod, "_BATCH", 2)
    with Store.open(project) as store, pytest.raises(RuntimeError):
        export_project(store, out)
    assert out.read_text() == "previous export\n"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


async def test_async_api(project, tmp_path):
    with Store.open(project) as store:
        result = await export_project_async(store, tmp_path / "o.jsonl", validation_fraction=0.5)
    d = result.to_dict()
    json.dumps(d)
    assert d["train"] + d["valid"] == result.n_train + result.n_valid and d["ok"] is True


# -- the command line -------------------------------------------------------------

def test_cli_export(project, tmp_path):
    runner = CliRunner()
    out = tmp_path / "o.jsonl"
    res = runner.invoke(main, ["export", str(project), "-o", str(out), "--format", "completion",
                               "--validation-fraction", "0.25", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["format"] == "completion" and d["separator"] == "\n\n###\n\n" and d["report"]["ok"]
    assert out.exists() and (tmp_path / "o.valid.jsonl").exists()
    text = runner.invoke(main, ["export", str(project), "-o", str(out), "--min-grade", "3"])
    assert text.exit_code == 0 and "exported" in text.output


@pytest.mark.parametrize("args, message", [
    (["--validation-fraction", "1"], "validation-fraction"),
    (["--min-grade", "9"], "min-grade"),
    (["--format", "xml"], "xml"),
])
def test_cli_bad_input_exit_2(project, tmp_path, args, message):
    res = CliRunner().invoke(main, ["export", str(project), "-o", str(tmp_path / "o.jsonl"), *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("name", ["p.gridtune", "p.gridtune-wal", "p.gridtune.log"])
def test_cli_export_never_overwrites_the_project(project, tmp_path, name):
    before = grades(project)
    res = CliRunner().invoke(main, ["export", str(project), "-o", str(tmp_path / name)])
    assert res.exit_code == 2 and "is the project's own file" in res.stderr
    assert grades(project) == before  # still a project, every completion in it


def test_cli_no_project_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["export", str(tmp_path / "none.gridtune"), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "no such project" in res.stderr


def test_cli_nothing_to_export_exit_2(tmp_path):
    path = tmp_path / "p.gridtune"
    create_project(path, make_spec()).close()
    res = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "nothing to export" in res.stderr


def test_cli_exit_1_when_written_file_fails_validation(tmp_path):
    # A training template that renders empty makes a user message without content.
    path = tmp_path / "p.gridtune"
    spec = make_spec(training="{place}", variables={"place": ["", "x"], "year": [1]},
                     generation="About {place} {year}")
    with create_project(path, spec) as store:
        for work in store.pending_work():
            store.save_done(work.completion_id, text="ok", model="m", params=None, prompt_tokens=1,
                            completion_tokens=1, latency_s=0.1, finish_reason="stop", attempts=1)
    res = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "o.jsonl"), "--json"])
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    assert d["report"]["errors"] == {"missing_content": 1} and d["ok"] is False


def test_local_backend_counts_tokens_with_the_local_models_own_tokenizer(project, tmp_path, monkeypatch,
                                                                          tiny_model_dir):
    """On the local backend the export's token counts (and so the training estimate and
    the context check) come from the model that trains, not from gpt-4o-mini's encoding."""
    from tokenizers import Tokenizer

    from gridtune.core.serverstate import DEFAULT_MODEL

    monkeypatch.setenv("GRIDTUNE_CACHE", str(tmp_path / "cache"))
    local = ("local", "the local server", None)
    with Store.open(project) as store:
        before = export_project(store, tmp_path / "a.jsonl", backend=local)  # no cached copy yet
        cached = tmp_path / "cache" / "models" / DEFAULT_MODEL / "hf"
        cached.mkdir(parents=True)
        (cached / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
        after = export_project(store, tmp_path / "b.jsonl", backend=local)
        elsewhere = export_project(store, tmp_path / "c.jsonl")
    assert before.report.stats["encoding"] == "o200k_base"
    assert after.report.stats["encoding"] == "its own tokenizer" and after.report.model == DEFAULT_MODEL
    assert elsewhere.report.stats["encoding"] == "o200k_base"
    # The figure is the tokenizer's own count of every value, 3 per message and 3 priming
    # the reply, as the cookbook counts OpenAI's.
    tok = Tokenizer.from_file(str(cached / "tokenizer.json"))
    rows = read_jsonl(tmp_path / "b.jsonl")
    expected = sum(3 + sum(3 + sum(len(tok.encode(v, add_special_tokens=False).ids) for v in m.values())
                           for m in r["messages"]) for r in rows)
    billed = after.report.stats["billed_tokens_per_epoch"]
    assert billed == expected != elsewhere.report.stats["billed_tokens_per_epoch"]
