"""Progress of a generation run: one snapshot type, shared by the runner, the
command line, the TUI and the run row in the project file (``runs.progress_json``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RATE_WINDOW_S = 10.0  # requests/s and tokens/s are measured over this recent window
# The ETA follows a change of speed over about this many seconds, not from one snapshot
# to the next: measured over 10 s, the speed swings with every batch of replies, and an
# ETA read from it swung 26 h -> 1 h 19 m -> 3 m -> 17 m in one run (issue 21).
ETA_SMOOTHING_S = 20.0
# A request in flight has at least this share of a typical reply still to come: one
# running past the mean is not done, and an ETA of 0 s with requests in flight misleads.
IN_FLIGHT_LEFT = 0.25
TAIL = 5  # finished completions kept for a live tail

# Why a request was retried: the keys of Progress.retry_reasons, in the order shown,
# with the words a person reads ("retries 5: 3 timeouts, 2 busy/rate-limited (429)").
RETRY_KINDS: dict[str, tuple[str, str]] = {
    "timeout": ("timeout", "timeouts"),
    "rate_limited": ("busy/rate-limited (429)", "busy/rate-limited (429)"),
    "server_error": ("server error (5xx)", "server errors (5xx)"),
    "connection": ("connection error", "connection errors"),
    "malformed": ("malformed reply", "malformed replies"),
    "other": ("other (408/409)", "other (408/409)"),
}


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
    retry_reasons: dict[str, int] = field(default_factory=dict)  # RETRY_KINDS key -> retries
    phase: str | None = None  # what the run waits for before its first tokens, in words
    estimate: str | None = None  # the time estimate made when the run started, in words
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0  # completion tokens per second
    cost_usd: float | None = None  # None: the model's price is unknown
    eta_s: float | None = None
    elapsed_s: float = 0.0
    model: str | None = None
    stopped_by: str | None = None  # why a run ended before its work did, when not a person's stop
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
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["recent"] = [Finished(**r) for r in values.get("recent") or []]
        if not isinstance(values.get("retry_reasons"), dict):  # progress saved before reasons were kept
            values["retry_reasons"] = {}
        return cls(**values)

    def summary(self) -> str:
        """One line for logs and plain terminals."""
        parts = [f"{self.done}/{self.total} done", f"{self.failed} failed", f"{self.in_flight} in flight",
                 f"{self.requests_per_s:.1f} req/s", f"{self.tokens_per_s:.0f} tok/s"]
        if self.cost_usd is not None:
            parts.append(f"${self.cost_usd:.4f}")
        if self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if self.retries:
            parts.append(self.retry_text())
        if self.phase:
            parts.append(self.phase)
        if self.stopped_by:
            parts.append(self.stopped_by)
        return f"run #{self.run_id} {self.state}: " + ", ".join(parts)

    def retry_text(self) -> str:
        """Retries and why, in words: "retries 5: 3 timeouts, 2 busy/rate-limited (429)"."""
        if not self.retries:
            return "no retries"
        reasons = self.retry_reasons or {}
        words = [f"{n} {RETRY_KINDS[k][0 if n == 1 else 1]}" for k, n in
                 sorted(reasons.items(), key=lambda kv: list(RETRY_KINDS).index(kv[0]) if kv[0] in RETRY_KINDS
                        else len(RETRY_KINDS)) if n and k in RETRY_KINDS]
        words += [f"{n} {k}" for k, n in reasons.items() if n and k not in RETRY_KINDS]
        return f"retries {self.retries}" + (f": {', '.join(words)}" if words else "")


class Tracker:
    """Counts a run as it goes and produces Progress snapshots."""

    def __init__(self, total: int, run_id: int | None = None, model: str | None = None,
                 estimate_s: float | None = None, estimate: str | None = None,
                 expected_tokens: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.progress = Progress(run_id=run_id, total=total, pending=total, model=model, estimate=estimate)
        self._clock = clock
        self._first_token: float | None = None  # when the first token arrived: speed counts from there
        self._rates: dict[str, tuple[float, float]] = {}  # "tokens"/"requests" -> (steady speed, when)
        self._estimate_s = estimate_s  # the ETA until the run's own rate says more
        self._expected = expected_tokens  # completion tokens a request is expected to take
        self._all_tokens = 0  # every completion token seen (streamed or with a finished reply)
        self._done_tokens = 0  # the tokens of finished completions
        self._started = clock()
        self._window: deque[float] = deque()  # when each recent completion finished
        self._tokens: deque[tuple[float, int]] = deque()  # (time, completion tokens received)
        self._cost: float | None = 0.0
        self._got_tokens = False

    def started(self) -> None:
        self.progress.in_flight += 1

    def retried(self, kind: str = "other") -> None:
        self.progress.retries += 1
        reasons = self.progress.retry_reasons
        reasons[kind] = reasons.get(kind, 0) + 1

    def streamed(self, tokens: int) -> None:
        """Tokens of a completion still in flight (a streamed reply): they count in
        tokens/s at once, so a run shows speed before its first completion ends."""
        if tokens > 0:
            now = self._clock()
            if self._first_token is None:
                self._first_token = now
            self._tokens.append((now, tokens))
            self._all_tokens += tokens
            self._got_tokens = True

    def set_phase(self, phase: str | None) -> None:
        self.progress.phase = phase

    def ended(self) -> None:
        """A request left flight without finishing (cancelled)."""
        self.progress.in_flight -= 1

    def done(self, completion_id: int, text: str, completion_tokens: int, cost: float | None,
             streamed: int = 0) -> None:
        """A completion finished; ``streamed`` of its tokens were already counted."""
        self.progress.in_flight -= 1
        self.progress.done += 1
        now = self._clock()
        self._window.append(now)
        self.streamed(completion_tokens - streamed)
        self._done_tokens += completion_tokens
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
        now = self._clock()
        p.elapsed_s = round(now - self._started, 3)
        while self._window and self._window[0] < now - RATE_WINDOW_S:
            self._window.popleft()
        while self._tokens and self._tokens[0][0] < now - RATE_WINDOW_S:
            self._tokens.popleft()
        span = min(RATE_WINDOW_S, max(now - self._started, 1e-9))
        p.requests_per_s = round(len(self._window) / span, 3)
        # Tokens/s from the first token on: the wait for the first tokens (the server
        # reading the prompts) is not the decoding speed, and counted in it made the
        # first ETAs of a run hours long.
        token_span = min(RATE_WINDOW_S, max(now - self._first_token, 1.0)) if self._first_token is not None else span
        p.tokens_per_s = round(sum(t for _, t in self._tokens) / token_span, 3)
        if p.phase is None and p.in_flight and not self._got_tokens and not p.done:
            p.phase = "waiting for the first tokens"
        elif p.phase == "waiting for the first tokens" and (self._got_tokens or p.done):
            p.phase = None
        p.pending = max(p.total - p.done - p.failed - p.in_flight, 0)
        remaining = p.total - p.done - p.failed
        eta = self._token_eta(remaining, p, now)
        if eta is None and p.requests_per_s > 0 and remaining > 0:
            since = max(now - self._started, 1.0)
            eta = remaining / self._steady("requests", p.requests_per_s, p.finished / since, since, now)
        if remaining <= 0:
            p.eta_s = 0.0
        elif eta is not None:
            p.eta_s = round(eta, 1)
        elif self._estimate_s is not None and p.elapsed_s < self._estimate_s:
            p.eta_s = round(self._estimate_s - p.elapsed_s, 1)
        else:
            p.eta_s = None
        p.cost_usd = None if self._cost is None else round(self._cost, 6)
        return Progress.from_dict(p.to_dict())  # a copy: the caller may keep it

    def _steady(self, kind: str, window_rate: float, mean_rate: float, since: float, now: float) -> float:
        """A speed the ETA can rest on: for the first ETA_SMOOTHING_S seconds of measuring
        (``since``), the mean so far; then the window's rate, approached by the share of
        ETA_SMOOTHING_S since the last snapshot (an exponential moving average). Smoothing
        the speed, not the ETA, keeps the ETA unbiased: a smoothed countdown lags behind
        and reaches 0 s early."""
        last = self._rates.get(kind)
        if since < ETA_SMOOTHING_S or last is None:
            speed = mean_rate
        else:
            value, at = last
            speed = value + (1 - math.exp(-max(now - at, 0.0) / ETA_SMOOTHING_S)) * (window_rate - value)
        self._rates[kind] = (speed, now)
        return max(speed, 1e-9)

    def _token_eta(self, remaining: int, p: Progress, now: float) -> float | None:
        """ETA from tokens/s (known from the first streamed tokens, long before the first
        completion ends): the tokens left, at the mean length of the finished completions
        (the expected length until a few are done), less those already in flight (each
        with at least IN_FLIGHT_LEFT of a reply still to come)."""
        if p.tokens_per_s <= 0 or remaining <= 0 or self._first_token is None:
            return None
        if p.done >= 3:
            per_request = self._done_tokens / p.done
        elif self._expected:
            per_request = self._expected
        else:
            return None
        in_flight = min(p.in_flight, remaining)
        in_flight_tokens = max(self._all_tokens - self._done_tokens, 0)
        in_flight_left = max(in_flight * per_request - in_flight_tokens, in_flight * per_request * IN_FLIGHT_LEFT)
        left = (remaining - in_flight) * per_request + in_flight_left
        since = max(now - self._first_token, 1.0)
        return left / self._steady("tokens", p.tokens_per_s, self._all_tokens / since, since, now)


def _preview(text: str, width: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
