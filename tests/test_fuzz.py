"""Property-based fuzzing (hypothesis) of the two inputs a person hands gridtune as
files: grid specs (`gridtune new`) and training files (`gridtune validate`).

Whatever the input: an exit code the contract knows, never a traceback; a refusal
is one line and writes nothing. The commands run in-process (click's runner): a
few hundred cases in seconds, where a process each would take minutes."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from gridtune.cli.main import main

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def toml(doc: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{table}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


names = st.sampled_from(["a", "b", "place", "year", "x y", "", "ä", "{a}", "a}"])
scalars = st.one_of(st.integers(-3, 2030), st.text(max_size=12), st.floats(allow_nan=True), st.booleans())
templates = st.one_of(
    st.lists(st.one_of(st.text(max_size=8), names.map(lambda n: "{" + n + "}"), st.sampled_from(["{", "}", "{{", "}}"])),
             max_size=6).map("".join),
    st.text(max_size=40),
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=20), st.integers()),
        "max_cells": st.integers(-5, 10**12),
        "prompt": st.fixed_dictionaries({}, optional={"generation": templates, "training": templates,
                                                      "system": st.one_of(st.text(max_size=20), st.integers())}),
        "variables": st.dictionaries(names, st.one_of(st.lists(scalars, max_size=6), scalars), max_size=4),
        "generation": st.fixed_dictionaries({}, optional={
            "model": st.one_of(st.text(max_size=10), st.integers()),
            "temperature": st.one_of(st.floats(allow_nan=True), st.integers(-2, 5), st.text(max_size=3)),
            "max_tokens": st.one_of(st.integers(-10, 10**9), st.floats(allow_nan=True)),
            "samples": st.integers(-2, 10**7),
        }),
    },
)


def spec_texts() -> st.SearchStrategy[str]:
    whole = specs.map(toml)
    cut = st.tuples(whole, st.integers(0, 400)).map(lambda t: t[0][: t[1]])  # a file cut short
    return st.one_of(whole, whole, cut, st.text(max_size=200))


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    # Exit codes are the contract's; anything else (a traceback) is a bug.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assert_one_line_refusal(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line: the problem, named
    assert lines[0].startswith(("gridtune: error: ", "Error: ")), lines[0]


@FUZZ
@given(spec_texts())
def test_new_on_any_spec_makes_a_project_or_refuses_in_one_line_writing_nothing(text):
    with tempfile.TemporaryDirectory() as folder:
        spec, project = Path(folder) / "spec.toml", Path(folder) / "p.gridtune"
        spec.write_text(text, encoding="utf-8")
        result = invoke("new", str(project), "--spec", str(spec))
        if result.exit_code == 0:
            assert project.is_file() and result.stdout.startswith("created "), result.output
            return
        assert_one_line_refusal(result)
        assert sorted(p.name for p in Path(folder).iterdir()) == ["spec.toml"]  # nothing written


weights = st.one_of(st.sampled_from([0, 1]), st.integers(-2, 3), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=2), st.none())
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot", 3]),
     "content": st.one_of(st.text(max_size=30), st.none(), st.integers())},
    optional={"weight": weights, "name": st.text(max_size=5), "extra": st.integers()},
)
examples = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(messages, max_size=4)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "completion": st.text(max_size=20)}),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
    scalars,
)


lines = st.one_of(examples.map(lambda e: json.dumps(e, allow_nan=True)), examples.map(json.dumps),
                  st.text(max_size=40), st.just(""), st.just('{"messages": [{"role": "assistant", "content": "x", '
                                                             '"weight": NaN}]}'))


@FUZZ
@given(st.lists(lines, max_size=12))
def test_validate_on_any_file_answers_with_an_exit_code_and_writes_nothing(content):
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "train.jsonl"
        data.write_text("\n".join(content), encoding="utf-8")
        before = data.read_bytes()
        result = invoke("validate", str(data), "--json")
        assert result.exit_code in (0, 1, 2), result.output
        if result.exit_code == 2:
            assert_one_line_refusal(result)
        else:
            report = json.loads(result.stdout)  # one JSON object, whatever the file held
            assert isinstance(report, dict)
        assert sorted(p.name for p in Path(folder).iterdir()) == ["train.jsonl"] and data.read_bytes() == before


@FUZZ
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                       "content": st.text(min_size=1, max_size=10)},
                                      optional={"weight": weights}), min_size=1, max_size=4))
def test_a_weight_other_than_0_or_1_is_a_format_error(message_list):
    example = {"messages": [{"role": "user", "content": "q"}, *message_list,
                            {"role": "assistant", "content": "a."}]}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "train.jsonl"
        data.write_text(json.dumps(example, allow_nan=True) + "\n", encoding="utf-8")
        result = invoke("validate", str(data), "--json")
        report = json.loads(result.stdout)
        bad = any("weight" in m and not (type(m["weight"]) is int and m["weight"] in (0, 1)) for m in message_list)
        assert ("invalid_weight" in report["errors"]) == bad, (message_list, report["errors"])
