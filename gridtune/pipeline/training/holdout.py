"""A held-out set by construction: whole values and whole combinations kept out of training.

The person names values to hold out (``--hold-out place=Oslo``) and/or a number of
whole combinations (``--hold-out-combos N``). Every cell with a held-out value, and
every held-out combination, is left out of the training and validation files and
becomes an evaluation case, so `gridtune eval` asks the tuned model about inputs it
never saw. The split is stratified: every value of every variable that is not itself
held out keeps at least one training cell, and the combinations are chosen by a
stable hash (the same grid and seed give the same choice on every machine).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import GridtuneError
from ...store import Store, evaluation
from ..spec.grid import GridSpec, Value, cell_key, coerce_values, render_value


class HoldOutError(GridtuneError, ValueError):
    """The held-out choice cannot be made; the message names the problem."""


@dataclass(frozen=True)
class HoldOut:
    """What to hold out: whole values per variable, and a number of combinations."""

    values: dict[str, list[Value]] = field(default_factory=dict)
    combos: int = 0
    seed: int = 0

    @property
    def empty(self) -> bool:
        return not self.combos and not any(self.values.values())

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "combos": self.combos, "seed": self.seed}


@dataclass(frozen=True)
class HoldOutPlan:
    """The cells kept out of training, and why (a held-out value, or a chosen combination)."""

    by_value: frozenset[str]
    combos: tuple[str, ...]
    choice: HoldOut

    @property
    def keys(self) -> frozenset[str]:
        return self.by_value | frozenset(self.combos)

    def to_dict(self) -> dict[str, Any]:
        """What the export records: enough to say what was held out and to redo it."""
        return {**self.choice.to_dict(), "combo_keys": list(self.combos), "cells": len(self.keys)}


def parse_hold_out(spec: GridSpec, items: Iterable[str], combos: int = 0, seed: int = 0) -> HoldOut:
    """``["place=Oslo", "year=2040"]`` as a HoldOut; a one-line HoldOutError names a
    bad item (no '=', an unknown variable, a value not in the grid, every value of a
    variable held out, a negative count)."""
    if combos < 0:
        raise HoldOutError(f"--hold-out-combos must be 0 or more, not {combos}")
    values: dict[str, list[Value]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise HoldOutError(f"--hold-out wants VAR=VALUE, not {item!r}")
        if name not in spec.variables:
            raise HoldOutError(f"--hold-out {item!r}: no variable {name!r} "
                               f"(variables: {', '.join(spec.variables)})")
        value = coerce_values(spec, {name: raw})[name]
        grid_values = spec.variables[name]
        if value not in grid_values:
            shown = ", ".join(render_value(v) for v in grid_values)
            raise HoldOutError(f"--hold-out {item!r}: {raw!r} is not a value of {name} ({shown})")
        if value not in values.setdefault(name, []):
            values[name].append(value)
    for name, held in values.items():
        if len(held) >= len(spec.variables[name]):
            raise HoldOutError(f"--hold-out holds out every value of {name}: nothing of it would be left to train on")
    return HoldOut(values, combos, seed)


def _rank(key: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def plan(cells: Sequence[dict[str, Any]], choice: HoldOut) -> HoldOutPlan:
    """Which of ``cells`` (their values) are held out under ``choice``.

    Combinations are taken in a stable hashed order, skipping any whose removal
    would leave some value of some variable with no training cell.
    """
    held_values = {name: {render_value(v) for v in vs} for name, vs in choice.values.items()}
    by_value: set[str] = set()
    remaining: list[tuple[str, dict[str, Any]]] = []
    for values in cells:
        key = cell_key(values)
        if any(name in values and render_value(values[name]) in vs for name, vs in held_values.items()):
            by_value.add(key)
        else:
            remaining.append((key, values))
    # How many training cells each (variable, value) still has.
    support: dict[tuple[str, str], int] = {}
    for _key, values in remaining:
        for name, value in values.items():
            support[(name, render_value(value))] = support.get((name, render_value(value)), 0) + 1
    chosen: list[str] = []
    if choice.combos:
        for key, values in sorted(remaining, key=lambda kv: _rank(kv[0], choice.seed)):
            if len(chosen) == choice.combos:
                break
            needs = [(name, render_value(value)) for name, value in values.items()]
            if all(support[n] > 1 for n in needs):
                chosen.append(key)
                for n in needs:
                    support[n] -= 1
        if len(chosen) < choice.combos:
            raise HoldOutError(
                f"--hold-out-combos {choice.combos}: only {len(chosen)} combination(s) can be held out while every "
                f"value keeps a training cell")
    return HoldOutPlan(frozenset(by_value), tuple(chosen), choice)


def add_held_out_cases(store: Store, held: HoldOutPlan, cells: Sequence[dict[str, Any]]) -> int:
    """The held-out cells become evaluation cases (the export calls this after
    recording itself); cases already there stay as they are."""
    return evaluation.add_cases(store, [(cell_key(v), v, "held-out", None) for v in cells if cell_key(v) in held.keys])
