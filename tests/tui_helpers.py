"""Helpers for the TUI tests: wait for the screens' work without sleeping blindly."""

from __future__ import annotations

from textual.pilot import Pilot
from textual.worker import WorkerCancelled

LONG_LIVED_GROUPS = {"review-writer"}


async def settle(pilot: Pilot, rounds: int = 4) -> None:
    """Let messages, workers and the review writer's queue run dry."""
    app = pilot.app
    for _ in range(rounds):
        await pilot.pause()
        # Pending workers too: one scheduled but not started yet is work still to come.
        busy = [w for w in app.workers if w.group not in LONG_LIVED_GROUPS and not w.is_finished]
        if busy:
            try:
                await app.workers.wait_for_complete(busy)
            except WorkerCancelled:
                pass  # an exclusive worker replaced by a newer one: that one is waited for next round
        for mode in getattr(app, "sections", {}):
            try:
                stack = app.get_screen_stack(mode)
            except KeyError:
                continue
            for screen in stack:
                pending = getattr(screen, "pending_jobs", None)
                while pending is not None and pending():
                    await pilot.pause(0.01)
        await pilot.pause()


def review_screen(app):
    return app.get_screen_stack("review")[0]


async def wait_until(pilot: Pilot, predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` while the app runs; fail after ``timeout`` seconds.

    For state that arrives on a timer (the status line's recount): a fixed pause
    is flaky on a loaded machine, a deadline is not.
    """
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)


async def steady(pilot: Pilot, *, label: str | None = "backend: test", keep_toasts: bool = False) -> None:
    """Bring a screen to rest for a snapshot: its work done, the status line counted
    now (not on its next tick), the backend ``label`` fixed (None: left as the app
    shows it), and toasts gone unless ``keep_toasts`` (they time out: in a baseline
    only when they are the point)."""
    from textual.widgets import TextArea

    app = pilot.app
    await settle(pilot)
    if app.current_mode == "review":  # a reload it has put off (once a second) is still to come
        await wait_until(pilot, lambda: not review_screen(app)._reload_throttle.pending, what="the pending reload")
        await settle(pilot)
    app.refresh_status()
    await settle(pilot)
    if label is not None:
        app.backend_label = label
    for area in app.screen.query(TextArea):
        area.cursor_blink = False
    await pilot.pause(0.1)  # the review's detail pane waits a moment after the cursor moves
    await settle(pilot)
    if not keep_toasts:
        app.clear_notifications()
    await pilot.pause()
