"""From the playground back into the data: promote a good answer, watch a bad one.

``promote_answer`` adds a model's answer to the training data with its values: a
finished completion marked as written by that model (its ``model`` field) and
graded by the person (default 5). Where the values are a cell of the project, the
answer is one more sample of that cell; where they are not (new values, the
playground's point), it goes on a new *person cell*.

Why a person cell survives grid edits: a grid edit (``apply_spec`` →
``Store.sync_grid``) deactivates every cell whose values left the spec, which
hides its completions from the review, the export and every count. A person
cell's values were never in the spec, so the next edit would hide it. The store
therefore keeps active every cell that holds an answer a person added (the
completion's params carry ``added_by: person``), numbers such cells after the
grid's (``store.project.PERSON_ORDINAL``) and never fills them with teacher work.
The same holds for a promoted answer on a grid cell whose values a later edit
drops: the cell stays, as a person cell, with its other completions (the review
can drop those). If a person cell's values enter the grid later, it simply
becomes that grid cell.

``watch_answer`` adds the values to the evaluation set instead (source "person",
with a note), so ``gridtune eval`` asks them of every model it compares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...core.errors import GridtuneError
from ...store import Store, evaluation
from ..spec.grid import GridSpec, cell_key, render_value
from ..spec.options import EVALUATION
from ..training.holdout import HoldOutError
from .evaluate import parse_case

DEFAULT_GRADE = 5
CUT_OFF_REASON = "length"  # store.records.CUT_OFF_REASON


class PromoteError(GridtuneError, ValueError):
    """Bad input for a promotion (exit 2); nothing was written."""


@dataclass(frozen=True)
class Promoted:
    completion_id: int
    values: dict[str, Any]
    model: str | None
    grade: int
    where: str  # "grid" | "person" | "new" | "revived" (Store.add_person_completion)
    cut_off: bool

    def summary(self) -> str:
        shown = " ".join(f"{k}={render_value(v)}" for k, v in self.values.items())
        place = {"grid": "on its grid cell", "person": "on the person cell with these values",
                 "new": "on a new cell (kept through grid edits)",
                 "revived": "on its cell, which had left the grid and is back (with its earlier completions)"
                 }[self.where]
        line = (f"added completion #{self.completion_id} ({shown}) {place}, "
                f"written by {self.model or 'an unnamed model'}, graded {self.grade}")
        if self.cut_off:
            line += "; it was cut off at max tokens, so exports leave it out unless --include-cut-off"
        return line


def parse_values(spec: GridSpec, text: str) -> dict[str, Any]:
    """'place=Bergen year=2045' as a full set of values (new values welcome); a
    one-line PromoteError names what is wrong."""
    try:
        return parse_case(spec, text)
    except HoldOutError as exc:
        raise PromoteError(str(exc).replace("--case", "--values")) from None


def _check_values(spec: GridSpec, values: dict[str, Any]) -> dict[str, Any]:
    missing = [n for n in spec.variables if render_value(values.get(n, "")).strip() == ""]
    if missing:
        raise PromoteError(f"give a value for {', '.join(missing)}")
    unknown = [n for n in values if n not in spec.variables]
    if unknown:
        raise PromoteError(f"no variable {', '.join(unknown)} (variables: {', '.join(spec.variables)})")
    return {n: values[n] for n in spec.variables}


def promote_answer(store: Store, spec: GridSpec, values: dict[str, Any], text: str, *, model: str | None,
                   grade: int = DEFAULT_GRADE, finish_reason: str | None = None,
                   params: dict[str, Any] | None = None, source: str = "playground") -> Promoted:
    """Add ``text`` to the training data as a completion for ``values`` (see the
    module's doc); ``params`` (temperature, max tokens, stop...) are recorded with
    it, with ``source``. Nothing is written when the input is bad."""
    values = _check_values(spec, values)
    text = text.strip()  # a legacy-format answer's leading space is the format's, not the answer's
    if not text:
        raise PromoteError("the answer is empty: nothing to add")
    EVALUATION["grade"].check(grade, "grade", PromoteError)
    # The grid's own typed value where the text matches one (2040, not "2040").
    for name, grid_values in spec.variables.items():
        match = next((v for v in grid_values if render_value(v) == render_value(values[name])), None)
        if match is not None:
            values[name] = match
    completion_id, where = store.add_person_completion(
        cell_key(values), json.dumps(values, ensure_ascii=False), text=text, model=model, grade=grade,
        params={**(params or {}), "source": source}, finish_reason=finish_reason)
    return Promoted(completion_id, values, model, grade, where, finish_reason == CUT_OFF_REASON)


def watch_answer(store: Store, spec: GridSpec, values: dict[str, Any], note: str | None = None) -> bool:
    """Add ``values`` to the evaluation set as a case to watch (source "person");
    False when that case was already there (it is kept as it was)."""
    values = _check_values(spec, values)
    return evaluation.add_cases(store, [(cell_key(values), values, "person", note)]) > 0
