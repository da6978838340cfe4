"""The messages screens and the app exchange: one data flow, no duck typing.

A screen asks ``pipeline`` to change the project, then posts ``ProjectChanged``
naming what changed. The message bubbles to the app, which recounts the status
line and tells every other section screen; each screen refreshes what it shows
from the store. Changes by another process (a detached run, the CLI) reach the
app through its poll of the file's ``data_version`` and go out as "external".
"""

from __future__ import annotations

from textual.message import Message

# The parts of a project a change can touch ("eval": the evaluation set and its
# answers). "external" means another process wrote to the file: it may be any of them.
PARTS = frozenset({"grid", "completions", "grades", "runs", "exports", "jobs", "settings", "eval", "external"})


class ProjectChanged(Message):
    """The project file changed; ``what`` names the parts (see ``PARTS``)."""

    def __init__(self, *what: str, forwarded: bool = False) -> None:
        super().__init__()
        unknown = set(what) - PARTS
        if unknown:  # a typo here would silently refresh nothing
            raise ValueError(f"unknown project part(s): {', '.join(sorted(unknown))}")
        self.what: frozenset[str] = frozenset(what) or frozenset({"external"})
        self.forwarded = forwarded  # the app's copy for another screen: the app ignores it

    def touches(self, *parts: str) -> bool:
        """Whether this change may affect any of ``parts``."""
        return "external" in self.what or not self.what.isdisjoint(parts)


class OpenPlayground(Message):
    """Ask the app to open the playground on ``model`` (None: keep its choice).

    The playground takes its format, separator and stop from the latest export
    itself; ``model`` only says which tuned model to put beside the base one.
    """

    def __init__(self, model: str | None = None, *, forwarded: bool = False) -> None:
        super().__init__()
        self.model = model
        self.forwarded = forwarded  # the app's copy for the playground: the app ignores it
