"""At most one call every so often: a person grades several completions a second
and a run writes many more, but a reload or a recount scans the project."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.message_pump import MessagePump
from textual.timer import Timer


class Throttle:
    """``soon()`` calls ``action`` now, or once ``interval_s`` has passed since it
    last ran; the calls in between fold into that one."""

    def __init__(self, owner: MessagePump, interval_s: float, action: Callable[[], None]):
        self.owner, self.interval_s, self.action = owner, interval_s, action
        self._timer: Timer | None = None
        self._last = 0.0

    def soon(self) -> None:
        if self._timer is not None:
            return  # one is already due; it will see this change too
        wait = self._last + self.interval_s - time.monotonic()
        if wait <= 0:
            self._fire()
        else:
            self._timer = self.owner.set_timer(wait, self._fire)

    @property
    def pending(self) -> bool:
        """Whether a call is due later."""
        return self._timer is not None

    def ran(self) -> None:
        """The action ran by another way: the interval counts from now."""
        self._last = time.monotonic()

    def _fire(self) -> None:
        self._timer = None
        self.ran()
        self.action()
