"""Helpers for trying a fine-tuned model: held-out values, "was this in the
training data", and repetition detection. No UI here; the playground screen and
tests call these.

* ``suggest_values`` proposes, for each variable, values that are NOT in the grid:
  numbers adjacent to the grid's range (and between its steps), and for text
  values, members of a small curated list (cities, countries, fields, ...) that
  shares the most values with the grid.
* ``trained_keys`` is the set of cells (``cell_key``) whose completions go into a
  training file: those the latest export kept (or, with no export yet, every kept
  finished completion).
* ``classify`` says whether a set of values is a trained cell, an untrained
  combination of grid values, or has values the grid never saw.
* ``find_repetition`` finds repeated word n-grams: the usual sign of a small or
  over-trained model looping.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...store import Store
from ..client.ask import Piece, stream_pieces
from ..client.backend import Backend
from ..spec.grid import GridSpec, Value, cell_key, is_number, render_value

# -- held-out values ----------------------------------------------------------

CURATED: dict[str, tuple[str, ...]] = {
    "cities": (
        "Tokyo", "Lagos", "Oslo", "Lima", "Paris", "Nairobi", "Toronto", "Mumbai", "Seoul",
        "Berlin", "Cairo", "Sydney", "Mexico City", "Jakarta", "Istanbul", "Buenos Aires",
        "London", "New York", "Shanghai", "Sao Paulo", "Madrid", "Reykjavik", "Hanoi",
        "Accra", "Santiago", "Helsinki", "Dubai", "Singapore", "Kyiv", "Montreal",
    ),
    "countries": (
        "Japan", "Nigeria", "Norway", "Peru", "France", "Kenya", "Canada", "India", "Korea",
        "Germany", "Egypt", "Australia", "Mexico", "Indonesia", "Turkey", "Argentina",
        "Brazil", "Chile", "Finland", "Vietnam", "Ghana", "Spain", "Iceland", "Italy",
    ),
    "fields": (
        "healthcare", "education", "energy", "finance", "agriculture", "transport",
        "manufacturing", "law", "journalism", "science", "defense", "housing", "tourism",
        "logistics", "retail", "climate", "governance", "entertainment",
    ),
    "impacts": (
        "employment", "privacy", "art", "warfare", "inequality", "democracy", "religion",
        "family life", "mental health", "migration", "crime", "sport", "language",
        "childhood", "friendship", "trust",
    ),
    "colors": ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"),
    "animals": ("cat", "dog", "horse", "eagle", "whale", "fox", "owl", "bear", "wolf", "tiger", "rabbit"),
    "seasons": ("spring", "summer", "autumn", "winter"),
    "tones": ("formal", "casual", "humorous", "serious", "optimistic", "pessimistic", "poetic", "technical"),
}
GENERIC_TEXT = ("something else", "a new case", "another example")


def _number_suggestions(values: list[int | float], n: int) -> list[Value]:
    nums = sorted(set(values))
    is_int = all(isinstance(v, int) for v in nums)
    if len(nums) > 1:
        steps = [b - a for a, b in zip(nums, nums[1:], strict=False)]
        step = min(steps)
    else:
        step = 1 if is_int or nums[0] == 0 else abs(nums[0]) / 10
    lo, hi = nums[0], nums[-1]
    taken = {render_value(v) for v in nums}
    out: list[Value] = []

    def add(x: float) -> None:
        x = int(round(x)) if is_int else round(x, 6)
        if render_value(x) not in taken and x not in out:
            out.append(x)

    # Beyond the range first (the clearest held-out case), then gaps inside it.
    add(hi + step)
    add(lo - step)
    if step > 0:  # points on the grid's own step that it skipped (2045 in 2030, 2035, 2040, 2050)
        k = 1
        while lo + k * step < hi and k < 1000:
            add(lo + k * step)
            k += 1
    for a, b in zip(nums, nums[1:], strict=False):
        if (b - a) > (1 if is_int else 0):
            add(a + (b - a) / 2)
    k = 2
    while len(out) < n and k < 100:
        add(hi + k * step)
        add(lo - k * step)
        k += 1
    return out[:n]


def _text_suggestions(values: list[str], n: int) -> list[Value]:
    lowered = {v.casefold() for v in values}
    best, best_overlap = None, 0
    for items in CURATED.values():
        overlap = sum(1 for item in items if item.casefold() in lowered)
        if overlap > best_overlap:
            best, best_overlap = items, overlap
    pool = best if best else GENERIC_TEXT
    found: list[Value] = [item for item in pool if item.casefold() not in lowered]
    return found[:n]


def suggest_values(spec: GridSpec, n: int = 3) -> dict[str, list[Value]]:
    """Up to ``n`` values per variable that are not in the grid (held-out values)."""
    out: dict[str, list[Value]] = {}
    for name, values in spec.variables.items():
        if values and all(is_number(v) for v in values):
            out[name] = _number_suggestions(list(values), n)  # type: ignore[arg-type]
        else:
            out[name] = _text_suggestions([render_value(v) for v in values], n)
    return out


def held_out_values(spec: GridSpec, index: int = 0) -> dict[str, Value]:
    """One full set of held-out values (the ``index``-th suggestion per variable, cycling)."""
    suggestions = suggest_values(spec, n=max(3, index + 1))
    out: dict[str, Value] = {}
    for name, values in spec.variables.items():
        options = suggestions.get(name) or [values[0]]
        out[name] = options[index % len(options)]
    return out


# -- what the model was trained on --------------------------------------------

def trained_keys(store: Store) -> set[str]:
    """Cell keys of the examples in the training data: what the latest export kept
    (its minimum grade), or, with no export yet, every kept finished completion."""
    latest = store.latest_export()
    min_grade = latest.min_grade if latest else None
    return {cell_key(values) for _id, values, _text, _grade in store.iter_export_rows(min_grade)}


def held_out_combinations(spec: GridSpec, trained: set[str], limit: int = 5,
                          seed: int = 0) -> list[dict[str, Value]]:
    """Up to ``limit`` combinations of grid values that are not in the training data."""
    rng = random.Random(seed)
    out: list[dict[str, Value]] = []
    if spec.cell_count <= 20_000:
        cells = [c for c in spec.cells() if cell_key(c) not in trained]
        rng.shuffle(cells)
        return cells[:limit]
    for _ in range(limit * 50):  # a big grid: sample instead of listing it
        cell = {name: rng.choice(values) for name, values in spec.variables.items()}
        if cell_key(cell) not in trained and cell not in out:
            out.append(cell)
            if len(out) >= limit:
                break
    return out


TRAINED, GRID, HELD_OUT, INCOMPLETE = "trained", "grid", "held-out", "incomplete"


def classify(spec: GridSpec, values: dict[str, Value], trained: set[str]) -> tuple[str, list[str]]:
    """(kind, new_variables): kind is ``trained`` (this exact cell is in the training
    data), ``grid`` (every value is a grid value but the combination was not trained),
    ``held-out`` (some values were never in the grid; they are named) or
    ``incomplete`` (a variable is empty)."""
    if any(render_value(values.get(n, "")).strip() == "" for n in spec.variables):
        return INCOMPLETE, [n for n in spec.variables if render_value(values.get(n, "")).strip() == ""]
    new = [
        name for name, grid_values in spec.variables.items()
        if render_value(values[name]) not in {render_value(v) for v in grid_values}
    ]
    if new:
        return HELD_OUT, new
    canonical = {}
    for name, grid_values in spec.variables.items():  # back to the grid's own typed value
        text = render_value(values[name])
        canonical[name] = next(v for v in grid_values if render_value(v) == text)
    return (TRAINED if cell_key(canonical) in trained else GRID), []


def describe(kind: str, new: list[str]) -> str:
    return {
        TRAINED: "in the training data: this exact combination was trained",
        GRID: "held-out combination: grid values, but this combination was not trained",
        HELD_OUT: "held-out values: " + ", ".join(new) + " not in the grid",
        INCOMPLETE: "fill in: " + ", ".join(new),
    }[kind]


# -- repetition ---------------------------------------------------------------

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


@dataclass
class Repetition:
    """Repeated word n-grams in a text: ``spans`` are (start, end) character ranges of
    every occurrence of a repeated n-gram, merged; ``phrases`` the repeated n-grams
    with their counts, most frequent first."""

    spans: list[tuple[int, int]] = field(default_factory=list)
    phrases: list[tuple[str, int]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.spans)

    @property
    def repeated_chars(self) -> int:
        return sum(b - a for a, b in self.spans)

    def summary(self) -> str:
        if not self.found:
            return "no repetition"
        phrase, count = self.phrases[0]
        return f"repeats itself: \u201c{phrase}\u201d \u00d7{count}"


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().casefold(), m.start(), m.end()) for m in _WORD.finditer(text)]


def find_repetition(text: str, *, min_loop_words: int = 6, long_ngram: int = 8,
                    max_period: int = 60) -> Repetition:
    """Where a text repeats itself, the way a looping model does.

    Two signs, case-insensitive, punctuation ignored:
    * a loop: a phrase (up to ``max_period`` words) immediately followed by itself,
      covering at least ``min_loop_words`` words ("the city grew. The city grew.");
    * a copy: any ``long_ngram``-word sequence seen twice or more anywhere.
    Healthy prose repeats names and terms, rarely either of these.
    """
    words = _words(text)
    tokens = [w for w, _, _ in words]
    counts: dict[str, int] = {}
    ranges: list[tuple[int, int]] = []  # word index ranges [a, b)

    # Loops (tandem repeats): for each start and period p, how many times the unit repeats.
    i, n = 0, len(tokens)
    while i < n:
        best = None
        for p in range(1, min(max_period, (n - i) // 2) + 1):
            reps = 1
            while i + (reps + 1) * p <= n and tokens[i + reps * p:i + (reps + 1) * p] == tokens[i:i + p]:
                reps += 1
            if reps >= 2 and reps * p >= min_loop_words and (best is None or reps * p > best[0] * best[1]):
                best = (reps, p)
        if best:
            reps, p = best
            phrase = " ".join(tokens[i:i + p])
            counts[phrase] = max(counts.get(phrase, 0), reps)
            ranges.append((i, i + reps * p))
            i += reps * p
        else:
            i += 1

    loops = list(ranges)

    def in_loop(j: int) -> bool:
        return any(a <= j and j + long_ngram <= b for a, b in loops)

    # Copies: long n-grams seen twice or more, outside the loops already found.
    seen: dict[tuple[str, ...], list[int]] = {}
    for j in range(n - long_ngram + 1):
        seen.setdefault(tuple(tokens[j:j + long_ngram]), []).append(j)
    for gram, starts in seen.items():
        if len(starts) >= 2 and not all(in_loop(j) for j in starts):
            for j in starts:
                ranges.append((j, j + long_ngram))
            phrase = " ".join(gram)
            counts[phrase] = max(counts.get(phrase, 0), len(starts))

    if not ranges:
        return Repetition()
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    spans = [(words[a][1], words[b - 1][2]) for a, b in merged]
    phrases = sorted(counts.items(), key=lambda kv: (-kv[1] * len(kv[0].split()), kv[0]))
    return Repetition(spans=spans, phrases=phrases[:5])


# -- prompting -----------------------------------------------------------------

@dataclass
class Prompt:
    """What the playground sends: chat messages, or a legacy prompt (completion format)."""

    format: str  # chat | completion
    messages: list[dict[str, str]]
    text: str  # the prompt as a person reads it (user message, or prompt + separator)


def build_prompt(spec: GridSpec, values: dict[str, Value], format: str = "chat",
                 separator: str | None = None) -> Prompt:
    """The training template filled with ``values``, as the tuned model saw its examples
    (the export's chat messages, or its prompt ending with the separator)."""
    rendered = spec.render(values)
    if format == "completion":
        text = rendered.training + (separator or "")
        return Prompt("completion", [{"role": "user", "content": text}], text)
    return Prompt("chat", rendered.training_messages(), rendered.training)


def stream_reply(backend: Backend, model: str, prompt: Prompt, *, stop: list[str] | None = None,
                 temperature: float | None = None, max_tokens: int | None = None) -> Iterator[Piece]:
    """Stream a reply to a playground prompt (blocking; run it in a thread): text
    pieces, then a final Piece with the finish reason ("stop", "length", ...)."""
    target = {"prompt": prompt.text} if prompt.format == "completion" else {"messages": prompt.messages}
    return stream_pieces(backend, model, stop=stop, temperature=temperature, max_tokens=max_tokens, **target)


def ran_out(finish_reason: str | None) -> bool:
    """The output stopped at max tokens, not at a stop sequence or end of text."""
    return finish_reason == "length"


__all__ = [
    "Piece", "Prompt", "build_prompt", "stream_reply",
    "CURATED", "GRID", "HELD_OUT", "INCOMPLETE", "Repetition", "TRAINED", "classify",
    "describe", "find_repetition", "held_out_combinations", "held_out_values", "ran_out",
    "suggest_values", "trained_keys",
]
