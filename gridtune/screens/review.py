"""The review screen: grade every completion from the keyboard, fast at 100,000 rows.

The list (``ReviewList``) draws only visible lines from light rows; the selected
completion is shown in full beside it. Every change goes through
``gridtune.pipeline`` in a single writer thread, in the order the keys were
pressed, while the screen updates only what changed: the graded row, the counts.
"""

from __future__ import annotations

import queue
from typing import Any, Callable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, WorkerState, get_current_worker

from ..pipeline import review
from ..pipeline.review import Filter, ReviewCounts, UndoStack
from ..tui.context import ProjectContext
from ..tui.section import SectionScreen
from ..tui.widgets import LengthHistogram, StatusLine
from ..tui.widgets.modals import ConfirmModal, EditModal, GradePickModal
from .review_list import ReviewList, Row

_GRADE_KEYS = Binding.Group("grade", compact=True)
DETAIL_DELAY_S = 0.06


class JobDone(Message):
    """The writer thread finished a job; ``callback(result)`` runs on the UI thread."""

    def __init__(self, callback: Callable[[Any], None] | None, result: Any, error: BaseException | None = None):
        super().__init__()
        self.callback = callback
        self.result = result
        self.error = error


class ReviewScreen(SectionScreen):
    MODE = "review"
    """Grade, reject, edit, auto-grade and drop completions."""

    CSS_PATH = "review.tcss"
    HELP_TITLE = "Review"
    HELP = ("Grade each completion 1–5 (the cursor moves on); 0 or d rejects it. Sorted by length, shortest "
            "first: length is the cheap proxy for detail. a grades everything no person graded by length "
            "quintile; x rejects everything at or below a grade. u undoes, also bulk changes.")
    BINDINGS = [
        *(Binding(str(g), f"grade({g})", f"grade {g}", id=f"review.grade{g}", group=_GRADE_KEYS) for g in range(1, 6)),
        Binding("0,d", "grade(0)", "reject", key_display="d", id="review.reject"),
        Binding("u", "undo", "undo", id="review.undo"),
        Binding("e", "edit", "edit", id="review.edit"),
        Binding("a", "auto_grade", "auto", tooltip="auto-grade by length", id="review.auto"),
        Binding("x", "drop", "drop", tooltip="drop everything at or below a grade", id="review.drop"),
        # The view keys are named in the view bar above the list, so the footer has
        # room for the section keys at 80 columns.
        Binding("slash", "search", "search", key_display="/", show=False, id="review.search"),
        Binding("f", "cycle_filter", "filter", show=False, id="review.filter"),
        Binding("s", "cycle_sort", "sort", show=False, id="review.sort"),
        Binding("r", "reverse", "reverse", show=False, id="review.reverse"),
        Binding("escape", "clear_search", "clear search", show=False, id="review.clear_search"),
    ]

    def __init__(self, ctx: ProjectContext):
        super().__init__(ctx)
        self.filter: Filter = review.FILTERS[0]
        self.sort = "length"
        self.descending = False
        self.search = ""
        self.counts = ReviewCounts()
        self.undo_stack = UndoStack()
        self._jobs: queue.Queue[tuple[Callable[[], Any], Callable[[Any], None] | None] | None] = queue.Queue()
        self._detail_id: int | None = None
        self._detail_timer = None
        self._shown: dict[str, str] = {}

    # -- layout ------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusLine()
        with Horizontal(classes="info-bar"):
            yield Static("", id="review-view")
            yield Static("", id="review-counts")
        yield LengthHistogram(id="review-histogram")
        with Horizontal(id="review-body"):
            yield ReviewList(self.ctx.store.review_previews, id="review-list")
            with VerticalScroll(id="review-detail"):
                yield Static("", id="review-detail-head")
                yield Static("", id="review-detail-text")
        yield Input(placeholder="search text and values, enter to apply, esc to clear", id="review-search")
        yield Footer(compact=True)

    @property
    def list(self) -> ReviewList:
        return self.query_one(ReviewList)

    def on_mount(self) -> None:
        self.query_one("#review-detail").border_title = "completion"
        self._writer()
        self.reload(histogram=True)
        self.list.focus()

    def on_unmount(self) -> None:
        self._jobs.put(None)

    # -- the writer: one thread, jobs in key order ----------------------------------
    def pending_jobs(self) -> int:
        """Changes not yet written to the project file (for tests and the benchmark)."""
        return self._jobs.unfinished_tasks

    def submit(self, job: Callable[[], Any], done: Callable[[Any], None] | None = None) -> None:
        self._jobs.put((job, done))

    @work(thread=True, group="review-writer", exit_on_error=False)
    def _writer(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                item = self._jobs.get(timeout=0.25)
            except queue.Empty:
                continue
            if item is None:
                self._jobs.task_done()
                return
            job, done = item
            try:
                result = job()
            except Exception as exc:  # noqa: BLE001 - reported on the screen, never a crash
                self.post_message(JobDone(None, None, exc))
            else:
                self.post_message(JobDone(done, result))
            finally:
                self._jobs.task_done()

    @on(JobDone)
    def _job_done(self, message: JobDone) -> None:
        if message.error is not None:
            self.notify(f"{message.error}", title="could not save", severity="error")
            self.reload()
            return
        self.changed("grades")
        if message.callback is not None:
            message.callback(message.result)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.group in ("rows", "detail"):
            self.notify(str(event.worker.error), title="review", severity="error")

    # -- rows, counts, histogram ------------------------------------------------------
    def refresh_from_project(self, what: frozenset[str]) -> None:
        if what != {"grades"}:  # the screen's own grades are already shown row by row
            self.reload(histogram=True)

    def reload(self, histogram: bool = False) -> None:
        current = self.list.current
        self._load_rows(self.filter, self.search, self.sort, self.descending,
                        current[0] if current else None, histogram)

    @work(thread=True, exclusive=True, group="rows", exit_on_error=False)
    def _load_rows(self, filt: Filter, search: str, sort: str, descending: bool,
                   keep_id: int | None, histogram: bool) -> None:
        store = self.ctx.store
        worker = get_current_worker()
        rows = review.rows(store, filt, search, sort, descending)
        if worker.is_cancelled:
            return
        self.app.call_from_thread(self._rows_loaded, rows, keep_id)  # the list first, then the rest
        counts = ReviewCounts.from_store(store)
        if worker.is_cancelled:
            return
        self.app.call_from_thread(self._counts_loaded, counts)
        if histogram:
            lengths = store.done_lengths()
            self.app.call_from_thread(self.query_one(LengthHistogram).set_lengths, lengths)

    def _rows_loaded(self, rows: list[Row], keep_id: int | None) -> None:
        self.list.set_rows(rows, keep_id)
        self._show_bar()

    def _counts_loaded(self, counts: ReviewCounts) -> None:
        self.counts = counts
        self._show_bar()

    def _set_text(self, selector: str, text: str | Text) -> None:
        """Update a Static only when its text changed (no needless repaint over SSH)."""
        key = str(text) if isinstance(text, str) else text.markup
        if self._shown.get(selector) != key:
            self._shown[selector] = key
            self.query_one(selector, Static).update(text)

    def _show_bar(self) -> None:
        arrow = "↓" if self.descending else "↑"
        sort = dict(review.SORTS)[self.sort]
        # Each part of the view is labelled with the key that changes it.
        view = Text.assemble(("s", "bold"), f" {sort} ", ("r", "bold"), f" {arrow} · ",
                             ("f", "bold"), f" {self.filter.label} · ", ("/", "bold"),
                             f" “{self.search}”" if self.search else " search")
        self._set_text("#review-view", view)
        rows = f"{len(self.list.rows):,} rows"
        if self.list.border_title != rows:
            self.list.border_title = rows
        self._set_text("#review-counts", self.counts.text())

    # -- the detail pane -------------------------------------------------------------
    @on(ReviewList.Highlighted)
    def _highlighted(self, event: ReviewList.Highlighted) -> None:
        row_id = event.row[0] if event.row else None
        if row_id == self._detail_id:
            return
        self._detail_id = row_id
        if self._detail_timer is not None:
            self._detail_timer.stop()
        self._detail_timer = self.set_timer(DETAIL_DELAY_S, self._show_detail)

    def _show_detail(self, force: bool = False) -> None:
        self._detail_timer = None
        if self._detail_id is None:
            self._set_text("#review-detail-head", Text("nothing to show with this filter", style="dim"))
            self._set_text("#review-detail-text", "")
            return
        self._load_detail(self._detail_id)

    @work(thread=True, exclusive=True, group="detail", exit_on_error=False)
    def _load_detail(self, completion_id: int) -> None:
        store = self.ctx.store
        record = store.get_completion(completion_id)
        history = store.grade_history(completion_id)
        if record is None or get_current_worker().is_cancelled:
            return
        head, body = detail_texts(record, history)
        self.app.call_from_thread(self._detail_loaded, completion_id, head, body)

    def _detail_loaded(self, completion_id: int, head: Text, body: Text) -> None:
        if completion_id != self._detail_id:
            return
        self._set_text("#review-detail-head", head)
        self._set_text("#review-detail-text", body)
        self.query_one("#review-detail", VerticalScroll).scroll_home(animate=False)

    def _refresh_detail(self, completion_id: int) -> None:
        if completion_id == self._detail_id:
            self._load_detail(completion_id)

    # -- grading -------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("grade", "edit"):
            row = self.list.current if self.is_mounted else None
            return None if row is None or row[3] != "done" else True
        if action == "undo":
            return True if len(self.undo_stack) else None
        if action == "clear_search":
            return bool(self.search)
        return True

    def action_grade(self, grade: int) -> None:
        lst = self.list
        index, row = lst.cursor, lst.current
        if row is None or row[3] != "done":
            return
        row_id, length, old, status = row
        lst.update_row(index, (row_id, length, grade, status))
        self.counts.change(old, grade)
        self._show_bar()
        had_undo = bool(self.undo_stack)
        self.undo_stack.push([row_id], f"grade {grade}")
        if not had_undo:
            self.refresh_bindings()
        store = self.ctx.store
        self.submit(lambda: store.set_grade(row_id, grade, "person"),
                    lambda _result: self._refresh_detail(row_id))
        lst.action_move(1)

    def action_undo(self) -> None:
        entry = self.undo_stack.pop()
        if entry is None:
            self.notify("nothing to undo")
            return
        if not self.undo_stack:
            self.refresh_bindings()
        store = self.ctx.store
        if len(entry.ids) == 1:
            row_id = entry.ids[0]
            self.submit(lambda: review.undo(store, entry), lambda grades: self._undone_one(row_id, grades[0]))
        else:
            self.notify(f"undoing {entry.label} ({len(entry.ids):,} completions)…")
            self.submit(lambda: review.undo(store, entry), lambda _g: self._undone_bulk(entry.label))

    def _undone_one(self, row_id: int, grade: int | None) -> None:
        lst = self.list
        index = lst.index_of(row_id)
        if index is not None:
            rid, length, old, status = lst.rows[index]
            lst.update_row(index, (rid, length, grade, status))
            self.counts.change(old, grade)
            self._show_bar()
            lst.set_cursor(index)
        self._refresh_detail(row_id)

    def _undone_bulk(self, label: str) -> None:
        self.notify(f"undid {label}")
        self.reload()
        if self._detail_id is not None:
            self._refresh_detail(self._detail_id)

    # -- edit ---------------------------------------------------------------------------------
    def action_edit(self) -> None:
        row = self.list.current
        if row is None or row[3] != "done":
            return
        self._open_editor(row[0])

    @work(thread=True, group="edit-load", exit_on_error=False)
    def _open_editor(self, row_id: int) -> None:
        record = self.ctx.store.get_completion(row_id)
        if record is not None:
            self.app.call_from_thread(self._push_editor, row_id, record.text or "")

    def _push_editor(self, row_id: int, text: str) -> None:
        def saved(new_text: str | None) -> None:
            if new_text is None or new_text == text:
                return
            store = self.ctx.store
            self.submit(lambda: store.edit_text(row_id, new_text), lambda _r: self._edited(row_id, len(new_text)))

        self.app.push_screen(EditModal(text, title=f"Edit completion #{row_id}"), saved)

    def _edited(self, row_id: int, length: int) -> None:
        lst = self.list
        index = lst.index_of(row_id)
        if index is not None:
            rid, _length, grade, status = lst.rows[index]
            lst.forget_preview(row_id)
            lst.update_row(index, (rid, length, grade, status))
        self.notify("edit saved; the model's text is kept")
        self._refresh_detail(row_id)
        self._refresh_histogram()

    @work(thread=True, exclusive=True, group="histogram", exit_on_error=False)
    def _refresh_histogram(self) -> None:
        lengths = self.ctx.store.done_lengths()
        self.app.call_from_thread(self.query_one(LengthHistogram).set_lengths, lengths)

    # -- bulk: auto-grade, drop ------------------------------------------------------------------
    def action_auto_grade(self) -> None:
        self.notify("grading by length…")
        store = self.ctx.store
        self.submit(lambda: review.auto_grade(store), self._auto_graded)

    def _auto_graded(self, outcome: tuple[Any, list[int]]) -> None:
        result, changed = outcome
        had_undo = bool(self.undo_stack)
        self.undo_stack.push(changed, "auto-grade")
        if not had_undo and changed:
            self.refresh_bindings()
        self.notify(result.summary(), title="auto-grade", timeout=6)
        self.reload()
        if self._detail_id is not None:
            self._refresh_detail(self._detail_id)

    def action_drop(self) -> None:
        def picked(grade: int | None) -> None:
            if grade is not None:
                self._count_drop(grade)

        self.app.push_screen(
            GradePickModal("Reject everything graded at or below which grade? (1–5)", title="Drop"), picked
        )

    @work(thread=True, group="drop-count", exit_on_error=False)
    def _count_drop(self, grade: int) -> None:
        n = len(self.ctx.store.ids_at_or_below(grade))
        self.app.call_from_thread(self._confirm_drop, grade, n)

    def _confirm_drop(self, grade: int, n: int) -> None:
        if n == 0:
            self.notify(f"nothing is graded 1–{grade}")
            return
        band = "1" if grade == 1 else f"1–{grade}"

        def answered(yes: bool | None) -> None:
            if yes:
                store = self.ctx.store
                self.submit(lambda: review.drop(store, grade), lambda ids: self._dropped(grade, ids))

        self.app.push_screen(
            ConfirmModal(f"Reject {n:,} completion(s) graded {band}? They stay in the project "
                         f"(u undoes this) but are never exported.", title="Drop"),
            answered,
        )

    def _dropped(self, grade: int, ids: list[int]) -> None:
        had_undo = bool(self.undo_stack)
        self.undo_stack.push(ids, f"drop ≤ {grade}")
        if not had_undo and ids:
            self.refresh_bindings()
        self.notify(f"rejected {len(ids):,} completion(s) graded at or below {grade}")
        self.reload()

    # -- view: filter, sort, search ----------------------------------------------------------------
    def action_cycle_filter(self) -> None:
        self.filter = review.next_filter(self.filter.key)
        self.reload()

    def set_filter(self, key: str) -> None:
        self.filter = review.filter_by_key(key)
        self.reload()

    def action_cycle_sort(self) -> None:
        self.sort = review.next_sort(self.sort)
        self.descending = False
        self.reload()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.reload()

    def action_search(self) -> None:
        box = self.query_one("#review-search", Input)
        box.value = self.search
        box.add_class("-open")
        box.focus()

    @on(Input.Submitted, "#review-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.search = event.value.strip()
        event.input.remove_class("-open")
        self.list.focus()
        self.refresh_bindings()
        self.reload()

    def action_clear_search(self) -> None:
        box = self.query_one("#review-search", Input)
        was_open = box.has_class("-open")
        box.remove_class("-open")
        self.list.focus()
        if self.search:
            self.search = ""
            self.refresh_bindings()
            self.reload()
        elif not was_open:
            return

    def on_key(self, event) -> None:
        # escape inside the search box closes it without changing the search
        if event.key == "escape" and self.focused is self.query_one("#review-search", Input):
            event.stop()
            self.query_one("#review-search", Input).remove_class("-open")
            self.list.focus()


def detail_texts(record, history) -> tuple[Text, Text]:
    """The detail pane's header and body for one completion (no UI state)."""
    head = Text()
    grade = record.grade
    if record.status != "done":
        head.append(f"#{record.id} {record.status}", "bold")
    elif grade is None:
        head.append(f"#{record.id} ungraded", "bold")
    elif grade == 0:
        head.append(f"#{record.id} rejected", "bold red")
    else:
        head.append(f"#{record.id} grade {grade}", "bold")
        head.append(f" ({record.grade_source})", "dim")
    if record.length is not None:
        head.append(f" · {record.length:,} chars")
    if record.edited:
        head.append(" · edited", "italic")
    head.append("\n")
    for name, value in record.values.items():
        head.append(f"{name}: ", "dim")
        head.append(f"{value}\n")
    meta = []
    if record.model:
        meta.append(record.model)
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        meta.append(f"{record.prompt_tokens or 0}+{record.completion_tokens or 0} tokens")
    if record.finish_reason:
        meta.append(f"finish {record.finish_reason}")
    if record.sample:
        meta.append(f"sample {record.sample + 1}")
    if meta:
        head.append(" · ".join(meta) + "\n", "dim")
    if history:
        parts = []
        for g in reversed(history):
            part = f"{g.grade} {g.source}"
            parts.append(f"({part}, undone)" if g.undone else part)
        head.append("grades: " + ", ".join(parts[:6]) + ("…" if len(parts) > 6 else "") + "\n", "dim")
    if record.status == "failed" and record.error:
        head.append(f"error: {record.error}\n", "red")
    body = Text(record.text or "")
    return head, body
