"""pipeline/playground.py: held-out suggestions, trained-cell marking, repetition."""

from __future__ import annotations

from gridtune.pipeline.evaluation import playground as pg
from gridtune.pipeline.spec.grid import GridSpec, cell_key, coerce_values, demo_spec
from gridtune.pipeline.spec.project import create_project


def test_suggestions_are_never_grid_values():
    spec = demo_spec()
    suggestions = pg.suggest_values(spec, n=3)
    for name, values in spec.variables.items():
        assert len(suggestions[name]) == 3
        assert not set(map(str, suggestions[name])) & set(map(str, values)), name


def test_numbers_step_beyond_and_between_the_grid():
    spec = demo_spec()
    years = pg.suggest_values(spec, n=4)["year"]  # grid: 2030 2035 2040 2050
    assert years[:2] == [2055, 2025]
    assert 2045 in years  # the gap inside the range
    assert all(isinstance(y, int) for y in years)
    floats = GridSpec(name="f", generation="{t}", variables={"t": [0.5, 1.0]})
    assert pg.suggest_values(floats, n=2)["t"] == [1.5, 0.0]


def test_text_suggestions_come_from_the_closest_curated_list():
    spec = demo_spec()
    s = pg.suggest_values(spec, n=3)
    assert all(v in pg.CURATED["cities"] for v in s["place"])
    assert all(v in pg.CURATED["fields"] for v in s["parameter_one"])
    odd = GridSpec(name="o", generation="{x}", variables={"x": ["zzz", "qqq"]})
    assert pg.suggest_values(odd, n=2)["x"] == list(pg.GENERIC_TEXT[:2])


def test_classify_trained_grid_and_held_out():
    spec = demo_spec()
    cell = {"place": "Tokyo", "year": 2030, "parameter_one": "energy", "parameter_two": "art"}
    trained = {cell_key(cell)}
    assert pg.classify(spec, cell, trained) == (pg.TRAINED, [])
    # typed text is coerced back to the grid's types before comparing
    typed = coerce_values(spec, {"place": "Tokyo", "year": "2030", "parameter_one": "energy",
                                    "parameter_two": "art"})
    assert pg.classify(spec, typed, trained) == (pg.TRAINED, [])
    other = dict(cell, parameter_two="privacy")
    assert pg.classify(spec, other, trained) == (pg.GRID, [])
    new = dict(cell, place="Paris", year=2045)
    assert pg.classify(spec, new, trained) == (pg.HELD_OUT, ["place", "year"])
    assert pg.classify(spec, dict(cell, place=""), trained)[0] == pg.INCOMPLETE


def test_trained_keys_follow_the_latest_export(tmp_path):
    from gridtune.pipeline.training.export import export_project

    spec = GridSpec(name="t", generation="{a} {b}", variables={"a": ["x", "y"], "b": [1, 2]})
    store = create_project(tmp_path / "p.gridtune", spec)
    try:
        for i, item in enumerate(store.pending_work()):
            store.save_done(item.completion_id, text=f"text {i}", model="m", params={}, prompt_tokens=1,
                            completion_tokens=2, latency_s=0.1, finish_reason="stop", attempts=1)
            store.set_grade(item.completion_id, [5, 1, 0, 4][i])  # one rejected
        assert len(pg.trained_keys(store)) == 3  # no export yet: every kept completion
        export_project(store, tmp_path / "t.jsonl", min_grade=4)
        keys = pg.trained_keys(store)
        assert keys == {cell_key({"a": "x", "b": 1}), cell_key({"a": "y", "b": 2})}
        combos = pg.held_out_combinations(spec, keys, limit=5)
        assert sorted(cell_key(c) for c in combos) == sorted(
            [cell_key({"a": "x", "b": 2}), cell_key({"a": "y", "b": 1})])
    finally:
        store.close()


def test_build_prompt_matches_the_export_formats():
    spec = demo_spec()
    values = {"place": "Paris", "year": 2045, "parameter_one": "law", "parameter_two": "art"}
    chat = pg.build_prompt(spec, values)
    assert chat.messages[0] == {"role": "system", "content": spec.system}  # the demo's, whatever its wording
    assert chat.messages[1]["content"] == "AGI scenario. Place: Paris. Year: 2045. Parameters: law, art."
    legacy = pg.build_prompt(spec, values, "completion", "\n\n###\n\n")
    assert legacy.text.endswith("art.\n\n###\n\n") and legacy.format == "completion"


def test_loops_are_found_and_spans_cover_them():
    text = "Intro. The city grew. The city grew. The city grew. Done."
    rep = pg.find_repetition(text)
    assert rep.found and rep.phrases[0] == ("the city grew", 3)
    (a, b), = rep.spans
    assert text[a:b] == "The city grew. The city grew. The city grew"
    assert "×3" in rep.summary()


def test_a_single_word_loop_and_a_long_copy():
    assert pg.find_repetition("no no no no no no no no").phrases[0] == ("no", 8)
    copy = ("one two three four five six seven eight nine. Later on, "
            "one two three four five six seven eight ten.")
    rep = pg.find_repetition(copy)
    assert rep.found and len(rep.spans) == 2
    assert rep.phrases[0][0] == "one two three four five six seven eight"


def test_healthy_prose_is_not_flagged():
    prose = ("Artificial general intelligence arrived in Lagos in 2040. Artificial general "
             "intelligence changed healthcare first: clinics in Lagos used it for triage, and "
             "healthcare workers in Lagos retrained. By 2045 employment had shifted, and the "
             "city of Lagos was a model for the continent.")
    rep = pg.find_repetition(prose)
    assert not rep.found, rep
    assert rep.summary() == "no repetition"
    assert not pg.find_repetition("").found


def test_ran_out():
    assert pg.ran_out("length") and not pg.ran_out("stop") and not pg.ran_out(None)
