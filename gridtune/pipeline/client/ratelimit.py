"""Requests-per-minute and tokens-per-minute limits, the configured ones and the
provider's own.

Configured limits (``--rpm``/``--tpm``) are kept over every sliding window, as the
server sees it. The server counts a request from when it *received* it, which we
never see; but it cannot answer before it has it, so a request counts in our log
from when it was sent until a window after its first reply byte (or, while no
reply has come, until a window after ``LAG_CAP_S`` past its sending: a request
that takes longer to reach the server than that is the one case we cannot cover).
So a request held up on its way (a busy event loop, a loaded server) never leaves
our window before it leaves the server's. A request is admitted when the log
leaves room for it. That is the most a provider enforcing a sliding minute
accepts, and it also suits one that refills a bucket steadily. Unlike a leaky
bucket sized to the window, it may send a window's whole budget at once: 600 rpm
and a 1,500-request run take two minutes, not two and a half.

The provider's remaining budget, when it reports one (OpenAI's
``x-ratelimit-remaining-requests`` / ``-tokens``, with ``x-ratelimit-limit-*`` and
``x-ratelimit-reset-*`` like ``6m0s``, ``1s``, ``20ms``: the time until the budget is
back to its initial state), is a second gate. A report, computed when the server
admitted request R, says what the server had counted then. What it counted beyond
ours sent up to R was others' (another process on the same key); until the
reported reset, a request goes while the limit, less those others, less ours in the
window, leaves room for it. That is exact when ours are the only requests on the key,
whatever order they reached the server in. (When others use the key too, a request
of ours that reached the server after R makes their share look smaller by one; a
second bound covers a server that sends no limit: ``remaining``, less ours that R's
report may have missed, that is, those sent after R, or before it but not answered
before R was sent and within ``LAG_CAP_S`` of it.) After the reset, what the report
counted has left the server's window: the limit, less ours sent since, goes.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MINUTE = 60.0
WINDOW_MARGIN = 0.01  # a window is kept as period * (1 + margin) + SLACK_S after the reply: clocks differ in rate
SLACK_S = 0.05
LAG_CAP_S = 2.0  # the longest a request is assumed to take to reach the server (see the module's note)
SKEW_S = 0.25  # added to a reported reset: the report was computed before we read it, but clocks jitter
TOKEN_MARGIN = 0.01  # of a reported token budget, kept unused: the server's count may differ from ours
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


@dataclass(eq=False, slots=True)
class _Sent:
    """One request in the window."""

    seq: int  # 1, 2, ... in the order sent
    at: float  # when it was sent
    tokens: int  # its estimate
    upto: float  # the tokens sent up to and with it
    charge: float  # what it counts toward the configured tpm (never more than the whole budget)
    leaves: float  # when it leaves the window
    answered: float | None = None  # its first reply byte
    gone: bool = False


@dataclass
class _Report:
    """The provider's last word on one budget (requests or tokens)."""

    remaining: float
    reset_at: float  # monotonic time when the budget is whole again
    limit: float | None
    seq: int  # the request whose reply said it
    sure: float  # of ours in the window then, what the server surely counted
    since: float  # our running total (requests or tokens) before the first request it may not have counted
    others: float | None = None  # what others (another process on the key) used then, at least; None: no limit known


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
    _order: deque = field(default_factory=deque, init=False, repr=False)  # _Sent in the window, oldest first
    _heap: list = field(default_factory=list, init=False, repr=False)  # (leaves, seq, _Sent); stale rows skipped
    _by_seq: dict = field(default_factory=dict, init=False, repr=False)
    _live: int = field(default=0, init=False, repr=False)  # requests in the window
    _live_tokens: float = field(default=0.0, init=False, repr=False)  # their estimates
    _window_tokens: float = field(default=0.0, init=False, repr=False)  # their charges
    _sent_requests: int = field(default=0, init=False, repr=False)
    _sent_tokens: float = field(default=0.0, init=False, repr=False)
    _requests_report: _Report | None = field(default=None, init=False, repr=False)
    _tokens_report: _Report | None = field(default=None, init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._window = self.period_s * (1 + WINDOW_MARGIN) + SLACK_S

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
        first served. Returns the request's mark for ``observe``: its number and the
        tokens sent up to and with it."""
        if not self.active:  # logged all the same: a first report must know what went before it
            now = time.monotonic()
            self._expire(now)
            return self._record(tokens, now)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = self.wait_s(tokens, now)
                if wait <= 0:
                    break
                await asyncio.sleep(min(wait, POLL_S))
            return self._record(tokens, now)

    def wait_s(self, tokens: int = 0, now: float | None = None) -> float:
        """How long a request of ``tokens`` must wait before it may go (0: now)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        wait = 0.0
        if self.rpm and self._live and self._live + 1 > self.rpm:
            must_leave = min(math.ceil(self._live + 1 - self.rpm), self._live)
            wait = max(wait, heapq.nsmallest(must_leave, (leaves for leaves, _ in self._leaving()))[-1] - now)
        if self.tpm:
            charge = min(float(tokens), self.tpm)
            excess = self._window_tokens + charge - self.tpm
            if excess > 0:
                freed = 0.0
                for leaves, sent in sorted(self._leaving(), key=lambda row: row[0]):
                    freed += sent.charge
                    if freed >= excess - 1e-9:
                        wait = max(wait, leaves - now)
                        break
        for report, need, ours, sent in ((self._requests_report, 1.0, float(self._live), float(self._sent_requests)),
                                         (self._tokens_report, float(tokens), self._live_tokens, self._sent_tokens)):
            if report is None or need <= 0:
                continue
            # Two bounds on what we used that the report did not count: ours in the window
            # less those it surely counted, and all we sent from the first it may have missed.
            if now >= report.reset_at:  # what it counted has left the server's window
                if report.limit is None:  # no limit known: the report has said all it could
                    continue
                left = report.limit - min(ours, sent - report.since)
            else:
                left = report.remaining - min(ours - report.sure, sent - report.since)
                if report.others is not None and report.limit is not None:
                    # Exact when ours are the only requests on the key (the usual case), whatever
                    # order they reached the server in: the limit, less ours in the window.
                    left = max(left, report.limit - report.others - ours)
            margin = (report.limit or report.remaining) * TOKEN_MARGIN if report is self._tokens_report else 0.0
            if left - margin < (min(need, report.limit) if report.limit else need):
                next_leaves = self._heap[0][0] if self._heap else math.inf  # may free enough sooner
                until = next_leaves if now >= report.reset_at else min(report.reset_at, next_leaves)
                wait = max(wait, until - now)
        return wait

    def _leaving(self):
        """(when it leaves, the request) for each request in the window: its current row."""
        return ((leaves, sent) for leaves, _, sent in self._heap if not sent.gone and leaves == sent.leaves)

    def _record(self, tokens: int, now: float) -> tuple[int, float]:
        self._sent_requests += 1
        self._sent_tokens += tokens
        charge = min(float(tokens), self.tpm) if self.tpm else 0.0
        sent = _Sent(self._sent_requests, now, tokens, self._sent_tokens, charge, now + LAG_CAP_S + self._window)
        self._order.append(sent)
        heapq.heappush(self._heap, (sent.leaves, sent.seq, sent))
        self._by_seq[sent.seq] = sent
        self._live += 1
        self._live_tokens += tokens
        self._window_tokens += charge
        return self._sent_requests, self._sent_tokens

    def _answered(self, seq: int, now: float) -> _Sent | None:
        """The first byte of request ``seq``'s reply came: the server had it by now."""
        sent = self._by_seq.get(seq)
        if sent is None or sent.answered is not None:
            return sent
        sent.answered = now
        if now + self._window < sent.leaves:
            sent.leaves = now + self._window
            heapq.heappush(self._heap, (sent.leaves, seq, sent))
        return sent

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and (heap[0][0] <= now or heap[0][2].gone or heap[0][0] != heap[0][2].leaves):
            leaves, seq, sent = heapq.heappop(heap)
            if sent.gone or leaves != sent.leaves:
                continue  # a row the request's answer made stale
            sent.gone = True
            del self._by_seq[seq]
            self._live -= 1
            self._live_tokens -= sent.tokens
            self._window_tokens -= sent.charge
        order = self._order
        while order and order[0].gone:
            order.popleft()

    def _surely_counted(self, answered: _Sent, now: float) -> tuple[float, float, float, float]:
        """Of ours in the window, the requests and tokens the server surely counted in
        the report it computed for ``answered`` (see the module's note): sent up to
        it, there before it (answered before it was sent, or sent ``LAG_CAP_S``
        before it), and not possibly out of the server's window by the report. Then
        our running totals of requests and tokens before the first it may not have
        counted."""
        requests, tokens = float(self._live), self._live_tokens
        first: _Sent | None = None  # the first it may not have counted
        low = answered.seq + 1
        for sent in reversed(self._order):  # the newest first, down to those surely there before it
            if sent.seq < answered.seq and sent.at <= answered.at - LAG_CAP_S:
                break
            low = sent.seq
            missed = sent.seq > answered.seq or (sent.seq < answered.seq and not (
                sent.answered is not None and sent.answered <= answered.at))
            if missed:
                first = sent
            if not sent.gone and (missed or sent.at + self.period_s <= now):
                requests, tokens = requests - 1, tokens - sent.tokens
        for sent in self._order:  # the oldest: maybe out of the server's window already
            if sent.seq >= low or sent.at + self.period_s > now:
                break
            if not sent.gone:
                requests, tokens = requests - 1, tokens - sent.tokens
        since = (first.seq - 1, first.upto - first.tokens) if first is not None else (answered.seq, answered.upto)
        return max(requests, 0.0), max(tokens, 0.0), float(since[0]), since[1]

    def _ours_up_to(self, seq: int) -> tuple[float, float]:
        """The requests and tokens of ours in the window sent up to request ``seq``."""
        requests, tokens = float(self._live), self._live_tokens
        for sent in reversed(self._order):
            if sent.seq <= seq:
                break
            if not sent.gone:
                requests, tokens = requests - 1, tokens - sent.tokens
        return requests, tokens

    def observe(self, headers: Mapping[str, Any] | None, mark: tuple[int, float] | None = None,
                now: float | None = None) -> None:
        """A reply (or its headers, or a 429) to the request ``acquire`` marked
        ``mark`` came: it counts in the window from now on, and its x-ratelimit-*
        headers, if any, are the provider's budget. The report of the request sent
        last wins."""
        now = time.monotonic() if now is None else now
        answered = self._answered(mark[0], now) if mark is not None else None
        if not headers:
            return
        get = headers.get
        remaining_requests = get("x-ratelimit-remaining-requests")
        remaining_tokens = get("x-ratelimit-remaining-tokens")
        if remaining_requests is None and remaining_tokens is None:
            return
        self._expire(now)
        seq = mark[0] if mark is not None else self._sent_requests
        if answered is not None and not answered.gone:
            sure = self._surely_counted(answered, now)
        else:  # unknown to the log: nothing of ours counts as surely counted, all after it as missed
            sure = (0.0, 0.0, float(seq), mark[1] if mark is not None else self._sent_tokens)
        ours_then = self._ours_up_to(seq)
        for index, which, remaining in ((0, "requests", remaining_requests), (1, "tokens", remaining_tokens)):
            left = _number(remaining)
            if left is None:
                continue
            last = self._requests_report if index == 0 else self._tokens_report
            if last is not None and last.seq > seq:
                continue  # a request sent later has already reported
            reset = parse_reset(get(f"x-ratelimit-reset-{which}"))
            limit = _number(get(f"x-ratelimit-limit-{which}"))
            # What the server had counted beyond ours sent up to this request was others'.
            others = None if limit is None else max(0.0, limit - left - ours_then[index])
            report = _Report(left, now + SKEW_S + (reset if reset is not None else self.period_s),
                             limit, seq, sure[index], sure[2 + index], others)
            if index == 0:
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
