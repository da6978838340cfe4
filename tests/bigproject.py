"""Real project files of any size, made fast: for the review tests and bench/tui.py.

``make_project(path, n)`` creates a project with a grid of ``n`` cells (one
variable ``item`` and a second small one) through the real ``create_project``,
then marks every completion done with a deterministic text of varied length in
one SQL UPDATE (``n = 100_000`` takes about a second or two).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project
from gridtune.store import Store

WORDS = "the city of {place} reached general intelligence and everything changed slowly then all at once"


def big_spec(n: int, name: str = "big") -> GridSpec:
    places = ["Tokyo", "Lagos", "Oslo", "Lima"]
    per = max(1, n // len(places)) if n >= len(places) else 1
    variables = {"place": places[: min(len(places), n)], "item": list(range(per))}
    return GridSpec(
        name=name,
        generation="Write a scenario about {place}, number {item}.",
        training="Scenario: {place} #{item}.",
        variables=variables,
        settings=GenerationSettings(model="teacher-model", samples=1),
        max_cells=max(n, 1),
    )


def make_project(path: Path, n: int, *, done: bool = True, name: str = "big") -> Path:
    """A project file at ``path`` with about ``n`` finished completions (exactly n when 4 divides it)."""
    store = create_project(path, big_spec(n, name))
    store.close()
    if done:
        fill_done(path)
    return path


def fill_done(path: Path, where: str = "1=1") -> None:
    """Mark completions done, each with a text whose length varies by id (50..1549 chars)."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                f"""
                UPDATE completions SET status = 'done', model = 'teacher-model', finish_reason = 'stop',
                    prompt_tokens = 20, completion_tokens = 100 + (id * 7919) % 300,
                    text = 'Scenario ' || id || ': ' || printf('%.*c', (id * 7919) % 1500 + 40, 'x'),
                    updated_at = 0, created_at = 0
                WHERE {where}
                """
            )
            conn.execute("UPDATE completions SET length = length(text) WHERE text IS NOT NULL")
    finally:
        conn.close()


def small_project(path: Path, *, done: int | None = None) -> Path:
    """The demo-like 16-cell project with readable texts, ``done`` of them finished."""
    spec = GridSpec(
        name="small",
        system="You are a careful futurist.",
        generation="Write a scenario about AGI in {place} in {year}.",
        training="AGI scenario. Place: {place}. Year: {year}.",
        variables={"place": ["Tokyo", "Lagos", "Oslo", "Lima"], "year": [2030, 2035, 2040, 2050]},
        settings=GenerationSettings(model="teacher-model", samples=1),
    )
    store = create_project(path, spec)
    ids = [cid for cid, *_ in store.review_rows(sort="grid")]
    lengths = [120, 40, 300, 80, 200, 60, 500, 90, 150, 30, 260, 110, 70, 400, 20, 180]
    for k, cid in enumerate(ids[: done if done is not None else len(ids)]):
        text = (f"In {k} the city changed. " * 40)[: lengths[k % len(lengths)]]
        store.save_done(cid, text=text, model="teacher-model", params={"temperature": 1.0},
                        prompt_tokens=20, completion_tokens=lengths[k % len(lengths)] // 4,
                        latency_s=1.0, finish_reason="stop", attempts=1)
    store.close()
    return path


def open_store(path: Path) -> Store:
    return Store.open(path)
