"""A piece of text that repaints only when what it says changes."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class Line(Widget):
    """A line (or a few) of rich text held in a reactive: setting ``text`` to what it
    already shows costs nothing, so a screen can set every line on every poll and
    only the changed ones are repainted (over SSH, that is the whole saving)."""

    DEFAULT_CSS = """
    Line {
        height: auto;
    }
    """

    text: reactive[Text | str] = reactive("", layout=True)

    def __init__(self, text: Text | str = "", *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.set_reactive(Line.text, text)

    def render(self) -> Text | str:
        return self.text
