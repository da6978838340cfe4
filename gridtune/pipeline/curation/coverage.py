"""Coverage: how many kept examples each variable value, and each pair of values,
has after grading and dropping; and the top-up that fills the thin ones.

**Kept**, defined here once for curation (the store's ``kept_by_cell`` is its
query, and the export keeps the same rows): a finished completion of a cell still
in the grid, with non-blank text, not rejected (grade 0, by a person or a dedup
drop), not cut off at max tokens (finish_reason "length"), and, when a minimum
grade is given (the export's ``--min-grade``), graded at least that; without one,
an ungraded completion is kept, as the export keeps it.

A value (``place = Oslo``) counts the kept examples of every cell with that value;
a pair (``place = Oslo, year = 2030``) those of every cell with both. A value or
pair with fewer than ``threshold`` kept examples is *thin*, with none *empty*.

**Top-up** (``plan_top_up``, run by ``gridtune generate PROJECT --top-up N``): new
samples (new completion rows with the next sample numbers, hence new seeds) for
exactly the cells needed so that every value and every pair reaches N. What a
value or pair already has counts kept examples *and* completions not generated yet
(pending, running, failed), so planning again after an interrupted top-up adds
nothing: the run resumes the samples it had added. The selection is greedy and
deterministic: each new sample goes to the cell that fills the most of what is
still missing (one unit per thin value and thin pair it contains), ties to the
first cell in grid order, until nothing is missing. Greedy is not always the
smallest possible set (that is set multicover, NP-hard), but it never adds a
sample that fills nothing, and a cell is only chosen for a value or pair it holds.
A new sample is kept only once it is generated (and, with a minimum grade, graded
high enough): a top-up with ``min_grade`` counts on the new samples passing it.
"""

from __future__ import annotations

import heapq
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from ...store import Store
from ..spec.grid import GridSpec
from ..spec.options import EXPORT
from ..spec.project import load_project_spec

DEFAULT_THIN = 2  # fewer kept examples than this is thin: one example of a value teaches it nothing reliable


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class CoverageRow:
    """One value (one variable) or one pair of values (two variables)."""

    variables: tuple[str, ...]
    values: tuple[Any, ...]
    kept: int
    cells: int  # cells of the grid with this value or pair

    @property
    def label(self) -> str:
        return ", ".join(f"{n}={v}" for n, v in zip(self.variables, self.values, strict=True))

    def state(self, threshold: int) -> str:
        """'empty', 'thin' or 'ok'."""
        return "empty" if self.kept == 0 else "thin" if self.kept < threshold else "ok"

    def to_dict(self, threshold: int) -> dict[str, Any]:
        return {"variables": list(self.variables), "values": list(self.values), "kept": self.kept,
                "cells": self.cells, "state": self.state(threshold)}


@dataclass
class Coverage:
    min_grade: int | None
    threshold: int
    kept: int  # kept examples in all
    cells: int
    values: list[CoverageRow] = field(default_factory=list)
    pairs: list[CoverageRow] = field(default_factory=list)

    def thin(self) -> list[CoverageRow]:
        """Values and pairs under the threshold (empty ones included), values first."""
        return [r for r in self.values + self.pairs if r.kept < self.threshold]

    def empty(self) -> list[CoverageRow]:
        return [r for r in self.values + self.pairs if r.kept == 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_grade": self.min_grade, "threshold": self.threshold, "kept": self.kept, "cells": self.cells,
            "values": [r.to_dict(self.threshold) for r in self.values],
            "pairs": [r.to_dict(self.threshold) for r in self.pairs],
            "thin": sum(1 for r in self.thin() if r.kept), "empty": len(self.empty()),
        }

    def summary(self) -> str:
        thin, empty = sum(1 for r in self.thin() if r.kept), len(self.empty())
        grade = f" graded {self.min_grade}+" if self.min_grade else ""
        head = (f"{self.kept:,} kept example(s){grade} over {self.cells:,} cells; "
                f"{len(self.values)} values, {len(self.pairs)} pairs: ")
        if not thin and not empty:
            return head + f"none under {self.threshold}"
        return head + f"{empty} empty, {thin} thin (under {self.threshold})"

    def render_text(self, width: int = 80) -> str:
        """The tables for a terminal: each variable's values on a line or two, then a
        matrix per pair of variables. ``!`` marks a thin count, ``-`` an empty one."""
        def mark(n: int) -> str:
            return "-" if n == 0 else f"{n}!" if n < self.threshold else str(n)

        out = [self.summary(), "", "values (count, ! thin, - empty):"]
        by_var: dict[str, list[CoverageRow]] = {}
        for r in self.values:
            by_var.setdefault(r.variables[0], []).append(r)
        for name, rows in by_var.items():
            line = f"  {name}:"
            for r in rows:
                piece = f" {_short(r.values[0], 14)} {mark(r.kept)}"
                if len(line) + len(piece) > width:
                    out.append(line)
                    line = " " * (len(name) + 3)
                line += piece
            out.append(line)
        pairs: dict[tuple[str, ...], list[CoverageRow]] = {}
        for r in self.pairs:
            pairs.setdefault(r.variables, []).append(r)
        for (a, b), rows in pairs.items():
            cols = list(dict.fromkeys(_key(r.values[1]) for r in rows))
            col_names = {_key(r.values[1]): _short(r.values[1], 8) for r in rows}
            grid = {(_key(r.values[0]), _key(r.values[1])): r for r in rows}
            row_keys = list(dict.fromkeys(_key(r.values[0]) for r in rows))
            row_names = {_key(r.values[0]): _short(r.values[0], 12) for r in rows}
            out += ["", f"{a} x {b}:"]
            out.append(" " * 13 + "".join(f"{col_names[c]:>9}" for c in cols))
            for rk in row_keys:
                out.append(f"{row_names[rk]:>12} " + "".join(f"{mark(grid[(rk, c)].kept):>9}" for c in cols))
        return "\n".join(out)


def _short(value: Any, n: int) -> str:
    text = str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _units(spec: GridSpec, values: dict[str, Any]) -> list[tuple[str, ...]]:
    """The value and pair units a cell belongs to, as keys."""
    names = list(spec.variables)
    units: list[tuple[str, ...]] = [(n, _key(values.get(n))) for n in names]
    for a, b in itertools.combinations(names, 2):
        units.append((a, b, _key(values.get(a)), _key(values.get(b))))
    return units


def _all_units(spec: GridSpec) -> dict[tuple[str, ...], tuple[tuple[str, ...], tuple[Any, ...]]]:
    """Every value and pair of the spec, in spec order: key -> (variables, values)."""
    out: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[Any, ...]]] = {}
    for n, vals in spec.variables.items():
        for v in vals:
            out[(n, _key(v))] = ((n,), (v,))
    for a, b in itertools.combinations(list(spec.variables), 2):
        for va in spec.variables[a]:
            for vb in spec.variables[b]:
                out[(a, b, _key(va), _key(vb))] = ((a, b), (va, vb))
    return out


def coverage(store: Store, *, min_grade: int | None = None, threshold: int = DEFAULT_THIN) -> Coverage:
    """The coverage table of the project (see the module's doc for "kept")."""
    if threshold < 1:
        raise ValueError(f"the thin threshold must be at least 1, not {threshold}")
    if min_grade is not None:
        EXPORT["min_grade"].check(min_grade, "--min-grade")  # an OptionError is a ValueError
    spec = load_project_spec(store)
    kept = store.kept_by_cell(min_grade)
    units = _all_units(spec)
    counts = dict.fromkeys(units, 0)
    n_cells = dict.fromkeys(units, 0)
    cells = store.cells()
    for cell_id, values in cells:
        k = kept.get(cell_id, 0)
        for u in _units(spec, values):
            if u in counts:
                counts[u] += k
                n_cells[u] += 1
    rows = [CoverageRow(variables, values, counts[u], n_cells[u]) for u, (variables, values) in units.items()]
    return Coverage(min_grade=min_grade, threshold=threshold, kept=sum(kept.values()), cells=len(cells),
                    values=[r for r in rows if len(r.variables) == 1],
                    pairs=[r for r in rows if len(r.variables) == 2])


@dataclass
class TopUpPlan:
    """New samples per cell (cell id -> count) so every value and pair reaches ``target``."""

    target: int
    min_grade: int | None
    samples: dict[int, int]
    missing: int  # value and pair units short of the target before the top-up (kept + planned)
    cell_values: dict[int, dict[str, Any]] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)  # values/pairs no cell of the grid holds

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "min_grade": self.min_grade, "new_samples": self.total,
                "cells": len(self.samples), "missing": self.missing, "unreachable": list(self.unreachable),
                "samples": [{"cell_id": cid, "values": self.cell_values.get(cid), "new": n}
                            for cid, n in sorted(self.samples.items())]}

    def summary(self) -> str:
        if not self.total:
            return f"top-up to {self.target}: every value and pair already has {self.target} kept or planned"
        return (f"top-up to {self.target}: {self.total:,} new sample(s) in {len(self.samples):,} cell(s) "
                f"for {self.missing:,} thin value(s) and pair(s)")


def plan_top_up(store: Store, target: int, *, min_grade: int | None = None) -> TopUpPlan:
    """The minimal-by-greedy, deterministic set of new samples (see the module's doc)."""
    if target < 1:
        raise ValueError(f"--top-up must be at least 1, not {target}")
    spec = load_project_spec(store)
    kept = store.kept_by_cell(min_grade)
    unfinished = store.unfinished_by_cell()
    cells = store.cells()  # grid order
    cell_units = [_units(spec, values) for _cid, values in cells]
    have: dict[tuple[str, ...], int] = dict.fromkeys(_all_units(spec), 0)
    holders: dict[tuple[str, ...], int] = dict.fromkeys(have, 0)
    for (cell_id, _values), units in zip(cells, cell_units, strict=True):
        k = kept.get(cell_id, 0) + unfinished.get(cell_id, 0)
        for u in units:
            if u in have:
                have[u] += k
                holders[u] += 1
    deficit = {u: target - n for u, n in have.items() if n < target and holders[u]}
    unreachable = [",".join(u) for u, n in have.items() if n < target and not holders[u]]
    missing = len(deficit)

    def score(i: int) -> int:
        return sum(1 for u in cell_units[i] if deficit.get(u, 0) > 0)

    heap = [(-s, i) for i in range(len(cells)) if (s := score(i)) > 0]
    heapq.heapify(heap)
    chosen: dict[int, int] = {}
    while heap:
        neg, i = heapq.heappop(heap)
        s = score(i)
        if s == 0:
            continue
        if s != -neg:  # stale: scores only fall, so push it back with its true score
            heapq.heappush(heap, (-s, i))
            continue
        cell_id = cells[i][0]
        chosen[cell_id] = chosen.get(cell_id, 0) + 1
        for u in cell_units[i]:
            if deficit.get(u, 0) > 0:
                deficit[u] -= 1
        if (s := score(i)) > 0:
            heapq.heappush(heap, (-s, i))
    values = {cid: v for cid, v in cells if cid in chosen}
    return TopUpPlan(target=target, min_grade=min_grade, samples=chosen, missing=missing, cell_values=values,
                     unreachable=unreachable)


def apply_top_up(store: Store, plan: TopUpPlan) -> list[int]:
    """Add the plan's new samples as pending completions; returns their ids."""
    return store.add_samples(plan.samples) if plan.samples else []
