"""The grid spec: parsing, every named error, rendering and expansion."""

from __future__ import annotations

import pytest

from gridtune.pipeline.spec.grid import (
    GridError,
    cell_key,
    demo_spec,
    parse_spec,
    placeholders,
    render,
)

GOOD = """
name = "agi"
[prompt]
system = "You are a careful futurist."
generation = "Scenario in {place} in {year} about {p1}."
training = "AGI. Place: {place}. Year: {year}. P: {p1}."
[variables]
place = ["Tokyo", "Lagos"]
year = [2030, 2035, 2040]
p1 = ["health"]
[generation]
model = "gpt-4o-mini"
temperature = 1.0
max_tokens = 300
samples = 2
"""


def test_parse_good_spec_expands_the_cartesian_product():
    spec = parse_spec(GOOD)
    assert spec.cell_count == 6
    cells = list(spec.cells())
    assert len(cells) == 6 and len({cell_key(c) for c in cells}) == 6
    assert cells[0] == {"place": "Tokyo", "year": 2030, "p1": "health"}
    assert spec.settings.samples == 2 and spec.settings.max_tokens == 300
    r = spec.render(cells[-1])
    assert r.generation == "Scenario in Lagos in 2040 about health."
    assert r.training == "AGI. Place: Lagos. Year: 2040. P: health."
    assert r.generation_messages()[0] == {"role": "system", "content": "You are a careful futurist."}


def test_training_defaults_to_generation():
    spec = parse_spec(GOOD.replace('training = "AGI. Place: {place}. Year: {year}. P: {p1}."\n', ""))
    values = next(spec.cells())
    assert spec.render(values).training == spec.render(values).generation


@pytest.mark.parametrize(
    "edit, message",
    [
        (("{p1}.\"", "{p1} {nope}.\""), "placeholder {nope} has no variable"),
        (('p1 = ["health"]', 'p1 = ["health"]\nextra = ["x"]'), "variable 'extra' is used by no template"),
        (('p1 = ["health"]', "p1 = []"), "variable 'p1' has an empty value list"),
        (('year = [2030, 2035, 2040]', 'year = [2030, 2035, 2030]'), "variable 'year': duplicate value 2030"),
        (('year = [2030, 2035, 2040]', 'year = [2030, "2030"]'), "variable 'year': duplicate value '2030'"),
        (("about {p1}.", "about {p1}}."), "unbalanced braces"),
        (("about {p1}.", "about {p1."), "unbalanced braces"),
        (("about {p1}.", "about {}."), "empty placeholder"),
        (("about {p1}.", "about {p1!r}."), "may not have a format"),
        (("about {p1}.", "about {p1.x}."), "is not a variable name"),
        (('year = [2030, 2035, 2040]', 'year = [true]'), "must be a string or a number"),
        (("samples = 2", "samples = 0"), "samples must be at least 1"),
        (("[generation]", "[generation]\nbogus = 1"), "unknown key(s) in [generation]: bogus"),
        (("samples = 2", "samples = 1.5"), "[generation] samples must be a whole number, not 1.5"),
        (("samples = 2", "samples = true"), "[generation] samples must be a whole number, not True"),
        (("temperature = 1.0", "temperature = 'hot'"), "[generation] temperature must be a number, not 'hot'"),
        (('model = "gpt-4o-mini"', "model = 5"), "[generation] model must be a model name (a string), not 5"),
        (("[generation]", "[generation]\ntop_p = 5"), "[generation] top_p must be within 0..1, not 5.0"),
    ],
)
def test_each_spec_error_names_its_culprit(edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(GridError) as err:
        parse_spec(GOOD.replace(old, new, 1))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_grid_over_the_limit_says_so():
    values = ", ".join(str(i) for i in range(400))
    text = f"""
[prompt]
generation = "{{a}} {{b}}"
[variables]
a = [{values}]
b = [{values}]
"""
    with pytest.raises(GridError, match=r"160,000 cells, over the limit of 100,000"):
        parse_spec(text)
    assert parse_spec("max_cells = 200000\n" + text).cell_count == 160_000


def test_grid_size_counts_samples_and_max_cells_has_a_ceiling():
    from gridtune.pipeline.spec.grid import MAX_COMPLETIONS

    text = '[prompt]\ngeneration = "{a}"\n[variables]\na = [1, 2, 3, 4]\n[generation]\nsamples = %d\n'
    assert parse_spec(text % 25_000).settings.samples == 25_000  # 100,000 completions: at the limit
    with pytest.raises(GridError, match=r"4 cells x 25,001 samples = 100,004 completions, over the limit of 100,000"):
        parse_spec(text % 25_001)
    with pytest.raises(GridError, match=r"4,000,000,000 completions, over the limit of 100,000"):
        parse_spec(text % 1_000_000_000)
    assert parse_spec(f"max_cells = {MAX_COMPLETIONS}\n" + text % 250_000).settings.samples == 250_000
    with pytest.raises(GridError, match=r"max_cells 1,000,001 is over the hard limit of 1,000,000"):
        parse_spec(f"max_cells = {MAX_COMPLETIONS + 1}\n" + text % 1)
    # A stored spec cannot lift itself past the ceiling either.
    spec = parse_spec(text % 1)
    spec.max_cells, spec.settings.samples = 10**12, 250_001
    with pytest.raises(GridError, match=r"over the limit of 1,000,000 \(this is the hard ceiling"):
        spec.check()


def test_not_toml_is_a_clear_error():
    with pytest.raises(GridError, match="not valid TOML"):
        parse_spec("name = [", "bad.toml")


def test_awkward_values_survive_rendering_and_json():
    spec = parse_spec(
        '[prompt]\ngeneration = "x={v} {{literal}}"\n[variables]\n'
        'v = ["Zürich", "say \\"hi\\"", "{braces}", "two\\nlines", 3.5, -7]\n'
    )
    rendered = [spec.render(c).generation for c in spec.cells()]
    assert rendered == [
        "x=Zürich {literal}", 'x=say "hi" {literal}', "x={braces} {literal}",
        "x=two\nlines {literal}", "x=3.5 {literal}", "x=-7 {literal}",
    ]
    again = type(spec).from_json(spec.to_json())
    assert again == spec


def test_placeholders_in_order_and_render_literal_braces():
    assert placeholders("{a} and {{b}} and {c}") == ["a", "c"]
    assert render("{{{a}}}", {"a": 1}) == "{1}"


def test_demo_spec_is_the_recipes_grid():
    spec = demo_spec()
    spec.check()
    assert spec.cell_count == 256
    assert list(spec.variables) == ["place", "year", "parameter_one", "parameter_two"]


def test_example_spec_is_the_demo_grid():
    from pathlib import Path

    from gridtune.pipeline.spec.grid import load_spec

    example = load_spec(Path(__file__).parent.parent / "examples" / "agi.toml")
    assert example == demo_spec()
