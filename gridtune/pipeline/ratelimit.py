"""Requests-per-minute and tokens-per-minute limits, the configured ones and the
provider's own.

Configured limits (``--rpm``/``--tpm``) are kept over every sliding window: the
limiter logs what it sent and admits a request when the last ``period_s`` (plus a
small margin for the network's jitter between our clock and the server's) holds
room for it. That is the most a provider enforcing a sliding minute accepts, and it
also suits one that refills a bucket steadily (every sequence that keeps each
window within L keeps such a bucket from running dry). Unlike a leaky bucket
sized to the window, it may send a window's whole budget at once: 600 rpm and a
1,500-request run take two minutes, not two and a half.

The provider's remaining budget, when it reports one (OpenAI's
``x-ratelimit-remaining-requests`` / ``-tokens``, with ``x-ratelimit-reset-*``
like ``6m0s``, ``1s``, ``20ms``: the time until the budget is back to its initial
state), is a second gate: a request goes only while the last report, less what was
sent since it was read, leaves room for it; once spent, nothing goes until the
reported reset, after which the budget counts as full again (less what was sent
since). Every reply brings a fresher report. This assumes the server computes the
report when it answers, as OpenAI and the fake test server do.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MINUTE = 60.0
WINDOW_MARGIN = 0.01  # a window is kept as period * (1 + margin) + SKEW_S: clocks and networks jitter
SKEW_S = 0.25  # also covers a first request that leaves late (a new connection, a TLS handshake)
REORDER_MARGIN = 0.01  # of a reported budget, kept unused (see wait_s)
POLL_S = 0.1  # a waiter looks again this often: a fresher report may let it go sooner

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """Seconds from an x-ratelimit-reset-* value: ``6m0s``, ``1s``, ``20ms``,
    ``1h2m3.5s`` or a bare number of seconds. None when unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _DURATION.finditer(value):
        if match.start() != pos:
            return None
        number, unit = float(match.group(1)), match.group(2)
        total += number * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
        pos = match.end()
    return total if pos == len(value) and pos else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


@dataclass
class _Report:
    """The provider's last word on one budget (requests or tokens)."""

    remaining: float
    reset_at: float  # monotonic time when the budget is whole again
    limit: float | None
    sent_at_read: float  # our running total (requests or tokens) up to the request answered
    expired_at_read: float  # our running total that had left the window when we read it
    rolled: bool = False  # reset_at passed without a fresher report


@dataclass
class RateLimits:
    """Optional rpm/tpm limits, and the provider's remaining budget when it reports one.

    ``max_request_tokens`` is accepted for callers that size by the largest request;
    a request larger than the whole tpm budget is charged the whole budget: it waits
    for an empty window but is never refused. ``period_s`` is the minute (tests
    shrink it).
    """

    rpm: float | None = None
    tpm: float | None = None
    max_request_tokens: int = 0
    period_s: float = MINUTE
    _log: deque = field(default_factory=deque, init=False, repr=False)  # (sent at, charge, tokens) in the window
    _window_tokens: float = field(default=0.0, init=False, repr=False)  # the charges in the log
    _expired_requests: int = field(default=0, init=False, repr=False)  # sent and out of the window since
    _expired_tokens: float = field(default=0.0, init=False, repr=False)
    _sent_requests: int = field(default=0, init=False, repr=False)
    _sent_tokens: float = field(default=0.0, init=False, repr=False)
    _requests_report: _Report | None = field(default=None, init=False, repr=False)
    _tokens_report: _Report | None = field(default=None, init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._window = self.period_s * (1 + WINDOW_MARGIN) + SKEW_S

    @property
    def needs_token_estimate(self) -> bool:
        """Whether requests must say how many tokens they may use (a tpm limit, or a
        provider that reports a token budget)."""
        return bool(self.tpm) or self._tokens_report is not None

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm) or self._requests_report is not None or self._tokens_report is not None

    async def acquire(self, tokens: int = 0) -> tuple[int, float]:
        """Wait until one request of about ``tokens`` tokens may be sent; first come,
        first served. Returns the request's mark for ``observe``: what had been sent up
        to and with it."""
        if not self.active:
            self._sent_requests += 1
            self._sent_tokens += tokens
            self._expired_requests, self._expired_tokens = self._sent_requests, self._sent_tokens  # nothing logged
            return self._sent_requests, self._sent_tokens
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = self.wait_s(tokens, now)
                if wait <= 0:
                    break
                await asyncio.sleep(min(wait, POLL_S))
            self._record(tokens, now)
            return self._sent_requests, self._sent_tokens

    def wait_s(self, tokens: int = 0, now: float | None = None) -> float:
        """How long a request of ``tokens`` must wait before it may go (0: now)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        wait = 0.0
        log = self._log
        if self.rpm and log and len(log) + 1 > self.rpm:
            oldest_to_leave = min(math.ceil(len(log) + 1 - self.rpm), len(log)) - 1
            wait = max(wait, log[oldest_to_leave][0] + self._window - now)
        if self.tpm:
            charge = min(float(tokens), self.tpm)
            excess = self._window_tokens + charge - self.tpm
            if excess > 0:
                freed = 0.0
                for sent, size, _tokens in log:  # the oldest first: wait until enough of them leave the window
                    freed += size
                    if freed >= excess - 1e-9:
                        wait = max(wait, sent + self._window - now)
                        break
        for report, need, sent in ((self._requests_report, 1.0, self._sent_requests),
                                   (self._tokens_report, float(tokens), self._sent_tokens)):
            if report is None or need <= 0:
                continue
            if now >= report.reset_at:
                if report.limit is None:  # no limit known: the report has said all it could
                    continue
                # Whole again, less what went since the report (still in the server's window);
                # a period later without a fresher report, whole for good.
                if report.rolled:
                    report.sent_at_read = sent
                    report.expired_at_read = self._expired_requests if report is self._requests_report \
                        else self._expired_tokens
                report.remaining, report.reset_at, report.rolled = report.limit, now + self.period_s, True
            # What was left, less what went since, plus what has since left the window of
            # what the report had counted (a sliding window, or a bucket refilling at least
            # as fast, gives it back a period after it was sent).
            expired = self._expired_requests if report is self._requests_report else self._expired_tokens
            freed = min(expired, report.sent_at_read) - min(report.expired_at_read, report.sent_at_read)
            left = report.remaining - (sent - report.sent_at_read) + freed
            # A margin for requests that reached the server in another order than we sent them.
            margin = (report.limit or 0) * REORDER_MARGIN
            if report is self._requests_report:
                margin = max(1.0, margin)
            if left - margin < (min(need, report.limit) if report.limit else need):
                next_leaves = log[0][0] + self._window if log else math.inf  # may free enough sooner
                wait = max(wait, min(report.reset_at, next_leaves) - now)
        return wait

    def _record(self, tokens: int, now: float) -> None:
        self._sent_requests += 1
        self._sent_tokens += tokens
        charge = min(float(tokens), self.tpm) if self.tpm else 0.0
        self._log.append((now, charge, tokens))
        self._window_tokens += charge

    def _expire(self, now: float) -> None:
        log, edge = self._log, now - self._window
        while log and log[0][0] <= edge:
            _, charge, tokens = log.popleft()
            self._window_tokens -= charge
            self._expired_requests += 1
            self._expired_tokens += tokens

    def observe(self, headers: Mapping[str, Any] | None, mark: tuple[int, float] | None = None,
                now: float | None = None) -> None:
        """Take the provider's budget from a response's x-ratelimit-* headers (of a
        reply or of a 429); headers without them change nothing. ``mark``: what
        ``acquire`` returned for the request answered: its report counts what was sent
        up to it, not what went while it was answered (a provider's limiter reports as
        of admission; one that reports later only makes us more careful). The report
        of the request sent last wins."""
        if not headers:
            return
        get = headers.get
        remaining_requests = get("x-ratelimit-remaining-requests")
        remaining_tokens = get("x-ratelimit-remaining-tokens")
        if remaining_requests is None and remaining_tokens is None:
            return
        now = time.monotonic() if now is None else now
        for which, remaining in (("requests", remaining_requests), ("tokens", remaining_tokens)):
            left = _number(remaining)
            if left is None:
                continue
            reset = parse_reset(get(f"x-ratelimit-reset-{which}"))
            index = 0 if which == "requests" else 1
            sent = mark[index] if mark is not None else (self._sent_requests, self._sent_tokens)[index]
            last = self._requests_report if which == "requests" else self._tokens_report
            if last is not None and not last.rolled and last.sent_at_read > sent:
                continue  # a request sent later has already reported
            self._expire(now)
            report = _Report(left, now + SKEW_S + (reset if reset is not None else self.period_s),
                             _number(get(f"x-ratelimit-limit-{which}")), sent,
                             self._expired_requests if which == "requests" else self._expired_tokens)
            if which == "requests":
                self._requests_report = report
            else:
                self._tokens_report = report


def window_limiter(limit: float, capacity: float, period_s: float = MINUTE) -> Any:
    """A leaky bucket that admits at most ``limit`` per any ``period_s`` window
    (aiolimiter; kept for callers that want a bucket rather than the window log)."""
    from aiolimiter import AsyncLimiter

    if limit <= 0:
        raise ValueError(f"limit must be positive, not {limit}")
    capacity = min(capacity, limit)
    steady = limit - capacity
    if steady <= 0:
        return AsyncLimiter(capacity, period_s * 1.05)
    return AsyncLimiter(capacity, capacity * period_s / steady)
