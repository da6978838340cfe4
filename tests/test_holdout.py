"""The held-out choice: whole values and stratified combinations, checked by hand."""

from __future__ import annotations

import itertools

import pytest

from gridtune.pipeline.grid import GenerationSettings, GridSpec, cell_key
from gridtune.pipeline.holdout import HoldOut, HoldOutError, parse_hold_out, plan

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
