"""The review screen: grade every completion from the keyboard, fast at 100,000 rows.

The list (``ReviewList``) draws only visible lines from light rows; the selected
completion is shown in full beside it. Every change goes through
``gridtune.pipeline.curation.review`` in a single writer thread, in the order the keys
were pressed, and is then announced with ``changed(...)``. The graded row and
the counts update at once; the counts are then recounted from the store, and
the rows, counts and histogram follow every other change to the project (a run,
another process) at most once a second, the cursor staying on its row.

Curation (issue 9) shows here too: the list marks cut-off completions (✂) and
near-duplicate groups (≈N), the curation bar counts them with the judge's
agreement, the detail says why, and keys redo with more max tokens (R one, C all
as a detached run), find (D) and drop (X) near-duplicates, jump to a twin (t),
open the coverage panel (v) and top it up (T, a detached run). Runs started here
are the generate screen's runs: it shows them.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.events import Key
from textual.message import Message
from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Input, Static
from textual.worker import get_current_worker

from ...core.errors import one_line
from ...pipeline.curation import review
from ...pipeline.curation.review import Filter, ReviewCounts, UndoStack
from ..context import ProjectContext
from ..section import SectionScreen
from ..throttle import Throttle
from ..widgets import LengthHistogram
from ..widgets.modals import AskModal, ConfirmModal, EditModal, GradePickModal
from .coverage_panel import CoveragePanel
from .review_list import ReviewList, Row

_GRADE_KEYS = Binding.Group("grade", compact=True)
DETAIL_DELAY_S = 0.06
RELOAD_INTERVAL_S = 1.0
"""At most one reload a second for changes the screen did not make row by row
(a run writing every second, another process): a 100,000-row project stays fast."""


class JobDone(Message):
    """The writer thread finished a job; ``callback(result)`` runs on the UI thread."""

    def __init__(self, callback: Callable[[Any], None] | None, result: Any, what: str,
                 error: BaseException | None = None):
        super().__init__()
        self.callback = callback
        self.result = result
        self.what = what
        self.error = error


class ReviewScreen(SectionScreen):
    """Grade, reject, edit, auto-grade and drop completions."""

    MODE = "review"
    CSS_PATH = "review.tcss"
    HELP_TITLE = "Review"
    HELP = ("Grade each completion 1–5 (the cursor moves on); 0 or d rejects it. f and F cycle the filter "
            "(finished lists those that ended on their own). Sorted by length, shortest "
            "first: length is the cheap proxy for detail, but only for completions that ended on their own: "
            "✂ marks one cut off at max tokens (R regenerates it with more, C all of them). a grades everything "
            "no person graded by length quintile; x rejects everything at or below a grade. D finds "
            "near-duplicates at the similarity you give (≈N: a group of N), t jumps to the twin, X keeps the "
            "best-graded of each group. "
            "v shows the coverage per value and pair; T tops up the thin ones. u undoes, also bulk changes.")
    QUIET_WORKER_GROUPS = frozenset({"review-writer"})  # it reports its own errors
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
        Binding("F", "cycle_filter(-1)", "filter back", tooltip="the filter before this one", show=False,
                id="review.filter_back"),
        Binding("s", "cycle_sort", "sort", show=False, id="review.sort"),
        Binding("r", "reverse", "reverse", show=False, id="review.reverse"),
        Binding("escape", "clear_search", "clear search", show=False, id="review.clear_search"),
        # Curation: named in the curation bar and the detail pane where they apply.
        Binding("R", "redo", "redo", tooltip="regenerate this completion with more max tokens", show=False,
                id="review.redo"),
        Binding("C", "redo_cut_off", "redo cut off", tooltip="regenerate every cut-off completion (a run)",
                show=False, id="review.redo_cut_off"),
        Binding("t", "twin", "twin", tooltip="jump to the near-duplicate twin", show=False, id="review.twin"),
        Binding("D", "dedup", "find dups", tooltip="find near-duplicates", show=False, id="review.dedup"),
        Binding("X", "drop_duplicates", "drop dups", tooltip="drop near-duplicates, keeping the best-graded",
                show=False, id="review.drop_duplicates"),
        Binding("v", "coverage", "coverage", tooltip="coverage per value and pair (toggle)", show=False,
                id="review.coverage"),
        Binding("T", "top_up", "top up", tooltip="top up thin values and pairs (a run)", show=False,
                id="review.top_up"),
    ]

    # What the bars and the detail pane show: each repaints only when its value changes.
    counts: reactive[ReviewCounts | None] = reactive(None, init=False)  # None: not counted yet
    view_label: reactive[Text] = reactive(Text, init=False)
    rows_label: reactive[str] = reactive("", init=False)
    detail: reactive[tuple[Text, Text]] = reactive(lambda: (Text(), Text()), init=False)
    coverage_open: reactive[bool] = reactive(False, init=False)

    def __init__(self, ctx: ProjectContext):
        super().__init__(ctx)
        self.filter: Filter = review.FILTERS[0]
        self.sort = "length"
        self.descending = False
        self.search = ""
        self.undo_stack = UndoStack()
        self._jobs: queue.Queue[tuple[Callable[[], Any], Callable[[Any], None] | None, str] | None] = queue.Queue()
        self._detail_id: int | None = None
        self._detail_timer: Timer | None = None
        self._due: set[str] = set()  # what the next throttled reload reads: rows, counts, histogram
        self._reload_throttle = Throttle(self, RELOAD_INTERVAL_S, self._reload_due)
        self._own_grades = 0  # grade changes of ours not yet seen by refresh_from_project
        # (run id, completion id) of an R redo: a detached run, so it outlives this screen
        # and the app; its outcome is said here once the run has ended.
        self._redo: tuple[int, int] | None = None

    # -- layout ------------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="info-bar", id="review-bar"):
            yield Static("", id="review-view")
            # The search box takes the view bar's place while it is open: on screen at 80×24.
            yield Static(Text.assemble(("/", "bold"), " search"), id="review-search-label")
            yield Input(placeholder="search text and values · enter apply · esc close", id="review-search")
            yield Static("", id="review-counts")
        yield Static("", id="review-curation", classes="info-bar")
        yield LengthHistogram(id="review-histogram")
        with Horizontal(id="review-body"):
            store = self.ctx.store
            yield ReviewList(lambda ids: review.list_previews(store, ids), id="review-list")
            with VerticalScroll(id="review-detail"):
                yield Static("", id="review-detail-head")
                yield Static("", id="review-detail-text")
        yield CoveragePanel(id="review-coverage")

    @property
    def list(self) -> ReviewList:
        return self.query_one(ReviewList)

    def on_mount(self) -> None:
        self.query_one("#review-detail").border_title = "completion"
        self._show_view()
        self._writer()
        self.reload(histogram=True)
        self.list.focus()

    def on_unmount(self) -> None:
        self._jobs.put(None)

    # -- the reactives' views --------------------------------------------------------
    def watch_counts(self, counts: ReviewCounts | None) -> None:
        self.query_one("#review-counts", Static).update(counts.text() if counts else "")
        self.query_one("#review-curation", Static).update(curation_text(counts, self.app.size.width - 2)
                                                          if counts else "")

    def watch_view_label(self, label: Text) -> None:
        self.query_one("#review-view", Static).update(label)

    def watch_rows_label(self, label: str) -> None:
        self.list.border_title = label

    def watch_detail(self, detail: tuple[Text, Text]) -> None:
        head, body = detail
        self.query_one("#review-detail-head", Static).update(head)
        self.query_one("#review-detail-text", Static).update(body)
        self.query_one("#review-detail", VerticalScroll).scroll_home(animate=False)

    def _show_view(self) -> None:
        arrow = "↓" if self.descending else "↑"
        sort = dict(review.SORTS)[self.sort]
        # Each part of the view is labelled with the key that changes it.
        self.view_label = Text.assemble(("s", "bold"), f" {sort} ", ("r", "bold"), f" {arrow} · ",
                                        ("f", "bold"), f" {self.filter.label} · ", ("/", "bold"),
                                        f" “{self.search}”" if self.search else " search")

    # -- the writer: one thread, jobs in key order ----------------------------------
    def pending_jobs(self) -> int:
        """Changes not yet written to the project file (for tests and the benchmark)."""
        return self._jobs.unfinished_tasks

    def submit(self, job: Callable[[], Any], done: Callable[[Any], None] | None = None, what: str = "grades") -> None:
        """Queue a pipeline call; once it is written, ``changed(what)`` and ``done(result)``."""
        self._jobs.put((job, done, what))

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
            job, done, what = item
            try:
                result = job()
            except Exception as exc:  # noqa: BLE001 - reported on the screen, never a crash
                self.post_message(JobDone(None, None, what, exc))
            else:
                self.post_message(JobDone(done, result, what))
            finally:
                self._jobs.task_done()

    @on(JobDone)
    def _job_done(self, message: JobDone) -> None:
        if message.error is not None:
            self.show_error(message.error, title="could not save")
            self.reload()
            return
        if message.what == "grades":
            self._own_grades += 1
        self.changed(message.what)
        if message.callback is not None:
            message.callback(message.result)

    # -- following the project -----------------------------------------------------------
    def refresh_from_project(self, what: frozenset[str]) -> None:
        if what == {"grades"} and self._own_grades:
            # Graded here, the rows shown already (a bulk change reloads them): the counts
            # are recounted from the store, so this screen and the status line say the same.
            self._own_grades -= 1
            self._reload_soon("counts")
        else:  # new completions, an edit, another screen or process: anything may have moved
            self._own_grades = 0  # the rows are read afresh, ours included
            parts = ["rows", "counts", "histogram"]
            if not what <= {"grades", "runs"}:  # texts or curation marks may have changed too
                parts.append("previews")
            self._reload_soon(*parts)
        if self.coverage_open:
            self._reload_soon("coverage")
        if self._redo is not None and what & {"runs", "completions", "external"}:
            self._redo_outcome(*self._redo)

    def _reload_soon(self, *parts: str) -> None:
        """Reload ``parts`` now, or once a second has passed since the last reload."""
        self._due.update(parts)
        self._reload_throttle.soon()

    def _reload_due(self) -> None:
        due, self._due = self._due, set()
        if "previews" in due:
            self.list.refresh_previews()
        if "coverage" in due and self.coverage_open:
            self._load_coverage()
        if "rows" in due:
            self.reload(histogram="histogram" in due)
        elif due & {"counts", "histogram"}:
            self._load_counts(histogram="histogram" in due)
        if self._detail_id is not None and "rows" in due:
            self._load_detail(self._detail_id)

    def reload(self, histogram: bool = False) -> None:
        """Read the rows (the cursor stays on its row), the counts and, if asked, the lengths."""
        self._reload_throttle.ran()
        current = self.list.current
        self._load_rows(self.filter, self.search, self.sort, self.descending,
                        current[0] if current else None, histogram)

    @work(thread=True, exclusive=True, group="rows", exit_on_error=False)
    def _load_rows(self, filt: Filter, search: str, sort: str, descending: bool,
                   keep_id: int | None, histogram: bool) -> None:
        worker = get_current_worker()
        rows = review.rows(self.ctx.store, filt, search, sort, descending)
        if worker.is_cancelled:
            return
        self.app.call_from_thread(self._rows_loaded, rows, keep_id)  # the list first, then the rest
        self._read_counts(histogram)

    @work(thread=True, exclusive=True, group="counts", exit_on_error=False)
    def _load_counts(self, histogram: bool) -> None:
        self._read_counts(histogram)

    def _read_counts(self, histogram: bool) -> None:
        """In a worker: the counts (and lengths) from the store, handed to the UI thread."""
        store = self.ctx.store
        counts = ReviewCounts.from_store(store)
        if get_current_worker().is_cancelled:
            return
        self.app.call_from_thread(self._counts_loaded, counts)
        if histogram:
            lengths = store.done_lengths()
            self.app.call_from_thread(self.query_one(LengthHistogram).set_lengths, lengths)

    def _rows_loaded(self, rows: list[Row], keep_id: int | None) -> None:
        self.list.set_rows(rows, keep_id)
        self.rows_label = f"{len(rows):,} rows"
        if self.pending_jobs():  # read while a grade was on its way: read again once it is written
            self._reload_soon("rows")

    def _counts_loaded(self, counts: ReviewCounts) -> None:
        if self.pending_jobs():
            return  # a grade is on its way; its JobDone asks for a recount
        self.counts = counts

    # -- the detail pane -------------------------------------------------------------
    @on(ReviewList.Highlighted)
    def _highlighted(self, event: ReviewList.Highlighted) -> None:
        row_id = event.row[0] if event.row else None
        if row_id == self._detail_id and row_id is not None:
            return
        self._detail_id = row_id
        if self._detail_timer is not None:
            self._detail_timer.stop()
        self._detail_timer = self.set_timer(DETAIL_DELAY_S, self._show_detail)

    def _show_detail(self) -> None:
        self._detail_timer = None
        if self._detail_id is None:
            self.detail = (Text(self._nothing_shown(), style="dim"), Text())
            return
        self._load_detail(self._detail_id)

    def _nothing_shown(self) -> str:
        if self.search:
            return f"nothing matches “{self.search}” (esc clears the search)"
        if self.filter.key in ("done", "all"):
            return "nothing generated yet: F3 Generate runs the grid, and each finished completion shows here"
        return f"nothing here with the filter “{self.filter.label}” (f changes it)"

    @work(thread=True, exclusive=True, group="detail", exit_on_error=False)
    def _load_detail(self, completion_id: int) -> None:
        store = self.ctx.store
        from ...pipeline.curation.dedup import group_of

        record = store.get_completion(completion_id)
        history = store.grade_history(completion_id)
        group = group_of(store, completion_id)
        if record is None or get_current_worker().is_cancelled:
            return
        texts = detail_texts(record, history, group)
        self.app.call_from_thread(self._detail_loaded, completion_id, texts)

    def _detail_loaded(self, completion_id: int, texts: tuple[Text, Text]) -> None:
        if completion_id == self._detail_id:
            self.detail = texts

    def _refresh_detail(self, completion_id: int) -> None:
        if completion_id == self._detail_id:
            self._load_detail(completion_id)

    # -- grading -------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in _LIST_ACTIONS and self.coverage_open:
            return None  # the list is hidden: its keys would act on a row nobody sees
        if action in ("grade", "edit", "redo", "twin"):
            row = self.list.current if self.is_mounted else None
            return None if row is None or row[3] != "done" else True
        if action == "undo":
            return True if len(self.undo_stack) else None
        if action == "clear_search":
            return bool(self.search)
        return True

    def _push_undo(self, ids: list[int], label: str) -> None:
        had_undo = bool(self.undo_stack)
        self.undo_stack.push(ids, label)
        if not had_undo and ids:
            self.refresh_bindings()

    def action_grade(self, grade: int) -> None:
        lst = self.list
        index, row = lst.cursor, lst.current
        if row is None or row[3] != "done":
            return
        row_id, length, old, status = row
        lst.update_row(index, (row_id, length, grade, status))
        if self.counts is not None:  # at once; recounted once it is written
            self.counts = self.counts.changed(old, grade, cut_off=lst.is_cut_off(row_id))
        self._push_undo([row_id], f"grade {grade}")
        store = self.ctx.store
        self.submit(lambda: review.grade(store, row_id, grade), lambda _grade: self._refresh_detail(row_id))
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
            if self.counts is not None:  # at once; recounted from the store next
                self.counts = self.counts.changed(old, grade, cut_off=lst.is_cut_off(row_id))
            lst.set_cursor(index)
        self._refresh_detail(row_id)

    def _undone_bulk(self, label: str) -> None:
        self.notify(f"undid {label}")
        self._after_bulk()

    def _after_bulk(self) -> None:
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
            self.submit(lambda: review.edit(store, row_id, new_text), lambda length: self._edited(row_id, length),
                        what="completions")

        self.app.push_screen(EditModal(text, title=f"Edit completion #{row_id}"), saved)

    def _edited(self, row_id: int, length: int) -> None:
        lst = self.list
        index = lst.index_of(row_id)
        if index is not None:  # shown at once; the reload that follows re-sorts it
            rid, _length, grade, status = lst.rows[index]
            lst.forget_preview(row_id)
            lst.update_row(index, (rid, length, grade, status))
        self.notify("edit saved; the model's text is kept")
        self._refresh_detail(row_id)

    # -- bulk: auto-grade, drop ------------------------------------------------------------------
    def action_auto_grade(self) -> None:
        self.notify("grading by length…")
        store = self.ctx.store
        self.submit(lambda: review.auto_grade(store), self._auto_graded)

    def _auto_graded(self, outcome: tuple[Any, list[int]]) -> None:
        result, changed = outcome
        self._push_undo(changed, "auto-grade")
        self.notify(result.summary(redo="C regenerates them with more max tokens"), title="auto-grade", timeout=6)
        self._after_bulk()

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
        self._push_undo(ids, f"drop ≤ {grade}")
        self.notify(f"rejected {len(ids):,} completion(s) graded at or below {grade}")
        self._after_bulk()

    # -- curation: cut off, near-duplicates, coverage ---------------------------------------------
    def action_redo(self) -> None:
        row = self.list.current
        if row is None or row[3] != "done":
            return
        if self._redo is not None:
            self.notify(f"run #{self._redo[0]} is regenerating #{self._redo[1]}; wait for it to finish", title="Redo")
            return
        self._ask_max_tokens([row[0]])

    def action_redo_cut_off(self) -> None:
        counts = self.counts
        if counts is not None and not counts.cut_off:
            self.notify("no completion is cut off at max tokens", title="Redo")
            return
        self._ask_max_tokens(None)

    @work(thread=True, group="redo-ask", exit_on_error=False)
    def _ask_max_tokens(self, ids: list[int] | None) -> None:
        from ...pipeline.generation.generate import suggested_redo_max_tokens

        suggested = suggested_redo_max_tokens(self.ctx.store)
        self.app.call_from_thread(self._push_max_tokens, ids, suggested)

    def _push_max_tokens(self, ids: list[int] | None, suggested: int) -> None:
        if ids is None:
            n = self.counts.cut_off if self.counts is not None else 0
            question = (f"Regenerate all {n:,} cut-off completion(s) with how many max tokens? A run starts "
                        f"(F3 Generate follows it); each keeps its old text until the new one arrives.")
            title = "Redo cut off"
        else:
            question = (f"Regenerate #{ids[0]} with how many max tokens? Its grades are withdrawn once the "
                        f"new text arrives.")
            title = "Redo"

        def answered(value: str | None) -> None:
            if value is None:
                return
            try:
                max_tokens = review.parse_max_tokens(value)
            except ValueError as exc:
                self.show_error(str(exc), title=title)
                return
            self.notify("starting a run…", title=title)
            self._start_detached("redo", max_tokens, ids)

        self.app.push_screen(AskModal(question, str(suggested), title=title, placeholder="max tokens"), answered)

    @work(thread=True, group="redo-outcome", exclusive=True, exit_on_error=False)
    def _redo_outcome(self, run_id: int, completion_id: int) -> None:
        """Once the redo's run has ended: what it came to, and the detail shown afresh."""
        run = self.ctx.store.get_run(run_id)
        if run is None or run.active:
            return
        words = review.redo_words(self.ctx.store.get_completion(completion_id), run)
        self.app.call_from_thread(self._redone, (run_id, completion_id), words)

    def _redone(self, redo: tuple[int, int], words: tuple[str, str]) -> None:
        if self._redo != redo:
            return  # already said
        self._redo = None
        text, severity = words
        self.notify(text, title="Redo", severity=severity)  # type: ignore[arg-type]
        self._refresh_detail(redo[1])

    def _start_run(self, kind: str, value: int) -> None:
        self.notify("starting a run…", title="Redo" if kind == "redo" else "Top up")
        self._start_detached(kind, value)

    @work(thread=True, exclusive=True, group="review-run", exit_on_error=False)
    def _start_detached(self, kind: str, value: int, ids: list[int] | None = None) -> None:
        from ...pipeline.generation import runs
        from ...pipeline.generation.generate import GenerateOptions, NothingToDo, redo_options

        title = "Redo" if kind == "redo" else "Top up"
        options = redo_options(ids, value) if kind == "redo" else GenerateOptions(top_up=value)
        try:
            run_id = runs.start_detached(self.ctx.path, options)
        except NothingToDo as exc:  # not an error: a notice, and no run
            self.app.call_from_thread(self.notify, str(exc), title=title)
        else:  # GenerateError, RunConflict...: the section's worker-error handler says them in one line
            self.app.call_from_thread(self._run_started, title, run_id, ids)

    def _run_started(self, title: str, run_id: int, ids: list[int] | None = None) -> None:
        self.changed("runs")
        if ids is not None and len(ids) == 1:  # one completion: the review stays, and says how it went
            self._redo = (run_id, ids[0])
            self.notify(f"run #{run_id} regenerates #{ids[0]}; its new text shows here when it arrives",
                        title=title)
            return
        self.notify(f"run #{run_id} started; F4 comes back to the review", title=title)
        self.call_later(self.app.run_action, "section('generate')")  # the generate screen follows the run

    def action_twin(self) -> None:
        row = self.list.current
        if row is not None:
            self._find_twin(row[0])

    @work(thread=True, group="twin", exit_on_error=False)
    def _find_twin(self, completion_id: int) -> None:
        from ...pipeline.curation.dedup import twin_of

        twin = twin_of(self.ctx.store, completion_id)
        self.app.call_from_thread(self._go_to_twin, completion_id, twin)

    def _go_to_twin(self, completion_id: int, twin: int | None) -> None:
        if twin is None:
            self.notify(f"#{completion_id} has no near-duplicate" + ("" if self.counts and self.counts.dedup_run
                                                                      else " found yet (D looks for them)"))
            return
        index = self.list.index_of(twin)
        if index is None:
            self.notify(f"its twin #{twin} is not listed with this filter or search (f: near-duplicates)")
            return
        self.list.set_cursor(index)

    def action_dedup(self) -> None:
        self._ask_threshold()

    @work(thread=True, group="dedup-ask", exit_on_error=False)
    def _ask_threshold(self) -> None:
        self.app.call_from_thread(self._push_threshold, review.dedup_threshold(self.ctx.store))

    def _push_threshold(self, suggested: float) -> None:
        from ...pipeline.curation.dedup import check_threshold

        def answered(value: str | None) -> None:
            if value is None:
                return
            try:
                threshold = check_threshold(value.strip())
            except ValueError as exc:
                self.show_error(str(exc), title="Near-duplicates")
                return
            self.notify(f"looking for near-duplicates at similarity {threshold:g}…", title="Near-duplicates")
            store = self.ctx.store
            self.submit(lambda: review.find_duplicates(store, threshold), self._deduped, what="completions")

        question = ("Find near-duplicates at what similarity (0-1 share of 3-word phrases; higher finds "
                    "fewer, closer pairs)?")
        self.app.push_screen(AskModal(question, f"{suggested:g}", title="Near-duplicates", placeholder="0.8"),
                             answered)

    def _deduped(self, result: Any) -> None:
        self.notify(result.summary(), title="Near-duplicates", timeout=8)

    def action_drop_duplicates(self) -> None:
        counts = self.counts
        if counts is None or not counts.dup_groups:
            self.notify("no near-duplicate groups" + ("" if counts and counts.dedup_run else ": D looks for them"),
                        title="Near-duplicates")
            return
        extra = counts.dup_members - counts.dup_groups

        def answered(yes: bool | None) -> None:
            if yes:
                store = self.ctx.store
                self.submit(lambda: review.drop_duplicates(store), self._duplicates_dropped)

        self.app.push_screen(
            ConfirmModal(f"Keep the best-graded completion of each of {counts.dup_groups:,} near-duplicate "
                         f"group(s) and reject the other {extra:,}? A person's grade is left alone; they stay in "
                         f"the project (u undoes this) but are never exported.", title="Drop near-duplicates"),
            answered,
        )

    def _duplicates_dropped(self, result: Any) -> None:
        self._push_undo(result.rejected, "drop near-duplicates")
        self.notify(result.summary(), title="Near-duplicates", timeout=8)
        self._after_bulk()

    def action_coverage(self) -> None:
        self.coverage_open = not self.coverage_open

    def watch_coverage_open(self, open_: bool) -> None:
        self.set_class(open_, "-coverage")
        panel = self.query_one(CoveragePanel)
        panel.border_title = "coverage: kept examples per value and pair"
        panel.border_subtitle = "T top up · v back to the list"
        if open_:
            panel.show(panel.coverage)
            self._load_coverage()
            panel.focus()
        else:
            self.list.focus()
        self.refresh_bindings()

    @work(thread=True, exclusive=True, group="coverage", exit_on_error=False)
    def _load_coverage(self) -> None:
        from ...pipeline.curation.coverage import coverage

        try:
            cov = coverage(self.ctx.store)
        except ValueError as exc:
            self.app.call_from_thread(self.query_one(CoveragePanel).show, None, one_line(exc))
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self.query_one(CoveragePanel).show, cov)

    def action_top_up(self) -> None:
        from ...pipeline.curation.coverage import DEFAULT_THIN

        def answered(value: str | None) -> None:
            if value is None:
                return
            try:
                target = review.parse_top_up(value)
            except ValueError as exc:
                self.show_error(str(exc), title="Top up")
                return
            self._start_run("top_up", target)

        self.app.push_screen(
            AskModal("Generate new samples until every value and pair has how many kept examples? A run starts "
                     "(F3 Generate follows it).", str(DEFAULT_THIN), title="Top up", placeholder="examples"),
            answered,
        )

    # -- view: filter, sort, search ----------------------------------------------------------------
    def _view_changed(self) -> None:
        self._show_view()
        self.reload()

    def action_cycle_filter(self, step: int = 1) -> None:
        self.filter = review.next_filter(self.filter.key, step)
        self._view_changed()

    def set_filter(self, key: str) -> None:
        self.filter = review.filter_by_key(key)
        self._view_changed()

    def action_cycle_sort(self) -> None:
        self.sort = review.next_sort(self.sort)
        self.descending = False
        self._view_changed()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self._view_changed()

    @property
    def search_box(self) -> Input:
        return self.query_one("#review-search", Input)

    def action_search(self) -> None:
        box = self.search_box
        box.value = self.search
        self.query_one("#review-bar").add_class("-searching")
        box.focus()

    def _close_search(self) -> None:
        self.query_one("#review-bar").remove_class("-searching")
        self.list.focus()

    @on(Input.Submitted, "#review-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.search = event.value.strip()
        self._close_search()
        self.refresh_bindings()
        self._view_changed()

    def action_clear_search(self) -> None:
        self._close_search()
        if self.search:
            self.search = ""
            self.refresh_bindings()
            self._view_changed()

    def on_key(self, event: Key) -> None:
        # escape inside the search box closes it without changing the search
        if event.key == "escape" and self.focused is self.search_box:
            event.stop()
            self._close_search()


_LIST_ACTIONS = frozenset({"grade", "edit", "redo", "twin", "auto_grade", "drop", "search", "cycle_filter",
                           "cycle_sort", "reverse"})


def curation_text(counts: ReviewCounts, width: int) -> Text:
    """The curation bar: cut off, near-duplicates, the judge's agreement and the keys
    for each; shortened, then the coverage key and the judge left out, until it fits ``width``."""
    cut_long = Text.assemble(("✂ ", "yellow"), counts.cut_off_text())
    cut_short = cut_long.copy()
    if counts.cut_off:
        cut_long.append_text(Text.assemble(": ", ("R", "bold"), "/", ("C", "bold"), " redo"))
    if counts.dup_groups:
        dup_long = Text.assemble(("≈ ", "cyan"), counts.dup_text(), ": ", ("t", "bold"), " twin ",
                                 ("X", "bold"), " drop")
        dup_short = Text.assemble(("≈ ", "cyan"), f"{counts.dup_members:,} dups/{counts.dup_groups:,} groups")
    elif counts.dedup_run:
        dup_long = dup_short = Text.assemble(("≈ ", "cyan"), "no near-dups (", ("D", "bold"), " again)")
    else:
        dup_long = dup_short = Text.assemble(("≈ ", "cyan"), ("D", "bold"), " finds near-dups")
    judge = [Text(counts.judge)] if counts.judge else []
    cover = [Text.assemble(("v", "bold"), " coverage")]
    for parts in ([cut_long, dup_long, *judge, *cover], [cut_long, dup_short, *judge, *cover],
                  [cut_short, dup_short, *judge, *cover], [cut_short, dup_short, *judge], [cut_short, dup_short]):
        if sum(p.cell_len for p in parts) + 3 * (len(parts) - 1) <= width:
            break
    return Text(" · ", style="dim").join(parts)


def detail_texts(record, history, group: list[int] | None = None) -> tuple[Text, Text]:
    """The detail pane's header and body for one completion (no UI state)."""
    head = Text()
    head.append(f"#{record.id}", "bold")
    if record.status != "done":
        head.append(f" {record.status}", "bold")
    if record.length is not None:
        head.append(f" · {record.length:,} chars")
    if record.edited:
        head.append(" · edited", "italic")
    head.append("\n")
    if record.status == "done":
        grades = review.history_text(history) or "ungraded"
        style = "bold red" if record.grade == 0 else ("dim" if record.grade is None else "bold")
        head.append(grades + "\n", style)
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
    if record.status == "failed" and record.error:
        head.append(f"error: {record.error}\n", "red")
    if cut := review.cut_off_words(record):
        head.append(f"✂ {cut}", "bold yellow")
        head.append_text(Text.assemble(" · ", ("R", "bold"), " redo\n"))
    if twins := review.group_words(group or [], record.id):
        head.append(f"≈ {twins}", "cyan")
        head.append_text(Text.assemble(" · ", ("t", "bold"), " twin\n"))
    body = Text(record.text or "")
    return head, body
