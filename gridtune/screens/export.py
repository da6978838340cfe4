"""Export & fine-tune: write the JSONL, see the validation report, then train.

The export (and its validation: errors, warnings, token statistics, cost
estimate) always runs first and is shown before anything is uploaded; a
fine-tuning job can only start from an export without errors. The job is
followed live (status, events, a loss chart) and can be cancelled; when it
succeeds, one key takes its model to the playground with the export's stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Select, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from ..tui.events import OpenPlayground
from ..tui.section import SectionScreen
from ..tui.widgets import StatusLine
from ..pipeline.validate import ValidationReport

TERMINAL = ("succeeded", "failed", "cancelled")
FORMATS = [("chat", "chat"), ("completion", "completion")]


@dataclass
class ExportOptions:
    """The form, read back into what ``export_project`` takes."""

    out_path: Path
    format: str = "chat"
    min_grade: int | None = None
    separator: str | None = None
    stop: str | None = None
    validation_fraction: float = 0.0
    base_model: str | None = None
    epochs: int | None = None
    suffix: str | None = None

    @classmethod
    def parse(cls, raw: dict[str, str], default_path: Path) -> "ExportOptions":
        fmt = raw.get("format") or "chat"
        opts = cls(out_path=Path(raw.get("out_path", "").strip() or default_path).expanduser(), format=fmt)
        text = raw.get("min_grade", "").strip()
        if text:
            try:
                opts.min_grade = int(text)
            except ValueError:
                raise ValueError(f"min grade: {text!r} is not a whole number 0-5") from None
            if not 0 <= opts.min_grade <= 5:
                raise ValueError(f"min grade: must be within 0..5, not {text}")
        if fmt == "completion":
            # Typed as a person reads them: \n is a newline.
            opts.separator = _unescape(raw.get("separator", "")) or None
            opts.stop = _unescape(raw.get("stop", "")) or None
        text = raw.get("validation_fraction", "").strip() or "0"
        try:
            opts.validation_fraction = float(text)
        except ValueError:
            raise ValueError(f"validation fraction: {text!r} is not a number") from None
        if not 0 <= opts.validation_fraction < 1:
            raise ValueError(f"validation fraction: must be in [0, 1), not {text}")
        opts.base_model = raw.get("base_model", "").strip() or None
        text = raw.get("epochs", "").strip()
        if text:
            try:
                opts.epochs = int(text)
            except ValueError:
                raise ValueError(f"epochs: {text!r} is not a whole number") from None
            if opts.epochs < 1:
                raise ValueError("epochs: at least 1")
        opts.suffix = raw.get("suffix", "").strip() or None
        return opts


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _escape(text: str | None) -> str:
    return (text or "").replace("\n", "\\n").replace("\t", "\\t")


@dataclass
class JobView:
    """What the job panel shows."""

    id: str | None = None
    status: str = ""
    model: str | None = None
    fine_tuned_model: str | None = None
    error: str | None = None
    events: list[str] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    valid_steps: list[float] = field(default_factory=list)
    valid_losses: list[float] = field(default_factory=list)


class ExportDone(Message):
    def __init__(self, result: Any | None, error: str | None) -> None:
        super().__init__()
        self.result = result
        self.error = error


class JobChanged(Message):
    def __init__(self, view: JobView) -> None:
        super().__init__()
        self.view = view

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobChanged)


def report_from_dict(data: dict[str, Any] | None) -> ValidationReport | None:
    """A ValidationReport back from what an export recorded in the project."""
    if not data:
        return None
    known = {f.name for f in fields(ValidationReport)}
    try:
        return ValidationReport(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None


def report_text(summary_lines: list[str]) -> Text:
    """Colour a report: errors red, warnings yellow, the verdict bold."""
    out = Text()
    section = ""
    for i, line in enumerate(summary_lines):
        if i:
            out.append("\n")
        stripped = line.strip()
        if line.endswith("error(s):"):
            section = "error"
            out.append(line, style="bold red")
        elif stripped == "Warnings:":
            section = "warning"
            out.append(line, style="bold yellow")
        elif stripped == "No errors found.":
            section = ""
            out.append(line, style="bold green")
        elif line.startswith("warning:"):
            out.append(line, style="yellow")
        elif line.startswith("  ") and section:
            out.append(line, style="red" if section == "error" else "yellow")
        else:
            section = ""
            out.append(line, style="bold" if i == 0 else "")
    return out


class ExportScreen(SectionScreen):
    MODE = "export"
    """Export options, the validation report, and the fine-tuning job."""

    CSS_PATH = "export.tcss"
    AUTO_FOCUS = ""  # letters are commands until `o` (or tab) enters the options
    BINDINGS = [
        Binding("e", "export", "Export+validate", id="export.run"),
        Binding("f", "finetune", "Fine-tune", id="export.finetune"),
        Binding("c", "cancel_job", "Cancel job", id="export.cancel_job"),
        Binding("p", "playground", "Try model", id="export.playground"),
        Binding("o", "edit_options", "Options", id="export.options"),
        Binding("escape", "leave_options", "Done editing", show=False, id="export.leave"),
        # The report is taller than its box at 80x24 (token statistics, cost, verdict):
        # these keys scroll it from anywhere, as the hint on the job pane's top rule says.
        Binding("pagedown", "scroll_report(1)", "report down", show=False, id="export.report_down"),
        Binding("pageup", "scroll_report(-1)", "report up", show=False, id="export.report_up"),
    ]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.busy: str | None = None  # exporting | uploading | cancelling
        self.result = None  # the ExportResult of this session's export
        self.export_record = None  # the latest export recorded in the project
        self.job = JobView()
        self._shown: dict[str, Any] = {}
        self._plotted: tuple | None = None
        self.poll_s = 1.0

    @property
    def default_path(self) -> Path:
        return self.ctx.path.with_suffix(".jsonl")

    # -- layout ---------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusLine()
        yield Static(id="exp-title")
        with Horizontal(id="exp-main"):
            with Vertical(id="exp-form"):
                yield Static("export", classes="form-head")
                yield from self._row("format", Select(FORMATS, value="chat", allow_blank=False, compact=True,
                                                      id="opt-format"))
                yield from self._row("min grade", Input(id="opt-min_grade", placeholder="all kept", compact=True))
                yield from self._row("separator", Input(id="opt-separator", placeholder="auto", compact=True))
                yield from self._row("stop", Input(id="opt-stop", placeholder="auto", compact=True))
                yield from self._row("valid frac", Input("0", id="opt-validation_fraction", compact=True))
                yield from self._row("output", Input(str(self.default_path), id="opt-out_path", compact=True))
                yield Static("fine-tune", classes="form-head spaced")
                yield from self._row("base model", Input(id="opt-base_model", placeholder="backend default",
                                                         compact=True))
                yield from self._row("epochs", Input(id="opt-epochs", placeholder="auto", compact=True))
                yield from self._row("suffix", Input(id="opt-suffix", placeholder="none", compact=True))
            with Vertical(id="exp-right"):
                with VerticalScroll(id="exp-report-box"):
                    yield Static(id="exp-report")
                with Vertical(id="exp-job"):
                    yield Static(id="exp-job-status")
                    yield Static(id="exp-job-events")
                    yield PlotextPlot(id="exp-loss")
        yield Static(id="exp-error")
        yield Footer(compact=True)

    def _row(self, label: str, widget) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label(label, classes="field-label")
            yield widget

    def on_mount(self) -> None:
        self.query_one("#exp-loss").can_focus = False
        report_box = self.query_one("#exp-report-box")
        report_box.can_focus = False
        for attribute in ("virtual_size", "size", "scroll_y"):
            self.watch(report_box, attribute, lambda *_: self._report_hint(), init=False)
        self._sync_format("chat")
        self._set("exp-report", Text("e exports and validates: nothing is uploaded before you see this report.",
                                     style="dim"))
        self._render_job()
        self.load_state()

    # -- helpers ----------------------------------------------------------------
    def _set(self, widget_id: str, value: Any) -> None:
        if self._shown.get(widget_id) != value:
            self._shown[widget_id] = value
            self.query_one(f"#{widget_id}", Static).update(value)
            if widget_id == "exp-report":
                box = self.query_one("#exp-report-box")
                box.scroll_home(animate=False)

    def _report_hint(self) -> None:
        """Say on the job pane's top rule that the report goes on below its box."""
        box = self.query_one("#exp-report-box")
        title = None
        if box.max_scroll_y > 0:
            up, down = box.scroll_y > 0, box.scroll_y < box.max_scroll_y
            title = ("▲ pgup " if up else "") + ("▼ pgdn: more of the report" if down else "")
            title = title if down else title + ": start of the report"
        job = self.query_one("#exp-job")
        if job.border_title != title:
            job.border_title = title

    def action_scroll_report(self, pages: int) -> None:
        box = self.query_one("#exp-report-box")
        if pages > 0:
            box.scroll_page_down(animate=False)
        else:
            box.scroll_page_up(animate=False)

    def _show_error(self, message: str | None) -> None:
        widget = self.query_one("#exp-error", Static)
        widget.display = bool(message)
        self._set("exp-error", Text(message or "", style="bold red"))

    def _raw(self) -> dict[str, str]:
        raw = {w.id.removeprefix("opt-"): w.value for w in self.query(Input) if w.id and w.id.startswith("opt-")}
        raw["format"] = str(self.query_one("#opt-format", Select).value)
        return raw

    def _sync_format(self, fmt: str) -> None:
        for name in ("separator", "stop"):
            self.query_one(f"#opt-{name}", Input).disabled = fmt != "completion"

    @on(Select.Changed, "#opt-format")
    def _format_changed(self, event: Select.Changed) -> None:
        self._sync_format(str(event.value))

    # -- loading what the project already has --------------------------------------
    def refresh_from_project(self, what: frozenset[str]) -> None:
        self.load_state()

    @work(thread=True, exclusive=True, group="exp-load", exit_on_error=False)
    def load_state(self) -> None:
        store = self.ctx.store
        counts = store.status_counts()
        try:
            name = self.ctx.spec().name
        except Exception:  # noqa: BLE001
            name = self.ctx.path.stem
        export = store.latest_export()
        jobs = store.jobs()
        self.app.call_from_thread(self._loaded, name, counts, export, jobs)

    def _loaded(self, name: str, counts, export, jobs) -> None:
        kept = counts.done - counts.rejected
        self._set("exp-title", Text.assemble(
            ("Export & fine-tune", "bold"), f" · {name} · {counts.done:,} done · {counts.graded:,} graded · "
            f"{counts.rejected:,} rejected · {kept:,} kept"))
        if export is not None and self.result is None:
            self.export_record = export
            self._fill_from_export(export)
            report = report_from_dict(export.report)
            lines = [f"latest export #{export.id}: {export.n_train:,} train / {export.n_valid:,} valid "
                     f"-> {export.path}"]
            if report is not None:
                lines += report.render_text().splitlines()
            self._set("exp-report", report_text(lines))
        if jobs and self.job.id is None:
            job = jobs[-1]
            self.job = JobView(id=job.id, status=job.status, model=job.model,
                               fine_tuned_model=job.fine_tuned_model, error=job.error)
            self._render_job()
            if job.status not in TERMINAL:
                self.follow(job.id)
        self.refresh_bindings()

    def _fill_from_export(self, export) -> None:
        self.query_one("#opt-format", Select).value = export.format
        self._sync_format(export.format)
        self.query_one("#opt-min_grade", Input).value = "" if export.min_grade is None else str(export.min_grade)
        self.query_one("#opt-separator", Input).value = _escape(export.separator)
        self.query_one("#opt-stop", Input).value = _escape(export.stop)
        self.query_one("#opt-validation_fraction", Input).value = f"{export.validation_fraction:g}"
        self.query_one("#opt-out_path", Input).value = export.path

    # -- state ------------------------------------------------------------------
    def _export_ok(self) -> bool:
        if self.result is not None:
            return bool(self.result.ok)
        if self.export_record is not None:
            report = self.export_record.report or {}
            valid = report.get("valid") or {}
            return bool(report.get("ok", False)) and bool(valid.get("ok", True))
        return False

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        job_running = bool(self.job.id) and self.job.status not in TERMINAL
        if action == "export":
            return None if self.busy else True
        if action == "finetune":
            if job_running:
                return False
            return None if (self.busy or not self._export_ok()) else True
        if action == "cancel_job":
            return job_running and self.busy != "cancelling"
        if action == "playground":
            return bool(self.job.fine_tuned_model) and self.job.status == "succeeded"
        return True

    # -- export -----------------------------------------------------------------
    def action_export(self) -> None:
        try:
            opts = ExportOptions.parse(self._raw(), self.default_path)
        except ValueError as exc:
            self._show_error(str(exc))
            return
        self._show_error(None)
        self.busy = "exporting"
        self.refresh_bindings()
        self._set("exp-report", Text(f"exporting to {opts.out_path} and validating…", style="yellow"))
        self.run_export(opts)

    @work(thread=True, exclusive=True, group="exp-export", exit_on_error=False)
    def run_export(self, opts: ExportOptions) -> None:
        from ..pipeline.export import export_project

        try:
            result = export_project(
                self.ctx.store, opts.out_path, format=opts.format, min_grade=opts.min_grade,
                separator=opts.separator, stop=opts.stop, validation_fraction=opts.validation_fraction,
                model=opts.base_model,
            )
        except Exception as exc:  # noqa: BLE001 - ExportError etc.: one line, inline
            self.post_message(ExportDone(None, _one_line(exc)))
        else:
            self.post_message(ExportDone(result, None))

    @on(ExportDone)
    def _export_done(self, message: ExportDone) -> None:
        self.busy = None
        if message.error:
            self._show_error(f"export: {message.error}")
            self._set("exp-report", Text("nothing was written.", style="dim"))
        else:
            result = message.result
            self.result = result
            if result.format == "completion":
                self.query_one("#opt-separator", Input).value = _escape(result.separator)
                self.query_one("#opt-stop", Input).value = _escape(result.stop)
            verdict = ("ready to fine-tune: f starts a job" if result.ok
                       else "fix the errors above before fine-tuning")
            lines = result.summary().splitlines() + ["", verdict]
            self._set("exp-report", report_text(lines))
            self.app.notify(f"exported {result.n_train:,} example(s) to {result.path}", title="Export")
            self.changed("exports")
        self.refresh_bindings()

    # -- fine-tuning ------------------------------------------------------------
    def action_finetune(self) -> None:
        try:
            opts = ExportOptions.parse(self._raw(), self.default_path)
        except ValueError as exc:
            self._show_error(str(exc))
            return
        self._show_error(None)
        self.busy = "uploading"
        self.job = JobView(status="uploading the training file…", model=opts.base_model)
        self._render_job()
        self.refresh_bindings()
        self.start_job(opts)

    @work(thread=True, exclusive=True, group="exp-job-start", exit_on_error=False)
    def start_job(self, opts: ExportOptions) -> None:
        from ..pipeline import finetune

        store = self.ctx.store
        try:
            export = self.result
            export_id = export.export_id if export is not None else self.export_record.id
            train = Path(export.path if export is not None else self.export_record.path)
            valid_path = (export.valid_path if export is not None else self.export_record.valid_path)
            backend = self.ctx.backend()
            model = opts.base_model or backend.default_model
            if not model:
                raise ValueError(f"give a base model to fine-tune ({backend.label} has no default)")
            job = finetune.start_finetune(
                backend, train, model, validation_path=Path(valid_path) if valid_path else None,
                epochs=opts.epochs, suffix=opts.suffix, store=store, export_id=export_id,
            )
        except Exception as exc:  # noqa: BLE001 - refused (OpenAI), backend down...: one message
            view = JobView(status="refused", model=opts.base_model, error=_one_line(exc))
            self.post_message(JobChanged(view))
            self.app.call_from_thread(self._job_started, None)
            return
        self.post_message(JobChanged(JobView(id=job.id, status=job.status, model=job.model)))
        self.app.call_from_thread(self._job_started, job.id)

    def _job_started(self, job_id: str | None) -> None:
        self.busy = None
        self.refresh_bindings()
        if job_id:
            self.follow(job_id)

    @work(thread=True, exclusive=True, group="exp-job-follow", exit_on_error=False)
    def follow(self, job_id: str) -> None:
        from ..pipeline import finetune

        worker = get_current_worker()
        store = self.ctx.store
        state = {"view": JobView(id=job_id, status=self.job.status, model=self.job.model), "status": None}

        def check() -> None:
            if worker.is_cancelled:
                raise _StopFollowing

        def on_event(event: Any) -> None:
            check()
            state["view"] = _apply_update(state["view"], event)
            self.post_message(JobChanged(_copy(state["view"])))

        def on_job(job: Any) -> None:
            check()
            state["view"] = _apply_update(state["view"], job)
            if state["status"] != job.status:
                state["status"] = job.status
                error = job.error.message if getattr(job, "error", None) and job.error.message else None
                store.update_job(job.id, status=job.status, fine_tuned_model=job.fine_tuned_model, error=error)
            self.post_message(JobChanged(_copy(state["view"])))

        try:
            finetune.follow_job(self.ctx.backend(), job_id, on_event, on_job=on_job, poll_s=self.poll_s)
        except _StopFollowing:
            return
        except Exception as exc:  # noqa: BLE001 - the backend went away: say so, keep the screen
            state["view"].error = _one_line(exc)
            self.post_message(JobChanged(_copy(state["view"])))

    @on(JobChanged)
    def _job_changed(self, message: JobChanged) -> None:
        self.job = message.view
        self._render_job()
        self.refresh_bindings()
        if self.job.status == "succeeded" and self.job.fine_tuned_model:
            if self._shown.get("_announced") != self.job.id:
                self._shown["_announced"] = self.job.id
                self.app.notify(f"{self.job.fine_tuned_model} is ready: p tries it in the playground",
                                title="Fine-tuning")

    def _render_job(self) -> None:
        job = self.job
        if job.id is None and not job.error and not job.status:
            status = Text("no job yet · f fine-tunes on the current backend once the export has no errors",
                          style="dim")
        else:
            style = {"succeeded": "bold green", "failed": "bold red", "cancelled": "yellow",
                     "refused": "bold red"}.get(job.status, "bold")
            status = Text()
            if job.fine_tuned_model:
                # First, so it is never the line cut off: the id a person copies or tries (p).
                status.append(f"{job.fine_tuned_model}\n", style="bold green")
            status.append_text(Text.assemble(("job ", "dim"), (job.id or "–", ""), "  ", (job.status, style)))
            if job.model:
                status.append(f" · {job.model}", style="dim")
            if job.losses:
                status.append(f" · step {int(job.steps[-1])} loss {job.losses[-1]:.3f}")
            if job.error:
                status.append(f"\n{job.error}", style="red")
        self._set("exp-job-status", status)
        self._set("exp-job-events", Text("\n".join(job.events[-2:]), style="dim", no_wrap=True,
                                         overflow="ellipsis"))
        key = (tuple(job.steps), tuple(job.losses), tuple(job.valid_losses))
        if key != self._plotted:
            self._plotted = key
            plot = self.query_one("#exp-loss", PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            plt.clear_figure()
            plt.title("loss")
            if job.losses:
                plt.plot(job.steps, job.losses, marker="braille", label="train")
            if job.valid_losses:
                plt.plot(job.valid_steps, job.valid_losses, marker="braille", label="valid")
            plot.refresh()

    def action_cancel_job(self) -> None:
        if not self.job.id:
            return
        self.busy = "cancelling"
        self.refresh_bindings()
        self.cancel_job(self.job.id)

    @work(thread=True, exclusive=True, group="exp-job-cancel", exit_on_error=False)
    def cancel_job(self, job_id: str) -> None:
        from ..pipeline import finetune

        error = None
        try:
            finetune.cancel_job(self.ctx.backend(), job_id)
        except Exception as exc:  # noqa: BLE001
            error = _one_line(exc)
        self.app.call_from_thread(self._cancelled, error)

    def _cancelled(self, error: str | None) -> None:
        self.busy = None
        if error:
            self._show_error(f"cancel: {error}")
        else:
            self.app.notify("cancel requested", title="Fine-tuning")
        self.refresh_bindings()

    def action_playground(self) -> None:
        self.post_message(OpenPlayground(self.job.fine_tuned_model))

    # -- options form -------------------------------------------------------------
    def action_edit_options(self) -> None:
        self.call_after_refresh(self.query_one("#opt-format", Select).focus)

    def action_leave_options(self) -> None:
        self.set_focus(None)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.set_focus(None)
        self.action_export()


class _StopFollowing(Exception):
    """The screen stopped following (the worker was cancelled)."""


def _apply_update(view: JobView, update: Any) -> JobView:
    """Fold one update from ``finetune.follow_job`` into the view: a job object
    (status, fine_tuned_model, error) or an event (message, metrics data)."""
    get = (lambda k, d=None: update.get(k, d)) if isinstance(update, dict) else (
        lambda k, d=None: getattr(update, k, d))
    obj = get("object") or ""
    if "event" in str(obj) or get("message") is not None and get("status") is None:
        msg = get("message")
        if msg:
            view.events.append(str(msg))
            view.events = view.events[-20:]
        data = get("data") or {}
        if not isinstance(data, dict):
            data = getattr(data, "__dict__", {}) or {}
        step = data.get("step")
        if step is not None and data.get("train_loss") is not None:
            view.steps.append(float(step))
            view.losses.append(float(data["train_loss"]))
        if step is not None and data.get("valid_loss") is not None:
            view.valid_steps.append(float(step))
            view.valid_losses.append(float(data["valid_loss"]))
        return view
    status = get("status")
    if status:
        view.status = str(status)
    model = get("fine_tuned_model")
    if model:
        view.fine_tuned_model = str(model)
    if get("model"):
        view.model = str(get("model"))
    err = get("error")
    if err:
        message = err.get("message") if isinstance(err, dict) else getattr(err, "message", None)
        if message:
            view.error = str(message)
    return view


def _copy(view: JobView) -> JobView:
    return JobView(id=view.id, status=view.status, model=view.model, fine_tuned_model=view.fine_tuned_model,
                   error=view.error, events=list(view.events), steps=list(view.steps),
                   losses=list(view.losses), valid_steps=list(view.valid_steps),
                   valid_losses=list(view.valid_losses))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
