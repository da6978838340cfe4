"""The command palette (ctrl+p): every section and every action of every section, by name.

Actions are read from each screen class's BINDINGS (their descriptions are their
names), so a new key on a screen is a new palette command with no extra code.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider

# Keys that only make sense inside a widget (moving a cursor), not as commands.
_SKIP_ACTIONS = {"cursor_up", "cursor_down", "page_up", "page_down", "first", "last", "scroll_home", "scroll_end"}


def _palette_bindings(cls: type) -> Iterator[Binding]:
    seen: set[str] = set()
    for binding in Binding.make_bindings(getattr(cls, "BINDINGS", [])):
        if not binding.description or binding.action in seen or binding.action in _SKIP_ACTIONS:
            continue
        seen.add(binding.action)
        yield binding


class GridtuneCommands(Provider):
    """Sections and their actions."""

    def _commands(self) -> Iterator[tuple[str, object, str]]:
        app: Any = self.app  # GridtuneApp, whose App.COMMANDS holds this provider (it imports this module)
        sections = app.sections  # this provider is GridtuneApp's (App.COMMANDS)
        for mode, section in sections.items():
            yield f"{section.title}: open", partial(app.action_section, mode), f"{section.key.upper()}"
        for mode, section in sections.items():
            for binding in _palette_bindings(section.screen):
                help_text = f"{app.get_key_display(binding)} in {section.title}"
                yield (
                    f"{section.title}: {binding.tooltip or binding.description}",
                    partial(_run_in_section, app, mode, binding.action),
                    help_text,
                )
        yield "Help: keys of this screen", app.action_help, "?"
        yield "Quit", app.action_quit, "q"

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)  # type: ignore[arg-type]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)  # type: ignore[arg-type]


async def _run_in_section(app: Any, mode: str, action: str) -> None:
    """Open the section, then run the action on its screen."""
    if app.current_mode != mode:
        await app.switch_mode(mode)
    await app.screen.run_action(action)
