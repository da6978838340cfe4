"""`?`: the keys of the screen below, with what they do (focused widget first)."""

from __future__ import annotations

import dataclasses

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

PALETTE_LINE = ("^p", "command palette: every section and action by name")


def binding_rows(screen: Screen) -> list[tuple[str, str, bool]]:
    """(keys, description, available now) for every described binding of ``screen``
    and the widgets and app above it: a key that does nothing at the moment (f with
    no export to train on) is listed too, marked not available, so help shows every
    key the screen has."""
    rows: dict[str, list[str]] = {}
    available: dict[str, bool] = {}
    order: list[str] = []
    app = screen.app

    def rank(item) -> int:
        node, binding = item[0], item[1]
        if binding.id is None:
            return 3  # Textual's defaults (focus, copy) after gridtune's own keys
        return 0 if node is screen else 2 if node is app else 1

    found: list[tuple[object, Binding, bool]] = []
    seen_keys: set[str] = set()
    for namespace, bindings in _binding_chain(screen):
        for key, binding in bindings:
            state = app._check_action_state(binding.action, namespace)
            if key in seen_keys and state is not False:
                continue  # bound nearer the focus: that one is the key's meaning
            if state is not False:
                seen_keys.add(key)
            found.append((namespace, binding, bool(state)))
    for namespace, binding, enabled in sorted(found, key=rank):
        if not binding.description or binding.system:
            continue
        if type(namespace).__module__.startswith("textual."):
            continue  # Textual's own defaults (scrolling, focus, copy): noise here
        if binding.action == "command_palette":
            continue  # said once, at the end, in words
        what = binding.tooltip or binding.description  # the footer has the short words
        if binding.action == "section" or binding.action.startswith("section("):
            what = f"go to {binding.description}"
        # Each key of a "0,d" binding as itself (the footer shows one: its key_display).
        display = app.get_key_display(dataclasses.replace(binding, key_display=None))
        if what not in rows:
            rows[what] = []
            order.append(what)
        available[what] = available.get(what, False) or enabled
        if display not in rows[what]:
            rows[what].append(display)
    return [(" ".join(rows[w]), w, available[w]) for w in order]


def _binding_chain(screen: Screen):
    """(node, [(key, binding)]) from the focused widget up to the app, as Textual
    resolves keys (every binding, whether or not its action is available now)."""
    chain = getattr(screen, "_modal_binding_chain", None)
    if chain is not None:
        return chain
    return [(a.node, [(k, a.binding)]) for k, a in screen.active_bindings.items()]  # pragma: no cover


class HelpScreen(ModalScreen[None]):
    """The focused screen's keys; escape, q or ? closes it."""

    CSS_PATH = "help.tcss"
    BINDINGS = [
        Binding("escape,q,question_mark", "dismiss", "close", key_display="esc", id="help.close"),
    ]

    def __init__(self, below: Screen):
        super().__init__()
        self.rows = binding_rows(below)
        title = getattr(below, "HELP_TITLE", "") or type(below).__name__.removesuffix("Screen")
        self.below_title = title
        self.below_help = getattr(below, "HELP", "")

    def compose(self) -> ComposeResult:
        text = Text()
        rows = [*self.rows, (*PALETTE_LINE, True)]
        width = max(len(k) for k, _, _ in rows)
        for keys, what, now in rows:
            text.append(f"{keys:>{width}}", "bold" if now else "bold dim")
            text.append(f"  {what}\n" if now else f"  {what} (not now)\n", "" if now else "dim")
        with VerticalScroll(id="help-body") as body:
            body.border_title = f"{self.below_title} — keys"
            body.border_subtitle = "esc close"
            if self.below_help:
                yield Static(self.below_help, id="help-intro")
            yield Static(text, id="help-keys")
