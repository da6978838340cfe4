"""`?`: the keys of the screen below, with what they do (focused widget first)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static


def binding_rows(screen: Screen) -> list[tuple[str, str]]:
    """(keys, description) for every described binding active on ``screen``."""
    rows: dict[str, list[str]] = {}
    order: list[str] = []
    app = screen.app

    def rank(item) -> int:
        node, binding = item[1].node, item[1].binding
        if binding.id is None:
            return 3  # Textual's defaults (focus, copy) after gridtune's own keys
        return 0 if node is screen else 2 if node is app else 1

    for _key, active in sorted(screen.active_bindings.items(), key=rank):
        binding = active.binding
        if not binding.description or binding.system:
            continue
        if type(active.node).__module__.startswith("textual."):
            continue  # Textual's own defaults (scrolling, focus, copy): noise here
        what = binding.tooltip or binding.description  # the footer has the short words
        if binding.action == "section" or binding.action.startswith("section("):
            what = f"go to {binding.description}"
        display = app.get_key_display(binding)
        if what not in rows:
            rows[what] = []
            order.append(what)
        if display not in rows[what]:
            rows[what].append(display)
    return [(" ".join(rows[w]), w) for w in order]


class HelpScreen(ModalScreen[None]):
    """The focused screen's keys; escape, q or ? closes it."""

    CSS_PATH = "help.tcss"
    BINDINGS = [
        Binding("escape,q,question_mark", "dismiss", "close", key_display="esc", id="help.close"),
    ]

    def __init__(self, below: Screen):
        super().__init__()
        self.rows = binding_rows(below)
        self.below_title = getattr(below, "HELP_TITLE", type(below).__name__.removesuffix("Screen"))
        self.below_help = getattr(below, "HELP", "")

    def compose(self) -> ComposeResult:
        text = Text()
        width = max((len(k) for k, _ in self.rows), default=4)
        for keys, what in self.rows:
            text.append(f"{keys:>{width}}", "bold")
            text.append(f"  {what}\n")
        text.append(f"{'^p':>{width}}", "bold")
        text.append("  command palette: every section and action by name\n")
        with VerticalScroll(id="help-body") as body:
            body.border_title = f"{self.below_title} — keys"
            body.border_subtitle = "esc close"
            if self.below_help:
                yield Static(self.below_help, id="help-intro")
            yield Static(text, id="help-keys")
