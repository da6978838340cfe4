"""Requests-per-minute and tokens-per-minute limits over every sliding window.

aiolimiter's AsyncLimiter is a leaky bucket: with capacity C and leak rate r it
admits at most C + r*P in any window of P seconds. ``AsyncLimiter(rpm, 60)``
(capacity = the limit) therefore lets through almost 2x rpm in the worst
60-second window (a full burst, then a full minute of leak). To keep *every*
window within the limit L we size the bucket as C + r*P = L: a small capacity
(one request; for tokens the largest request, at least a tenth of the budget)
and the rest as steady leak. The spacing this gives also absorbs network jitter
between our clock and the server's.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiolimiter import AsyncLimiter

MINUTE = 60.0


def window_limiter(limit: float, capacity: float, period_s: float = MINUTE) -> AsyncLimiter:
    """A leaky bucket that admits at most ``limit`` per any ``period_s`` window."""
    if limit <= 0:
        raise ValueError(f"limit must be positive, not {limit}")
    capacity = min(capacity, limit)
    steady = limit - capacity
    if steady <= 0:
        # limit == capacity (e.g. rpm=1): leak slower than one bucket per window.
        return AsyncLimiter(capacity, period_s * 1.05)
    # AsyncLimiter(max_rate, time_period): capacity max_rate, leaking max_rate per time_period.
    return AsyncLimiter(capacity, capacity * period_s / steady)


@dataclass
class RateLimits:
    """Optional rpm/tpm limits.

    ``max_request_tokens``: the largest single request expected (prompt +
    max_tokens); the token bucket holds at least that much so no request is
    under-charged. ``period_s`` is the minute (tests shrink it).
    """

    rpm: float | None = None
    tpm: float | None = None
    max_request_tokens: int = 0
    period_s: float = MINUTE

    def __post_init__(self) -> None:
        self._requests = window_limiter(self.rpm, 1, self.period_s) if self.rpm else None
        tpm = self.tpm or 0
        self._token_capacity = min(float(tpm), max(1.0, tpm / 10, float(self.max_request_tokens)))
        self._tokens = window_limiter(self.tpm, self._token_capacity, self.period_s) if self.tpm else None

    @property
    def needs_token_estimate(self) -> bool:
        return self._tokens is not None

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of about ``tokens`` tokens may be sent.

        A request larger than the whole tpm budget is charged the whole
        bucket: it waits for a full bucket but is never refused.
        """
        if self._tokens is not None and tokens > 0:
            await self._tokens.acquire(min(float(tokens), self._token_capacity))
        if self._requests is not None:
            await self._requests.acquire(1)
