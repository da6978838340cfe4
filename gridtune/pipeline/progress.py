"""Progress of a generation run: one snapshot type, shared by the runner, the
command line, the TUI and the run row in the project file (``runs.progress_json``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RATE_WINDOW_S = 10.0  # requests/s and tokens/s are measured over this recent window
TAIL = 5  # finished completions kept for a live tail


@dataclass
class Finished:
    """One finished completion, for the live tail."""

    id: int
    status: str  # done | failed
    preview: str  # first characters of the text, or the error


@dataclass
class Progress:
    """A snapshot of one run. ``total`` counts the work this run set out to do."""

    run_id: int | None = None
    state: str = "starting"  # starting | running | stopping | finished | stopped | failed
    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    pending: int = 0
    retries: int = 0
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0  # completion tokens per second
    cost_usd: float | None = None  # None: the model's price is unknown
    eta_s: float | None = None
    elapsed_s: float = 0.0
    model: str | None = None
    recent: list[Finished] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def fraction(self) -> float:
        return self.finished / self.total if self.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Progress":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["recent"] = [Finished(**r) for r in values.get("recent") or []]
        return cls(**values)

    def summary(self) -> str:
        """One line for logs and plain terminals."""
        parts = [f"{self.done}/{self.total} done", f"{self.failed} failed", f"{self.in_flight} in flight",
                 f"{self.requests_per_s:.1f} req/s", f"{self.tokens_per_s:.0f} tok/s"]
        if self.cost_usd is not None:
            parts.append(f"${self.cost_usd:.4f}")
        if self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        return f"run #{self.run_id} {self.state}: " + ", ".join(parts)


class Tracker:
    """Counts a run as it goes and produces Progress snapshots."""

    def __init__(self, total: int, run_id: int | None = None, model: str | None = None):
        self.progress = Progress(run_id=run_id, total=total, pending=total, model=model)
        self._started = time.monotonic()
        self._window: deque[tuple[float, int]] = deque()  # (time, completion tokens)
        self._cost: float | None = 0.0

    def started(self) -> None:
        self.progress.in_flight += 1

    def retried(self) -> None:
        self.progress.retries += 1

    def ended(self) -> None:
        """A request left flight without finishing (cancelled)."""
        self.progress.in_flight -= 1

    def done(self, completion_id: int, text: str, completion_tokens: int, cost: float | None) -> None:
        self.progress.in_flight -= 1
        self.progress.done += 1
        self._window.append((time.monotonic(), completion_tokens))
        self._cost = None if cost is None or self._cost is None else self._cost + cost
        self._tail(Finished(completion_id, "done", _preview(text)))

    def failed(self, completion_id: int, error: str) -> None:
        self.progress.in_flight -= 1
        self.progress.failed += 1
        self._tail(Finished(completion_id, "failed", _preview(error)))

    def _tail(self, item: Finished) -> None:
        self.progress.recent = (self.progress.recent + [item])[-TAIL:]

    def snapshot(self, state: str | None = None) -> Progress:
        p = self.progress
        if state:
            p.state = state
        now = time.monotonic()
        p.elapsed_s = round(now - self._started, 3)
        while self._window and self._window[0][0] < now - RATE_WINDOW_S:
            self._window.popleft()
        span = min(RATE_WINDOW_S, max(now - self._started, 1e-9))
        p.requests_per_s = round(len(self._window) / span, 3)
        p.tokens_per_s = round(sum(t for _, t in self._window) / span, 3)
        p.pending = max(p.total - p.done - p.failed - p.in_flight, 0)
        remaining = p.total - p.done - p.failed
        p.eta_s = round(remaining / p.requests_per_s, 1) if p.requests_per_s > 0 else None
        p.cost_usd = None if self._cost is None else round(self._cost, 6)
        return Progress.from_dict(p.to_dict())  # a copy: the caller may keep it


def _preview(text: str, width: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
