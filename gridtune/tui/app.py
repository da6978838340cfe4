"""The Textual app: five sections as modes, a status line, help and the command palette.

`gridtune [PROJECT]` calls ``run_app``. Screens get a ``ProjectContext`` and do
their work through ``gridtune.pipeline``; the app switches between them, passes
``ProjectChanged`` on from the screen that made a change to every other one (and
from other processes, noticed by polling the file's data_version), keeps the
status line's counts fresh and offers every action by name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from .. import locations
from ..pipeline.spec.project import open_or_create_demo
from ..store import StoreError
from .commands import GridtuneCommands
from .context import LOCAL_NOT_RUNNING, ProjectContext
from .events import OpenPlayground, ProjectChanged
from .section import SectionScreen
from .sections import SECTIONS, Section
from .throttle import Throttle
from .widgets.modals import ConfirmModal

_SCREENS = Binding.Group("screens", compact=True)
POLL_INTERVAL_S = 1.0  # how soon a change by another process (a detached run, the CLI) shows
BACKEND_RETRY_S = 5.0  # how often to look again for a local server that was not running
RECOUNT_S = 0.5  # the status line's counts follow changes at most this often


class GridtuneApp(App[int]):
    """gridtune's TUI on one project (the demo project when none is given)."""

    CSS_PATH = "gridtune.tcss"
    TITLE = "gridtune"
    COMMANDS = App.COMMANDS | {GridtuneCommands}
    COMMAND_PALETTE_DISPLAY = "^p"
    BINDINGS = [
        *(
            # priority: a focused TextArea binds f6 (select line); section keys must win.
            # Not in the footer: the status line above is the sections' tab bar, keys and all,
            # and at 80 columns the footer needs the room for the screen's own keys.
            Binding(s.key, f"section('{s.mode}')", s.title, id=f"section.{s.mode}", group=_SCREENS,
                    priority=True, show=False)
            for s in SECTIONS
        ),
        # f1 works from anywhere, a text area too (where ? is typed); the footer shows it.
        Binding("f1", "help", "help", id="app.help_f1", priority=True),
        Binding("question_mark", "help", "help", key_display="?", show=False, id="app.help"),
        Binding("q", "quit", "quit", show=False, id="app.quit"),
        Binding("ctrl+q", "quit", "quit", show=False, priority=True, id="app.quit_priority"),
    ]

    status_counts: reactive[str] = reactive("", init=False)
    """'256 cells · 12 done · …' for every screen's status line."""
    backend_label: reactive[str] = reactive("backend: …", init=False)

    def __init__(self, project_path: Path | None = None, *, ctx: ProjectContext | None = None,
                 start_mode: str | None = None):
        super().__init__()
        self.ctx = ctx or open_context(project_path)
        self.start_mode = start_mode
        self._data_version: int | None = None
        # The count scans the project (about 0.2 s at 100,000 completions).
        self._recount = Throttle(self, RECOUNT_S, self.refresh_status)
        self.sections: dict[str, Section] = {}
        for section in SECTIONS:
            self.sections[section.mode] = section
            self.add_mode(section.mode, self._factory(section.screen))

    def _factory(self, cls: type[Screen]) -> Callable[[], Screen]:
        return lambda: cls(self.ctx)

    # -- life cycle ----------------------------------------------------------
    def on_mount(self) -> None:
        self.title = f"gridtune · {self.ctx.name}"
        mode = self.start_mode or self._natural_start()
        if mode not in self.sections:
            mode = next(iter(self.sections), None)
        if mode:
            self.switch_mode(mode)
        self._load_backend_label()
        self._data_version = self.ctx.store.data_version()  # what the screens read from here on
        # The first count waits a moment: the opening screen's own queries go first.
        self.set_timer(0.5, self.refresh_status)
        self.set_interval(POLL_INTERVAL_S, self._poll_other_processes)

    def on_unmount(self) -> None:
        self.ctx.close()

    def _natural_start(self) -> str:
        """Open where the loop stands: a run in progress, else review once there is
        something to grade, else the grid (a new project starts there)."""
        store = self.ctx.store
        if store.active_run() is not None:
            return "generate"
        return "review" if store.has_done() else "grid"

    # -- the data flow -------------------------------------------------------
    @on(ProjectChanged)
    def _project_changed(self, message: ProjectChanged) -> None:
        """A screen changed the project (or another process did): recount, and tell
        every other section screen; each refreshes itself from the store."""
        if message.forwarded:
            return  # our own copy, bubbling back from the screen it was sent to
        self._recount.soon()
        for screen in self._section_screens():
            if screen is not message._sender:
                screen.post_message(ProjectChanged(*message.what, forwarded=True))

    def _section_screens(self) -> list[SectionScreen]:
        screens: list[SectionScreen] = []
        for mode in self.sections:
            try:
                stack = self.get_screen_stack(mode)
            except KeyError:
                continue  # never opened: it reads the store fresh when it is
            screens += [s for s in stack if isinstance(s, SectionScreen)]
        return screens

    @work(thread=True, exclusive=True, group="poll", exit_on_error=False)
    def _poll_other_processes(self) -> None:
        """Another connection committed (a detached run, the CLI): tell every screen.
        SQLite's data_version changes only for commits by other connections, so this
        costs one pragma a second and never fires for the app's own writes."""
        version = self.ctx.store.data_version()
        if version != self._data_version:
            self._data_version = version
            self.post_message(ProjectChanged("external"))
        if self.backend_label == LOCAL_NOT_RUNNING and self._backend_due():
            self._load_backend_label()

    def _backend_due(self) -> bool:
        import time

        now = time.monotonic()
        if now - getattr(self, "_backend_checked", 0.0) < BACKEND_RETRY_S:
            return False
        self._backend_checked = now
        return True

    # -- status line ---------------------------------------------------------
    @work(thread=True, exclusive=True, group="status", exit_on_error=False)
    def refresh_status(self) -> None:
        c = self.ctx.store.status_counts()
        parts = [f"{c.cells:,} cells", f"{c.done:,} done"]
        if c.failed:
            parts.append(f"{c.failed:,} failed")
        parts.append(f"{c.graded:,} graded")
        if c.pending or c.running:
            parts.append(f"{c.pending + c.running:,} to do")
        self.call_from_thread(setattr, self, "status_counts", " · ".join(parts))

    @work(thread=True, exclusive=True, group="backend", exit_on_error=False)
    def _load_backend_label(self) -> None:
        label = self.ctx.backend_label()
        self.call_from_thread(setattr, self, "backend_label", label)

    # -- actions ---------------------------------------------------------------
    def action_section(self, mode: str) -> None:
        if mode not in self.sections:
            return
        # A dialog (or help) open over this section closes, answered as escape would:
        # left on the mode's stack it would reappear on coming back, out of context.
        self._close_modals()
        if mode != self.current_mode:
            self.switch_mode(mode)

    def _close_modals(self) -> None:
        from textual.screen import ModalScreen

        while isinstance(self.screen, ModalScreen) and len(self.screen_stack) > 1:
            self.screen.dismiss(None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "section" and parameters and parameters[0] not in self.sections:
            return False
        return True

    def action_help(self) -> None:
        from .help import HelpScreen

        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss()
            return
        self.push_screen(HelpScreen(self.screen))

    async def action_quit(self) -> None:
        """Quit, but not past unsaved edits without asking. Runs and jobs go on by
        themselves: the last line on the terminal says so."""
        unsaved = [s for s in self._section_screens() if s.unsaved_work()]
        if not unsaved or isinstance(self.screen, ConfirmModal):
            self._exit_saying_what_goes_on()
            return

        def answer(quit_anyway: bool | None) -> None:
            if quit_anyway:
                self._exit_saying_what_goes_on()

        what = unsaved[0].unsaved_work()
        self.push_screen(ConfirmModal(f"{what}. Quit without saving?", title="Unsaved edits"), answer)

    def _exit_saying_what_goes_on(self) -> None:
        self.exit(message=goes_on_note(self.ctx))

    @on(OpenPlayground)
    def _open_playground(self, message: OpenPlayground) -> None:
        """Switch to the playground with a model beside the base one (the tuned one);
        it follows the latest export for format, separator and stop by itself."""
        if message.forwarded:
            return
        if "playground" not in self.sections:
            self.notify("the playground is not available", severity="warning")
            return
        self.switch_mode("playground")
        self.screen.post_message(OpenPlayground(message.model, forwarded=True))


def goes_on_note(ctx: ProjectContext) -> str | None:
    """What keeps running after the app quits, for the terminal's last line."""
    try:
        run = ctx.store.active_run()
    except StoreError:
        return None
    if run is None:
        return None
    counts = ctx.store.status_counts()
    return (f"gridtune: run #{run.id} goes on in the background ({counts.done:,}/{counts.completions:,} done); "
            f"`gridtune status {ctx.path} --watch` follows it, `gridtune {ctx.path}` reopens it.")


def open_context(project: Path | None) -> ProjectContext:
    """The project to work on: ``project``, else the demo project (created on first run)."""
    if project is None:
        path = locations.demo_project()
        return ProjectContext(path, open_or_create_demo(path))
    return ProjectContext.open(Path(project))


def run_app(project: Path | None) -> None:
    """Open the TUI on ``project`` (None: the demo project, created on first run).

    A project that cannot be opened is a one-line error and exit status 2,
    before the terminal is taken over.
    """
    try:
        ctx = open_context(project)
    except StoreError as exc:
        print(f"gridtune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    app = GridtuneApp(ctx.path, ctx=ctx)
    code = app.run()
    sys.exit(code or 0)
