"""The Textual app: five sections as modes, a status line, help and the command palette.

`gridtune [PROJECT]` calls ``run_app``. Screens get a ``ProjectContext`` and do
their work through ``gridtune.pipeline``; the app only switches between them,
keeps the status line's counts fresh and offers every action by name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from .. import locations
from ..pipeline.project import open_or_create_demo
from ..store import StoreError
from .commands import GridtuneCommands
from .context import ProjectContext
from .widgets.modals import ConfirmModal


@dataclass(frozen=True)
class Section:
    mode: str
    title: str
    key: str
    module: str
    cls: str


SECTIONS: tuple[Section, ...] = (
    Section("grid", "Grid", "f2", "gridtune.screens.grid", "GridScreen"),
    Section("generate", "Generate", "f3", "gridtune.screens.generate", "GenerateScreen"),
    Section("review", "Review", "f4", "gridtune.screens.review", "ReviewScreen"),
    Section("export", "Export", "f5", "gridtune.screens.export", "ExportScreen"),
    Section("playground", "Playground", "f6", "gridtune.screens.playground", "PlaygroundScreen"),
)
_SCREENS = Binding.Group("screens", compact=True)
STATUS_INTERVAL_S = 2.0


def section_class(section: Section) -> type[Screen] | None:
    """The screen class of a section, or None while its module is missing."""
    import importlib

    try:
        module = importlib.import_module(section.module)
    except ModuleNotFoundError as exc:
        if exc.name == section.module:
            return None
        raise
    return getattr(module, section.cls, None)


class GridtuneApp(App[int]):
    """gridtune's TUI on one project (the demo project when none is given)."""

    CSS_PATH = "gridtune.tcss"
    TITLE = "gridtune"
    COMMANDS = App.COMMANDS | {GridtuneCommands}
    COMMAND_PALETTE_DISPLAY = "^p"
    BINDINGS = [
        *(
            # priority: a focused TextArea binds f6 (select line); section keys must win.
            Binding(s.key, f"section('{s.mode}')", s.title, id=f"section.{s.mode}", group=_SCREENS,
                    priority=True)
            for s in SECTIONS
        ),
        Binding("question_mark", "help", "help", key_display="?", id="app.help"),
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
        self._status_dirty = True
        self._data_version: int | None = None
        self.sections: dict[str, Section] = {}
        for section in SECTIONS:
            cls = section_class(section)
            if cls is None:
                continue
            self.sections[section.mode] = section
            self.add_mode(section.mode, self._factory(cls))

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
        # The first count waits a moment: the opening screen's own queries go first.
        self.set_timer(0.5, self.refresh_status)
        self.set_interval(STATUS_INTERVAL_S, self.refresh_status)

    def on_unmount(self) -> None:
        self.ctx.close()

    def _natural_start(self) -> str:
        """Open where the loop stands: a run in progress, else review once there is
        something to grade, else the grid (a new project starts there)."""
        store = self.ctx.store
        if store.active_run() is not None:
            return "generate"
        return "review" if store.has_done() else "grid"

    # -- status line ---------------------------------------------------------
    def mark_changed(self) -> None:
        """A screen changed the project: recount on the next tick."""
        self._status_dirty = True

    @work(thread=True, exclusive=True, group="status", exit_on_error=False)
    def refresh_status(self) -> None:
        store = self.ctx.store
        version = store.data_version()
        if not self._status_dirty and version == self._data_version:
            return  # nothing changed since the last count: no query, no repaint
        self._status_dirty = False
        self._data_version = version
        c = store.status_counts()
        text = f"{c.cells:,} cells · {c.done:,} done · {c.failed:,} failed · {c.graded:,} graded"
        if c.pending or c.running:
            text += f" · {c.pending + c.running:,} to do"
        self.call_from_thread(setattr, self, "status_counts", text)

    @work(thread=True, exclusive=True, group="backend", exit_on_error=False)
    def _load_backend_label(self) -> None:
        label = self.ctx.backend_label()
        self.call_from_thread(setattr, self, "backend_label", label)

    # -- actions ---------------------------------------------------------------
    def action_section(self, mode: str) -> None:
        if mode in self.sections and mode != self.current_mode:
            self.switch_mode(mode)

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
        """Quit, but not past unsaved grid edits without asking (runs and jobs go on
        by themselves; only the grid editor holds work that is not in the file)."""
        try:
            grid = self.get_screen_stack("grid")[0] if "grid" in self.sections else None
        except (KeyError, IndexError):
            grid = None  # the grid screen was never opened: nothing unsaved
        if grid is None or not getattr(grid, "dirty", False) or isinstance(self.screen, ConfirmModal):
            self.exit()
            return

        def answer(quit_anyway: bool | None) -> None:
            if quit_anyway:
                self.exit()

        self.push_screen(ConfirmModal("The grid has unsaved edits. Quit without saving them?",
                                      title="Unsaved grid"), answer)

    def open_playground(self, model: str | None = None, stop: list[str] | None = None) -> None:
        """Switch to the playground, preset with a model (the tuned one) and stop sequences."""
        if "playground" not in self.sections:
            self.notify("the playground is not available", severity="warning")
            return
        self.switch_mode("playground")
        screen = self.screen
        for name in ("preset", "set_preset"):
            preset = getattr(screen, name, None)
            if callable(preset):
                preset(model=model, stop=stop)
                return


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
