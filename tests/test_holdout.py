"""The held-out choice: whole values and stratified combinations, checked by hand."""

from __future__ import annotations

import itertools

import pytest

from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec, cell_key
from gridtune.pipeline.training.holdout import HoldOut, HoldOutError, parse_hold_out, plan

SPEC = GridSpec(name="t", system="", generation="{place} {year} {tone}", training="{place} {year} {tone}",
                variables={"place": ["Oslo", "Lima", "Tokyo"], "year": [2030, 2040], "tone": ["calm", "loud"]},
                settings=GenerationSettings(model="m"))
CELLS = [dict(zip(SPEC.variables, combo)) for combo in itertools.product(*SPEC.variables.values())]


def test_parse_names_what_is_wrong():
    assert parse_hold_out(SPEC, ["place=Oslo", "year=2040"]).values == {"place": ["Oslo"], "year": [2040]}
    for bad, said in ((["place"], "VAR=VALUE"), (["town=Oslo"], "no variable 'town'"),
                      (["place=Paris"], "not a value of place"), (["year=2030", "year=2040"], "every value of year")):
        with pytest.raises(HoldOutError, match=said):
            parse_hold_out(SPEC, bad)
    with pytest.raises(HoldOutError, match="0 or more"):
        parse_hold_out(SPEC, [], combos=-1)


def test_a_held_out_value_takes_every_cell_with_it():
    p = plan(CELLS, parse_hold_out(SPEC, ["place=Oslo"]))
    assert p.keys == {cell_key(c) for c in CELLS if c["place"] == "Oslo"} and len(p.keys) == 4


def test_combinations_leave_every_value_a_training_cell():
    p = plan(CELLS, HoldOut(combos=5))
    assert len(p.combos) == 5 and p.by_value == frozenset()
    train = [c for c in CELLS if cell_key(c) not in p.keys]
    for name, values in SPEC.variables.items():
        assert {c[name] for c in train} == set(values)  # stratified: nothing lost from training
    assert plan(CELLS, HoldOut(combos=5)).combos == p.combos  # the same choice every time
    assert plan(CELLS, HoldOut(combos=5, seed=1)).combos != p.combos


def test_too_many_combinations_is_refused():
    with pytest.raises(HoldOutError, match="only"):
        plan(CELLS, HoldOut(combos=len(CELLS)))


def test_a_held_out_value_never_reaches_the_training_file(tmp_path):
    import json
    import subprocess
    import sys

    from gridtune.store import Store, evaluation as evs
    from tests.bigproject import small_project

    path = small_project(tmp_path / "p.gridtune", done=16)
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "-m", "gridtune", "export", str(path), "-o", str(out),
                           "--validation-fraction", "0.3", "--hold-out", "place=Oslo", "--hold-out", "year=2050",
                           "--hold-out-combos", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr  # 1: the small file's validation warnings are errors
    result = json.loads(proc.stdout)
    held = result["held_out"]
    # Oslo (4 cells) + 2050 (4 cells, one of them Oslo's) = 7, plus 2 combinations.
    assert held["cells"] == 9 and len(held["combo_keys"]) == 2 and held["completions"] == 9
    files = [out, tmp_path / "train.valid.jsonl"]
    written = "".join(f.read_text() for f in files if f.exists())
    assert "Oslo" not in written and "2050" not in written
    for key in held["combo_keys"]:
        values = json.loads(key)
        assert f"Place: {values['place']}. Year: {values['year']}" not in written
    assert result["train"] + result["valid"] == 16 - 9
    with Store.open(path) as store:
        cases = evs.cases(store)
        assert len(cases) == 9 and {c.source for c in cases} == {"held-out"}
        assert evs.holdout_of(store, result["export_id"])["values"] == {"place": ["Oslo"], "year": [2050]}


def test_a_bad_hold_out_is_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from tests.bigproject import small_project

    path = small_project(tmp_path / "p.gridtune", done=16)
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "-m", "gridtune", "export", str(path), "-o", str(out),
                           "--hold-out", "place=Paris"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a value of place" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_finetune_on_a_project_repeats_the_latest_exports_hold_out(tmp_path):
    from gridtune.pipeline.training.export import export_project
    from gridtune.pipeline.training.finetune import export_for_finetune
    from gridtune.store import Store
    from tests.bigproject import small_project

    path = small_project(tmp_path / "p.gridtune", done=16)
    with Store.open(path) as store:
        export_project(store, tmp_path / "first.jsonl", format="completion",
                       hold_out=HoldOut(values={"place": ["Oslo"]}, combos=1))
        train, _valid, export_id = export_for_finetune(store)
        latest = store.latest_export()
    text = train.read_text()
    assert latest.id == export_id and latest.format == "completion"
    assert "Oslo" not in text and len(text.splitlines()) == 16 - 4 - 1
