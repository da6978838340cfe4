"""The validator: every chat error class of OpenAI's notebook, the legacy
prepare_data checks, the statistics, and `gridtune validate`'s exit codes."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.format import cost, tokens
from gridtune.pipeline.format.validate import ValidationInputError, validate_examples, validate_file

SYS = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "Say hi."}
ASSISTANT = {"role": "assistant", "content": "Hi."}
GOOD = {"messages": [SYS, USER, ASSISTANT]}


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            fh.write("\n")
    return path


@pytest.fixture
def good_chat(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", [GOOD] * 12)


def test_good_chat_file(good_chat):
    r = validate_file(good_chat)
    assert r.ok and r.errors == {} and r.format == "chat" and r.n_examples == 12
    per_example = tokens.count_message_tokens(GOOD["messages"], r.model)
    assert r.stats["tokens_per_example"]["max"] == per_example
    assert r.stats["messages_per_example"]["median"] == 3
    assert r.stats["assistant_tokens_per_example"]["min"] == tokens.count_tokens("Hi.", r.model)
    assert r.stats["billed_tokens_per_epoch"] == 12 * per_example
    assert r.stats["epochs"] == cost.default_epochs(12) == 8
    assert r.stats["estimated_cost_usd"] == pytest.approx(cost.training_cost(r.model, 12 * per_example, 8))
    assert "No errors found." in r.render_text()
    json.dumps(r.to_dict())  # JSON-able


# One bad example per error class, and the class it must be counted under.
CHAT_ERRORS = [
    ("data_type", ["not", "an", "object"]),
    ("data_type", "42"),
    ("missing_messages_list", {"prompt": "x"}),
    ("missing_messages_list", {"messages": []}),
    ("missing_messages_list", {"messages": "hello"}),
    ("message_missing_key", {"messages": [USER, {"role": "assistant"}]}),
    ("message_missing_key", {"messages": [USER, {"content": "x"}, ASSISTANT]}),
    ("message_unrecognized_key", {"messages": [USER, {**ASSISTANT, "mood": "happy"}]}),
    ("unrecognized_role", {"messages": [{"role": "robot", "content": "x"}, ASSISTANT]}),
    ("missing_content", {"messages": [USER, {"role": "assistant", "content": ""}]}),
    ("missing_content", {"messages": [USER, {"role": "assistant", "content": 7}]}),
    ("example_missing_assistant_message", {"messages": [SYS, USER]}),
    ("invalid_json", '{"messages": [ oops'),
]


@pytest.mark.parametrize("kind, bad", CHAT_ERRORS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CHAT_ERRORS)])
def test_each_chat_error_class(tmp_path, kind, bad):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    r = validate_file(path)
    assert not r.ok
    assert r.errors.get(kind, 0) >= 1, r.errors
    assert r.error_lines[kind] == [3]  # the line number of the bad example
    assert r.format == "chat"


def test_error_counts_and_lines(tmp_path):
    rows = [GOOD] + [{"messages": [SYS, USER]}] * 7 + ["{bad", GOOD]
    r = validate_file(write_jsonl(tmp_path / "f.jsonl", rows))
    assert r.errors == {"example_missing_assistant_message": 7, "invalid_json": 1}
    assert r.error_lines["example_missing_assistant_message"] == [2, 3, 4, 5, 6]  # the first few
    assert r.error_lines["invalid_json"] == [9]
    text = r.render_text()
    assert "example_missing_assistant_message: 7 (line 2, 3, 4, 5, 6, ...)" in text


def test_function_call_without_content_is_fine(tmp_path):
    call = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    r = validate_examples([{"messages": [USER, call, ASSISTANT]}] * 10)
    assert r.ok, r.errors


def test_missing_system_and_user_warnings():
    r = validate_examples([{"messages": [USER, ASSISTANT]}] * 3 + [{"messages": [SYS, ASSISTANT]}] * 2 + [GOOD] * 5)
    assert r.stats["n_missing_system"] == 3 and r.stats["n_missing_user"] == 2
    assert "3 example(s) missing a system message" in r.warnings
    assert "2 example(s) missing a user message" in r.warnings
    assert r.ok  # warnings are not errors


def test_distributions():
    exs = [{"messages": [USER] * k + [ASSISTANT]} for k in range(1, 21)]  # 2..21 messages
    r = validate_examples(exs)
    d = r.stats["messages_per_example"]
    assert (d["min"], d["max"], d["mean"], d["median"]) == (2, 21, 11.5, 11.5)
    assert d["p5"] == pytest.approx(2.95) and d["p95"] == pytest.approx(20.05)  # numpy's linear quantiles


def test_over_context_counted_and_billed_capped():
    long = {"messages": [USER, {"role": "assistant", "content": "word " * 20_000}]}
    r = validate_examples([GOOD] * 9 + [long], model="gpt-3.5-turbo")
    assert r.stats["context_length"] == 16385
    assert r.stats["n_over_context"] == 1
    assert any("over the 16,385-token limit" in w and "line 10" in w for w in r.warnings)
    short = tokens.count_message_tokens(GOOD["messages"], "gpt-3.5-turbo")
    assert r.stats["billed_tokens_per_epoch"] == 9 * short + 16385
    assert r.stats["encoding"] == "cl100k_base"


def test_unknown_model_has_no_price(good_chat):
    r = validate_file(good_chat, model="my-local-llama")
    assert r.ok and r.stats["estimated_cost_usd"] is None
    assert "no price known" in r.render_text()


def test_validate_file_streams_in_constant_memory(tmp_path):
    # ~5 MB of examples; the validator may keep small per-example numbers, never the text.
    text = "Lorem ipsum dolor sit amet. " * 300  # ~8 KB per example
    row = json.dumps({"messages": [USER, {"role": "assistant", "content": text}]})
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        for _ in range(600):
            fh.write(row + "\n")
    tokens.get_encoding(None)  # load the encoding before measuring
    tracemalloc.start()
    r = validate_file(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert r.ok and r.n_examples == 600
    assert path.stat().st_size > 5_000_000
    assert peak < 1_000_000, peak  # a fifth of the file


def test_bad_inputs(tmp_path):
    with pytest.raises(ValidationInputError, match="no such file"):
        validate_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValidationInputError, match="empty"):
        validate_file(tmp_path / "empty.jsonl")
    with pytest.raises(ValidationInputError, match="directory"):
        validate_file(tmp_path)


def test_invalid_utf8_is_an_invalid_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe{}\n")
    r = validate_file(path)
    assert r.error_lines["invalid_json"] == [2]


def test_nesting_too_deep_and_binary_junk_are_invalid_lines(tmp_path):
    path = tmp_path / "f.jsonl"
    junk = bytes(b for b in range(256) if b != ord("\n")) * 40
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b"[" * 100_000 + b"\n" + junk + b"\n")
    r = validate_file(path)
    assert r.error_lines["invalid_json"] == [2, 3] and r.n_examples == 1
    res = CliRunner().invoke(main, ["validate", str(path)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)  # exit 1, not a crash
    assert "2 format error(s)" in res.stderr


# -- legacy prompt/completion ---------------------------------------------------

def legacy(n: int, sep: str = "\n\n###\n\n", stop: str = " END") -> list[dict]:
    return [{"prompt": f"City {i} in year {2000 + i}{sep}", "completion": f" A story about city {i}.{stop}"} for i in range(n)]


def test_good_legacy_file(tmp_path):
    r = validate_file(write_jsonl(tmp_path / "l.jsonl", legacy(120)))
    assert r.format == "completion" and r.ok and r.n_examples == 120
    assert r.model == "babbage-002" and r.stats["encoding"] == "cl100k_base"
    assert "all prompts end with the separator `\\n\\n###\\n\\n`" in r.notes
    assert "all completions end with the stop ` END`" in r.notes  # the marker, not the sentence's "."
    assert not any("pair(s); at least a few hundred" in w for w in r.warnings)
    assert not any("start with a space" in w for w in r.warnings)
    # babbage-002 still counts the tokens, but it is retired: no cost is given for it.
    assert r.stats["estimated_cost_usd"] is None and r.stats["price_model"] is None
    assert "retired" in r.stats["price_note"] and "none can be priced" in r.render_text()
    assert "$" not in r.render_text()


def test_legacy_warnings(tmp_path):
    rows = legacy(10, sep="", stop="")
    rows[3]["completion"] = "no leading space"
    rows.append(dict(rows[0]))  # a duplicate pair
    rows.append({"prompt": "", "completion": " empty prompt here"})
    rows.append({"prompt": "x" * 6000, "completion": " " + "y" * 6000})
    r = validate_file(write_jsonl(tmp_path / "l.jsonl", rows))
    w = "\n".join(r.warnings)
    assert "only 13 prompt-completion pair(s)" in w
    assert "1 duplicated prompt-completion pair(s) (line 11)" in w
    assert "1 very long example(s) over 10,000 characters (line 13)" in w
    assert "1 empty prompt(s) (line 12)" in w
    # prepare_data's first choice " ->" fits: no prompt has a newline.
    assert "no common separator at the end of the prompts; append one such as ` ->`" in w
    assert "no common ending (stop sequence) on the completions; append one such as `\\n`" in w
    assert "1 completion(s) do not start with a space" in w
    assert r.ok


def test_legacy_suggestions_avoid_strings_in_the_data(tmp_path):
    rows = legacy(20, sep="", stop="")
    rows[0]["prompt"] += "\n\n###\n\n is used"
    rows[1]["completion"] += "\n and . and END ***"
    rows[2]["prompt"] += " text"
    r = validate_file(write_jsonl(tmp_path / "l.jsonl", rows))
    assert r.stats["suggested_separator"] == "\n\n===\n\n"
    assert r.stats["suggested_stop"] == "+++"


def test_legacy_separator_inside_prompts_is_flagged(tmp_path):
    rows = legacy(20)
    rows[5]["prompt"] = "has \n\n###\n\n inside" + "\n\n###\n\n"
    r = validate_file(write_jsonl(tmp_path / "l.jsonl", rows))
    assert any("1 prompt(s) contain the separator `\\n\\n###\\n\\n` more than once" in w for w in r.warnings)


@pytest.mark.parametrize("rows, kind", [
    ([{"prompt": "same ->", "completion": f" c{i}"} for i in range(5)], "all_prompts_identical"),
    ([{"prompt": f"p{i} ->", "completion": " same"} for i in range(5)], "all_completions_identical"),
    ([{"prompt": "a ->", "completion": ""}, {"prompt": "b ->", "completion": " x"}], "empty_completion"),
    ([{"prompt": "a ->"}, {"prompt": "b ->", "completion": " x"}], "missing_completion"),
    ([{"completion": " y"}, {"prompt": "b ->", "completion": " x"}], "missing_prompt"),
    ([{"prompt": "a", "completion": " y", "label": 1}, {"prompt": "b", "completion": " x"}], "unrecognized_key"),
    ([{"prompt": "a", "completion": 5}, {"prompt": "b", "completion": " x"}], "completion_not_a_string"),
])
def test_legacy_errors(tmp_path, rows, kind):
    r = validate_file(write_jsonl(tmp_path / "l.jsonl", rows))
    assert r.format == "completion"
    assert kind in r.errors, r.errors


def test_open_ended_generation_allows_empty_prompts():
    r = validate_examples([{"prompt": "", "completion": f" story {i} END"} for i in range(5)])
    assert r.stats["task_type"] == "open-ended generation"
    assert "all_prompts_identical" not in r.errors and r.ok


# -- the command line -------------------------------------------------------------

def test_cli_exit_codes(tmp_path, good_chat):
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(good_chat)])
    assert ok.exit_code == 0, ok.output
    assert "No errors found." in ok.output

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"messages": [USER]}])
    res = runner.invoke(main, ["validate", str(bad), "--json"])
    assert res.exit_code == 1
    payload = json.loads(res.stdout)  # exactly one JSON object on stdout
    assert payload["errors"] == {"example_missing_assistant_message": 1} and payload["ok"] is False

    missing = runner.invoke(main, ["validate", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    (tmp_path / "empty.jsonl").write_text("")
    empty = runner.invoke(main, ["validate", str(tmp_path / "empty.jsonl"), "--json"])
    assert empty.exit_code == 2 and empty.stdout == ""


def test_cli_model_changes_tokenizer_and_price(good_chat):
    res = CliRunner().invoke(main, ["validate", str(good_chat), "--model", "gpt-3.5-turbo", "--json"])
    d = json.loads(res.stdout)
    assert d["model"] == "gpt-3.5-turbo" and d["stats"]["encoding"] == "cl100k_base"
    assert d["stats"]["price_model"] is None  # served, no longer fine-tunable: no training price
    res = CliRunner().invoke(main, ["validate", str(good_chat), "--model", "gpt-4.1-mini", "--json"])
    assert json.loads(res.stdout)["stats"]["price_model"] == "gpt-4.1-mini-2025-04-14"


def test_a_line_over_the_cap_is_one_error_naming_it_and_the_rest_is_still_checked(tmp_path, monkeypatch):
    from gridtune.pipeline.format import validate

    row = json.dumps(GOOD)
    monkeypatch.setattr(validate, "MAX_LINE_BYTES", len(row) + 1)  # a line of exactly the cap (with its newline) is fine
    long_row = json.dumps({"messages": [SYS, USER, {**ASSISTANT, "content": "x" * 5000}]})
    path = write_jsonl(tmp_path / "f.jsonl", [row, long_row, row, long_row[:-1], row])
    r = validate_file(path)
    assert r.errors == {"line_too_long": 2} and r.error_lines["line_too_long"] == [2, 4]
    assert r.n_examples == 3 and r.n_lines == 5
    assert any("line 2 is longer than" in w for w in r.warnings)


def test_report_lines_say_what_each_line_is_and_render_text_prints_them():
    """The structured view the TUI styles: every warning added to ``warnings`` (however
    a check adds it) is a warning line; errors are error lines under their heading."""
    from gridtune.pipeline.format.validate import ERROR, FIGURE, OK, TITLE, WARNING, ValidationReport

    report = validate_examples([{"messages": [{"role": "user", "content": "hi"}]},
                                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok."}]}])
    report.warnings.append("a warning added by another check")
    lines = report.lines()
    assert lines[0].kind == TITLE
    assert [(ln.kind, ln.heading) for ln in lines if ln.text.endswith("error(s):")] == [(ERROR, True)]
    assert any(ln.kind == ERROR and "example_missing_assistant_message: 1" in ln.text for ln in lines)
    warnings = [ln.text for ln in lines if ln.kind == WARNING and not ln.heading]
    assert "  - a warning added by another check" in warnings and "  - 2 example(s) missing a system message" in warnings
    assert any(ln.kind == FIGURE and ln.text.startswith("tokens per example") for ln in lines)
    assert report.render_text() == "\n".join(ln.text for ln in lines)
    clean = validate_examples([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok."}]}])
    assert [ln.kind for ln in clean.lines()][:2] == [TITLE, OK]
    again = ValidationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again is not None and again.render_text() == report.render_text()
    assert ValidationReport.from_dict(None) is None and ValidationReport.from_dict({"errors": 3}) is None
