"""The two-line status line every screen shows on top.

Line 1: the sections and their keys (the current one highlighted), the project.
Line 2: the project's counts and the backend. Values come from the app's
reactives; the line repaints only when one of them changes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from rich.text import Text
from textual.widget import Widget


@runtime_checkable
class SectionsHost(Protocol):
    """What the status line shows of its app: GridtuneApp (which imports this module,
    so it is named here by what it offers, not imported)."""

    sections: dict[str, Any]
    ctx: Any
    status_counts: str
    backend_label: str


class StatusLine(Widget):
    DEFAULT_CSS = """
    StatusLine { height: 2; dock: top; }
    """
    COMPONENT_CLASSES = {"status-line--tab", "status-line--current", "status-line--key", "status-line--dim"}

    def __init__(self, mode: str | None = None) -> None:
        super().__init__()
        self.mode = mode  # the section whose screen shows this line, highlighted

    def _gridtune_app(self) -> SectionsHost | None:
        return self.app if isinstance(self.app, SectionsHost) else None

    def on_mount(self) -> None:
        app = self._gridtune_app()
        if app is not None:  # a screen hosted alone (a test) has no status line to show
            for name in ("status_counts", "backend_label"):
                self.watch(app, name, self._changed, init=False)

    def _changed(self, _value: object = None) -> None:
        self.refresh()

    def render(self) -> Text:
        app = self._gridtune_app()
        if app is None:
            return Text()
        width = self.size.width
        sections = app.sections
        mine = self.mode
        key_style = self.get_component_rich_style("status-line--key")
        tab_style = self.get_component_rich_style("status-line--tab")
        cur_style = self.get_component_rich_style("status-line--current")
        dim = self.get_component_rich_style("status-line--dim")
        line1 = Text(no_wrap=True, overflow="ellipsis")
        for mode, section in sections.items():
            style = cur_style if mode == mine else tab_style
            line1.append(f" {section.key.upper()}", key_style if mode != mine else cur_style)
            line1.append(f" {section.title} ", style)
        project = app.ctx.name
        room = width - line1.cell_len - 1
        if project and room > 4:
            name = project if len(project) <= room else project[: room - 1] + "…"
            line1.append(" " * (room - len(name)) + name + " ", "bold")
        counts = app.status_counts or "…"
        backend = app.backend_label
        line2 = Text(no_wrap=True, overflow="ellipsis")
        line2.append(f" {counts}")
        room = width - line2.cell_len - 3
        label = fit_backend_label(backend, room)
        if label:
            line2.append(" " * (room - len(label) + 2) + label, dim)
        line1.truncate(width)
        line2.truncate(width)
        return Text("\n").join([line1, line2])


def fit_backend_label(label: str, room: int) -> str:
    """The backend label in at most ``room`` cells, shortened the way a person still
    reads it: no scheme first, then "local" for the local server, then the middle
    elided (the port at the end is what tells two servers apart)."""
    if room < 6 or not label:
        return ""
    for candidate in (label, label.replace("http://", "").replace("https://", "")):
        if len(candidate) <= room:
            return candidate
    short = candidate.replace("local server ", "local ")
    forms = (short, short.replace("(starts on demand)", "(not started)"), short.replace("(starts on demand)", "(off)"))
    for form in forms:
        if len(form) <= room:
            return form
    host, sep, port = short.rpartition(":")
    if sep and port.isdigit() and short.startswith("local ") and len(port) + 7 <= room:
        return f"local :{port}"
    keep = room - 1
    return short[: keep - keep // 2] + "…" + short[len(short) - keep // 2:]
