"""The review list: one line per completion, drawn with the Line API.

Built like Toolong's log view: a ScrollView holding only light rows
(id, length, grade, status) and rendering the visible lines in ``render_line``;
no widget per row. Previews (the cell's values and the text's start) and the
curation marks (✂ cut off at max tokens, ≈N a near-duplicate group of N) are
fetched for the visible rows only, in a thread, and cached; ``refresh_previews``
fetches them again (the old ones stay drawn until the new ones arrive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.segment import Segment
from rich.style import Style
from textual import on, work
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ...pipeline.curation.review import ListPreview

Row = tuple[int, int, "int | None", str]  # id, length, grade, status
PreviewFetcher = Callable[[Sequence[int]], "dict[int, ListPreview]"]

_GRADE_CLASSES = {g: f"review-list--grade{g}" for g in range(0, 6)}
_PREVIEW_CACHE_MAX = 20_000


class ReviewList(ScrollView, can_focus=True):
    """The completions, one per line: grade, length, marks (✂ cut off, ≈N near-duplicates), preview."""

    COMPONENT_CLASSES = {
        "review-list--cursor", "review-list--length", "review-list--preview", "review-list--dim",
        "review-list--failed", "review-list--cut", "review-list--dup", *_GRADE_CLASSES.values(),
    }
    BINDINGS = [
        Binding("j,down", "move(1)", "down", show=False, id="review.down"),
        Binding("k,up", "move(-1)", "up", show=False, id="review.up"),
        Binding("pagedown,space", "page(1)", "page down", show=False, id="review.page_down"),
        Binding("pageup", "page(-1)", "page up", show=False, id="review.page_up"),
        Binding("home,g", "jump(0)", "first", show=False, id="review.first"),
        Binding("end,G", "jump(-1)", "last", show=False, id="review.last"),
    ]

    class Highlighted(Message):
        """The cursor moved to another row (or the rows changed)."""

        def __init__(self, index: int, row: Row | None):
            super().__init__()
            self.index = index
            self.row = row

    class PreviewsLoaded(Message):
        def __init__(self, previews: dict[int, ListPreview], generation: int):
            super().__init__()
            self.previews = previews
            self.generation = generation

    def __init__(self, fetch_previews: PreviewFetcher, *, id: str | None = None):
        super().__init__(id=id)
        self._fetch_previews = fetch_previews
        self.rows: list[Row] = []
        self.cursor = 0
        self._previews: dict[int, tuple[int, ListPreview]] = {}  # id -> (generation, preview)
        self._generation = 0  # previews of an older generation are drawn, and fetched again
        self._wanted: set[int] = set()
        self._inflight: set[int] = set()
        self._index: dict[int, int] | None = None
        self._styles: dict[str, Style] | None = None

    # -- data ----------------------------------------------------------------
    @property
    def current(self) -> Row | None:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def set_rows(self, rows: list[Row], keep_id: int | None = None) -> None:
        """Show new rows; the cursor stays on ``keep_id`` when it is still listed, on
        the same screen line (rows that arrive above it do not push it down)."""
        line = self.cursor - round(self.scroll_y)
        self.rows = rows
        self._index = None
        cursor = self.index_of(keep_id) if keep_id is not None else None
        if cursor is None:
            cursor = min(self.cursor, max(0, len(rows) - 1))
        self.virtual_size = Size(0, len(rows))
        self.cursor = cursor
        if keep_id is not None and 0 <= line < self.size.height:
            self.scroll_to(y=max(0, cursor - line), animate=False)
        self._scroll_to_cursor(center=True)
        self.refresh()
        self.post_message(self.Highlighted(self.cursor, self.current))

    def is_cut_off(self, row_id: int) -> bool:
        """Whether the row's preview (fetched once it was on view) marks it cut off."""
        shown = self._previews.get(row_id)
        return bool(shown and shown[1].cut_off)

    def index_of(self, row_id: int | None) -> int | None:
        if row_id is None:
            return None
        if self._index is None:
            self._index = {r[0]: i for i, r in enumerate(self.rows)}
        return self._index.get(row_id)

    def update_row(self, index: int, row: Row) -> None:
        """One row changed (a grade, a length): repaint that line only."""
        if 0 <= index < len(self.rows):
            self.rows[index] = row
            self.refresh_line(index)

    def forget_preview(self, row_id: int) -> None:
        self._previews.pop(row_id, None)
        index = self.index_of(row_id)
        if index is not None:
            self.refresh_line(index)

    def refresh_previews(self) -> None:
        """Texts or marks may have changed (a run, a redo, a dedup pass): fetch the
        visible rows' previews again, drawing the old ones meanwhile."""
        self._generation += 1
        self._inflight.clear()
        self.refresh()

    # -- cursor ----------------------------------------------------------------
    def set_cursor(self, index: int) -> None:
        if not self.rows:
            return
        index = max(0, min(len(self.rows) - 1, index))
        if index == self.cursor:
            return
        old, self.cursor = self.cursor, index
        self.refresh_line(old)
        self.refresh_line(index)
        self._scroll_to_cursor()
        self.post_message(self.Highlighted(index, self.current))

    def action_move(self, delta: int) -> None:
        self.set_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.set_cursor(self.cursor + direction * max(1, self.size.height - 1))

    def action_jump(self, where: int) -> None:
        self.set_cursor(0 if where == 0 else len(self.rows) - 1)

    def _scroll_to_cursor(self, center: bool = False) -> None:
        height = self.size.height
        if height <= 0:
            return
        top = round(self.scroll_y)
        if center and not (top <= self.cursor < top + height):
            self.scroll_to(y=max(0, self.cursor - height // 2), animate=False)
        elif self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False)

    # -- drawing -----------------------------------------------------------------
    def notify_style_update(self) -> None:
        self._styles = None
        super().notify_style_update()

    def _style(self, name: str) -> Style:
        if self._styles is None:
            self._styles = {c: self.get_component_rich_style(c) for c in self.COMPONENT_CLASSES}
        return self._styles[name]

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        index = round(self.scroll_y) + y
        if index >= len(self.rows):
            return Strip.blank(width, base)
        row_id, length, grade, status = self.rows[index]
        if status == "failed":
            mark, mark_style = " ! ", self._style("review-list--failed")
        elif status != "done":
            mark, mark_style = " … ", self._style("review-list--dim")
        elif grade is None:
            mark, mark_style = " · ", self._style("review-list--dim")
        elif grade == 0:
            mark, mark_style = " ✗ ", self._style("review-list--grade0")
        else:
            mark, mark_style = f" {grade} ", self._style(_GRADE_CLASSES[grade])
        length_text = f"{length:>7,} " if status == "done" else " " * 8
        entry = self._previews.get(row_id)
        if entry is None or entry[0] != self._generation:
            self._want(row_id)
        shown = entry[1] if entry is not None else ListPreview("")
        dup = f"≈{min(shown.dup_size, 99)}" if shown.dup_size else ""
        room = max(0, width - 3 - 8 - 4 - 1)
        preview = shown.text[:room].ljust(room)
        segments = [
            Segment(mark, base + mark_style),
            Segment(length_text, base + self._style("review-list--length")),
            Segment("✂" if shown.cut_off else " ", base + self._style("review-list--cut")),
            Segment(f"{dup:<3}", base + self._style("review-list--dup")),
            Segment(preview + " ", base + self._style("review-list--preview")),
        ]
        if index == self.cursor:
            cursor = self._style("review-list--cursor")
            segments = [Segment(s.text, (s.style or Style()) + cursor) for s in segments]
        return Strip(segments, width).crop(0, width)

    # -- previews, fetched for what is on screen -----------------------------------
    def _want(self, row_id: int) -> None:
        if row_id in self._inflight:
            return
        if not self._wanted:
            self.call_after_refresh(self._request_previews)
        self._wanted.add(row_id)

    def _request_previews(self) -> None:
        ids = list(self._wanted - self._inflight)
        self._wanted.clear()
        if ids:
            self._inflight.update(ids)
            self._load_previews(ids)

    @work(thread=True, group="previews", exit_on_error=False)
    def _load_previews(self, ids: list[int]) -> None:
        generation = self._generation
        previews = self._fetch_previews(ids)
        for cid in ids:
            previews.setdefault(cid, ListPreview(""))
        self.post_message(self.PreviewsLoaded(previews, generation))

    @on(PreviewsLoaded)
    def _previews_loaded(self, message: ReviewList.PreviewsLoaded) -> None:
        message.stop()
        if len(self._previews) > _PREVIEW_CACHE_MAX:
            self._previews.clear()
        self._previews.update((cid, (message.generation, p)) for cid, p in message.previews.items())
        self._inflight.difference_update(message.previews)
        self.refresh()
