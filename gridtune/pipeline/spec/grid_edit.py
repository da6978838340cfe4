"""Editing a grid spec piece by piece, as the grid screen does: no UI here.

The grid screen keeps the templates and each variable's values as text; these
functions turn that text back into a checked GridSpec, count its cells and pick
one cell by index for the preview (without expanding the whole grid).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ...store import Store
from .grid import GridError, GridSpec, Value, render_value

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?")


def values_text(values: Sequence[Value]) -> str:
    """A variable's values as the editor shows them: one per line."""
    return "\n".join(render_value(v) for v in values)


def parse_values(text: str, previous: Sequence[Value] = ()) -> list[Value]:
    """One value per line (blank lines ignored, spaces around a value trimmed).

    A line that reads like an old value keeps that value's type, so a cell keeps
    its identity (``2030`` stays the number 2030); a new line that is a whole
    number becomes a number when the old values were numbers, else it stays text.
    """
    known = {render_value(v): v for v in previous}
    numeric = bool(previous) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in previous)
    out: list[Value] = []
    for line in text.splitlines():
        item = line.strip()
        if not item:
            continue
        if item in known:
            out.append(known[item])
        elif numeric and _INT.fullmatch(item):
            out.append(int(item))
        elif numeric and _FLOAT.fullmatch(item):
            out.append(float(item))
        else:
            out.append(item)
    return out


def build_spec(
    base: GridSpec,
    *,
    generation: str,
    training: str,
    system: str,
    variables: dict[str, list[Value]],
) -> GridSpec:
    """The spec with edited templates and variables, checked (GridError names the culprit).

    An empty training template means "same as generation"; an empty system prompt, none.
    Generation settings (model, temperature, ...) are kept from ``base``.
    """
    spec = replace(
        base,
        generation=generation,
        training=training if training.strip() else None,
        system=system if system.strip() else None,
        variables={k: list(v) for k, v in variables.items()},
    )
    spec.check()
    return spec


def count_text(variables: dict[str, Sequence[Value]]) -> str:
    """``4 × 4 × 4 × 4 = 256 cells`` (the sizes in variable order)."""
    sizes = [len(v) for v in variables.values()]
    total = math.prod(sizes) if sizes else 1
    noun = "cell" if total == 1 else "cells"
    if len(sizes) <= 1:
        return f"{total:,} {noun}"
    return f"{' × '.join(str(n) for n in sizes)} = {total:,} {noun}"


def cell_at(variables: dict[str, Sequence[Value]], index: int) -> dict[str, Value]:
    """The ``index``-th cell of the grid in expansion order (itertools.product order)."""
    names = list(variables)
    total = math.prod(len(variables[n]) for n in names) if names else 1
    if total == 0:
        raise GridError("the grid is empty: a variable has no values")
    index %= total
    out: dict[str, Value] = {}
    for name in reversed(names):
        values = variables[name]
        index, pos = divmod(index, len(values))
        out[name] = values[pos]
    return {n: out[n] for n in names}


def new_variable_name(name: str, existing: Sequence[str]) -> str:
    """Check a new variable's name; returns it stripped, or raises GridError."""
    name = name.strip()
    if not name.isidentifier():
        raise GridError(f"variable {name!r}: name must be an identifier (letters, digits, _)")
    if name in existing:
        raise GridError(f"variable {name!r} already exists")
    return name


def save_generation_defaults(store: Store, **values: Any) -> bool:
    """Save ``values`` (model, temperature, max_tokens, samples, top_p; None: leave
    as it is; model "": the backend's default) as the grid's defaults, the spec's [generation]; True if it changed.

    A run's own settings are passed per run and recorded on the run; only this
    (``generate --save-defaults``, ctrl+s in the generate screen's options) makes
    them what later runs start from. Raises GridError for a value out of bounds;
    a new ``samples`` adds or removes completions as any edit of the grid does.
    """
    from .project import apply_spec, load_project_spec

    spec = load_project_spec(store)
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("model") == "":
        given["model"] = None  # an empty model: the backend's default again
    settings = replace(spec.settings, **given)
    if settings == spec.settings:
        return False
    apply_spec(store, replace(spec, settings=settings))
    return True
