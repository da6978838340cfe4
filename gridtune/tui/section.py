"""The base of the five section screens: status line, footer, errors and refreshes.

A section screen composes its body between the shared status line and footer,
asks ``pipeline`` for every change and then calls ``changed(...)``; it shows
what the store holds in ``refresh_from_project``, which runs after every change
that touches the project — its own, another screen's, another process's. A
screen that is not on view when a change arrives catches up when it is shown
again, so hidden screens do no work and never show stale counts.
"""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from ..core.errors import one_line
from .context import ProjectContext
from .events import ProjectChanged
from .widgets import StatusLine


class SectionScreen(Screen):
    """One section of the app (grid, generate, review, export, playground)."""

    MODE: ClassVar[str] = ""
    """The app mode this screen is the section of (the status line highlights it)."""
    HELP_TITLE: ClassVar[str] = ""
    HELP: ClassVar[str] = ""
    QUIET_WORKER_GROUPS: ClassVar[frozenset[str]] = frozenset()
    """Worker groups whose errors the screen reports itself."""

    def __init__(self, ctx: ProjectContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._missed: set[str] = set()

    # -- layout -------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusLine(self.MODE)
        yield from self.compose_body()
        yield Footer(compact=True)

    def compose_body(self) -> ComposeResult:
        """The screen's own widgets, between the status line and the footer."""
        yield from ()

    # -- the data flow ------------------------------------------------------------
    def changed(self, *what: str) -> None:
        """Say that this screen's intent changed ``what`` in the project: this screen
        refreshes, and the message bubbles on to the app, which tells the others."""
        self.post_message(ProjectChanged(*what))

    @on(ProjectChanged)
    def _project_changed(self, message: ProjectChanged) -> None:
        if self.is_current:
            self.refresh_from_project(message.what)
        else:
            self._missed |= message.what

    def on_screen_resume(self) -> None:
        if self._missed:
            what, self._missed = frozenset(self._missed), set()
            self.refresh_from_project(what)

    def refresh_from_project(self, what: frozenset[str]) -> None:
        """Show the project as the store holds it now; ``what`` names what changed
        ("external": anything may have). Override; keep the queries in a worker."""

    def unsaved_work(self) -> str | None:
        """What this screen holds that is not in the file yet, in words (None: nothing).
        The app asks before quitting past it."""
        return None

    # -- errors -------------------------------------------------------------------
    def show_error(self, error: BaseException | str, title: str | None = None) -> None:
        """One line, never a traceback: what failed and why."""
        text = error if isinstance(error, str) else one_line(error)
        self.notify(text, title=title or self.HELP_TITLE or "gridtune", severity="error")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.ERROR and worker.group not in self.QUIET_WORKER_GROUPS:
            if worker.error is not None:
                self.show_error(worker.error)
