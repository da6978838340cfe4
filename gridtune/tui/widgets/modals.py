"""Small modal screens shared by the screens: confirm, pick a grade, ask a line, edit a text."""

from __future__ import annotations

from typing import TypeVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static, TextArea

T = TypeVar("T")


class _QuestionModal(ModalScreen[T]):
    """A question in a box, answered by one key; subclasses give the keys and their hint."""

    KEYS_HINT = ""
    DEFAULT_TITLE = ""

    def __init__(self, question: str, title: str | None = None):
        super().__init__()
        self.question = question
        self.title_text = title or self.DEFAULT_TITLE

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal-box") as box:
            box.border_title = self.title_text
            box.border_subtitle = self.KEYS_HINT
            yield Static(self.question)


class ConfirmModal(_QuestionModal[bool]):
    """A question answered with y (yes) or n / escape (no)."""

    KEYS_HINT = "y yes · n no"
    DEFAULT_TITLE = "Confirm"
    BINDINGS = [
        Binding("y", "answer(True)", "yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "no", key_display="n", id="confirm.no"),
    ]

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class GradePickModal(_QuestionModal["int | None"]):
    """Pick a grade with one key 1–5 (escape: none)."""

    KEYS_HINT = "1–5 pick · esc cancel"
    DEFAULT_TITLE = "Grade"
    BINDINGS = [
        *(Binding(str(g), f"pick({g})", str(g), show=False, id=f"pick.{g}") for g in range(1, 6)),
        Binding("escape", "pick(None)", "cancel", id="pick.cancel"),
    ]

    def action_pick(self, grade: int | None) -> None:
        self.dismiss(grade)


class AskModal(ModalScreen[str | None]):
    """One line of text: enter accepts, escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel", id="ask.cancel")]

    def __init__(self, question: str, value: str = "", title: str = "", placeholder: str = ""):
        super().__init__()
        self.question = question
        self.value = value
        self.title_text = title
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal-box") as box:
            box.border_title = self.title_text
            box.border_subtitle = "enter ok · esc cancel"
            yield Static(self.question)
            yield Input(self.value, placeholder=self.placeholder, id="ask-input")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class EditModal(ModalScreen[str | None]):
    """Edit a text in a TextArea: ctrl+s saves, escape cancels."""

    BINDINGS = [
        Binding("ctrl+s", "save", "save", id="edit.save", priority=True),
        Binding("escape", "cancel", "cancel", id="edit.cancel"),
    ]
    DEFAULT_CSS = """
    EditModal .modal-box { width: 100%; height: 100%; }
    EditModal TextArea { height: 1fr; }
    """

    def __init__(self, text: str, title: str = "Edit"):
        super().__init__()
        self.text = text
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal-box") as box:
            box.border_title = self.title_text
            box.border_subtitle = "ctrl+s save · esc cancel"
            yield TextArea(self.text, soft_wrap=True, id="edit-text")

    def action_save(self) -> None:
        self.dismiss(self.query_one("#edit-text", TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)
