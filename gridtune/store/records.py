"""Typed records read from the project file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

HUMAN_SOURCES = frozenset({"person"})
ACTIVE_RUN_STATES = ("starting", "running", "stopping")
# A completion whose finish_reason is this was cut off at max tokens: its text
# stops mid-way. Marked as cut off wherever it is shown, never ranked above one
# that finished, and left out of exports by default (issue 9).
CUT_OFF_REASON = "length"


@dataclass(slots=True)
class WorkItem:
    """One completion to generate: a (cell, sample) pair still pending or failed."""

    completion_id: int
    cell_id: int
    sample: int
    values: dict[str, Any]
    attempts: int


@dataclass(slots=True)
class CompletionRecord:
    id: int
    cell_id: int
    sample: int
    values: dict[str, Any]
    status: str
    text: str | None
    original_text: str | None
    length: int | None
    model: str | None
    params: dict[str, Any] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float | None
    finish_reason: str | None
    attempts: int
    error: str | None
    error_kind: str | None
    grade: int | None
    grade_source: str | None
    updated_at: float

    @property
    def edited(self) -> bool:
        return self.original_text is not None

    @property
    def cut_off(self) -> bool:
        """Finished because it hit max tokens, not because it ended (see CUT_OFF_REASON)."""
        return self.status == "done" and self.finish_reason == CUT_OFF_REASON


@dataclass(slots=True)
class GradeRecord:
    id: int
    completion_id: int
    grade: int
    source: str
    created_at: float
    undone: bool


@dataclass(slots=True)
class RunRecord:
    id: int
    pid: int | None
    host: str | None
    started_at: float
    heartbeat_at: float | None
    ended_at: float | None
    state: str
    model: str | None
    params: dict[str, Any] | None
    stop_requested: bool
    progress: dict[str, Any] | None
    error: str | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_RUN_STATES

    @classmethod
    def from_row(cls, row: Any) -> RunRecord:
        return cls(
            id=row["id"], pid=row["pid"], host=row["host"], started_at=row["started_at"],
            heartbeat_at=row["heartbeat_at"], ended_at=row["ended_at"], state=row["state"],
            model=row["model"], params=_loads(row["params_json"]),
            stop_requested=bool(row["stop_requested"]), progress=_loads(row["progress_json"]),
            error=row["error"],
        )


@dataclass(slots=True)
class ExportRecord:
    id: int
    path: str
    valid_path: str | None
    format: str
    min_grade: int | None
    separator: str | None
    stop: str | None
    validation_fraction: float
    n_train: int
    n_valid: int
    report: dict[str, Any] | None
    created_at: float


@dataclass(slots=True)
class JobRecord:
    id: str
    base_url: str | None
    model: str
    training_file: str | None
    validation_file: str | None
    export_id: int | None
    status: str
    fine_tuned_model: str | None
    error: str | None
    created_at: float
    updated_at: float


@dataclass(slots=True)
class StatusCounts:
    cells: int
    completions: int
    done: int
    failed: int
    pending: int
    running: int
    graded: int
    rejected: int
    grades: dict[str, int]
    cut_off: int = 0  # finished completions cut off at max tokens (finish_reason "length")

    def to_dict(self) -> dict[str, Any]:
        return {
            "cells": self.cells, "completions": self.completions, "done": self.done,
            "failed": self.failed, "pending": self.pending, "running": self.running,
            "graded": self.graded, "rejected": self.rejected, "grades": dict(self.grades),
            "cut_off": self.cut_off,
        }


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None
