"""Export & fine-tune: write the JSONL, see the validation report, then train.

The export (and its validation: errors, warnings, token statistics, cost
estimate) always runs first and is shown before anything is uploaded; a
fine-tuning job can only start from an export without errors. The job is
followed live (status, events, a loss chart) and can be cancelled; when it
succeeds, one key takes its model to the playground.

What the screen shows comes from the store: the counts, the latest export and
its report, the latest job. It re-reads them on every ``ProjectChanged`` (its
own export, a grading on another screen, a CLI run in another terminal). The
work is the pipeline's: ``export_project``, ``start_finetune`` and a
``JobTracker`` that folds the job's events and records its status.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Input, Label, Select, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from ...core.errors import one_line
from ...pipeline.curation.diversity import DiversityStats
from ...pipeline.format.validate import ERROR, FIGURE, NOTE, OK, TITLE, WARNING, ReportLine, ValidationReport, show
from ...pipeline.generation.progress import format_duration
from ...pipeline.spec.grid import GridSpec, render_value
from ...pipeline.spec.options import EXPORT, FINETUNE
from ...pipeline.spec.project import proposed_hold_out
from ...pipeline.training.finetune import JobState, default_export_path
from ...pipeline.training.holdout import HoldOut, HoldOutError, parse_hold_out
from ..events import OpenPlayground
from ..section import SectionScreen

FORMATS = [("chat", "chat"), ("completion", "completion")]
CUT_OFF_CHOICES = [("leave out", "no"), ("include", "yes")]  # completions that hit max tokens
# "place=New York year=2040" or "place=Oslo, year=2040": a new item starts at NAME=.
_HOLD_OUT_ITEM = re.compile(r"[,\s]+(?=[^\s=,]+=)")
# The loss curves' colours, shared by the chart and its legend line above it.
TRAIN_RGB, VALID_RGB = (64, 160, 255), (255, 166, 0)
REPORT_STYLES = {TITLE: "bold", OK: "bold green", ERROR: "red", WARNING: "yellow", NOTE: "", FIGURE: ""}
JOB_STYLES = {"succeeded": "bold green", "failed": "bold red", "cancelled": "yellow", "refused": "bold red"}
EXIT_TARGETS = ("hf", "gguf", "ollama", "vllm")  # export-model's --to
_QUANT = re.compile(r"f16|f32|bf16|q\d\w*", re.I)


def parse_exit(text: str, default_dir: Path) -> tuple[str, str | None, Path]:
    """The export-model line typed after x: 'TARGET [QUANT] [DIR]' (gguf q8_0 agi-gguf) ->
    (target, quant, directory); the directory defaults to ``default_dir``-TARGET."""
    words = text.split()
    if not words or words[0].lower() not in EXIT_TARGETS:
        raise ValueError(f"export model: start with {', '.join(EXIT_TARGETS)} (then a quant such as q8_0, a directory)")
    to, rest = words[0].lower(), words[1:]
    quant = rest.pop(0).lower() if rest and to in ("gguf", "ollama") and _QUANT.fullmatch(rest[0]) else None
    out = Path(" ".join(rest)).expanduser() if rest else default_dir.with_name(f"{default_dir.name}-{to}")
    return to, quant, out


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
    include_cut_off: bool = False
    hold_out: list[str] | None = None  # VAR=VALUE items, checked against the grid by hold_out_choice
    hold_out_combos: int = 0

    @classmethod
    def parse(cls, raw: dict[str, str], default_path: Path) -> ExportOptions:
        """The form's text, checked by the settings' one definition (pipeline.options);
        ValueError (OptionError) names the field."""
        fmt = raw.get("format") or "chat"
        opts = cls(out_path=Path(raw.get("out_path", "").strip() or default_path).expanduser(), format=fmt)
        opts.min_grade = EXPORT["min_grade"].parse(raw.get("min_grade", ""))
        opts.validation_fraction = EXPORT["validation_fraction"].parse(raw.get("validation_fraction", "") or "0")
        opts.epochs = FINETUNE["epochs"].parse(raw.get("epochs", ""))
        if fmt == "completion":
            # Typed as a person reads them: \n is a newline.
            opts.separator = _unescape(raw.get("separator", "")) or None
            opts.stop = _unescape(raw.get("stop", "")) or None
        opts.base_model = raw.get("base_model", "").strip() or None
        opts.suffix = raw.get("suffix", "").strip() or None
        opts.include_cut_off = raw.get("include_cut_off", "no") == "yes"
        opts.hold_out = split_hold_out(raw.get("hold_out", ""))
        combos = raw.get("hold_out_combos", "").strip() or "0"
        if not combos.isdigit():
            raise ValueError(f"combos: a whole number of combinations to hold out (0 or more), not {combos!r}")
        opts.hold_out_combos = int(combos)
        return opts

    def hold_out_choice(self, spec: GridSpec) -> HoldOut | None:
        """The hold-out fields as parse_hold_out checks them (None: nothing held out);
        a one-line ValueError in the form's words."""
        if not self.hold_out and not self.hold_out_combos:
            return None
        try:
            return parse_hold_out(spec, self.hold_out or [], self.hold_out_combos)
        except HoldOutError as exc:
            raise ValueError(_form_words(str(exc))) from None


def split_hold_out(text: str) -> list[str]:
    """The hold-out field's items: 'place=Oslo year=2040' -> ['place=Oslo', 'year=2040']."""
    return [item.strip(" ,") for item in _HOLD_OUT_ITEM.split(text.strip()) if item.strip(" ,")]


def _form_words(message: str) -> str:
    """The pipeline's message about a command-line option, about the form's field."""
    return message.replace("--hold-out-combos", "combos").replace("--hold-out", "hold out")


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _escape(text: str | None) -> str:
    return (text or "").replace("\n", "\\n").replace("\t", "\\t")


def fit_path(path: str | Path, width: int, cwd: str | Path | None = None) -> str:
    """A path in at most ``width`` characters: relative to ``cwd`` (default: the
    current directory) when that is shorter, else with its middle elided, so the
    file name at the end always shows."""
    text = str(path)
    try:
        relative = os.path.relpath(text, cwd or os.getcwd())
    except ValueError:  # another drive
        relative = text
    if len(relative) < len(text):
        text = relative
    if len(text) <= width:
        return text
    keep = max(width - 1, 2)
    tail = max(keep * 2 // 3, 1)
    return text[: keep - tail] + "…" + text[-tail:]


def report_lines(export: Any, width: int, warnings: list[str] | None = None,
                 measuring: bool = False) -> list[ReportLine]:
    """What the report pane shows for an export record: where it went, what it left
    out (cut off) and held out (for evaluation), then the validation report of the
    file (and of the validation split), the cost of training on it, the verdict, and
    the diversity of what it kept against all finished completions (``measuring``:
    that is being measured now)."""
    where = fit_path(export.path, width - 2)
    out = [ReportLine(TITLE, f"export #{export.id} · {export.format} · {export.n_train:,} train"
                             f"{f' / {export.n_valid:,} valid' if export.valid_path else ''}"),
           ReportLine(NOTE, f"→ {where}")]
    if export.valid_path:
        out.append(ReportLine(NOTE, f"→ {fit_path(export.valid_path, width - 2)}"))
    if export.format == "completion":
        out.append(ReportLine(FIGURE, f"separator `{show(export.separator or '')}` · stop `{show(export.stop or '')}`"))
    data = export.report or {}
    out += _kept_lines(data)
    said = (("cut-off completion(s) left out", bool(data.get("cut_off_left_out"))),
            ("held out for evaluation", bool(data.get("held_out"))))
    out += [ReportLine(WARNING, f"warning: {w}") for w in warnings or []
            if not any(marker in w and shown for marker, shown in said)]  # said above, from the record
    ok = True
    for part, title in ((data, None), (data.get("valid"), "validation file")):
        report = ValidationReport.from_dict(part)
        if report is None:
            continue
        report = replace(report, path=title)  # the path is shown above, fitted
        ok = ok and report.ok
        out += report.lines()
    if data.get("cost_line"):
        out.append(ReportLine(FIGURE, f"cost: {data['cost_line']}"))
    out += [ReportLine(TITLE, ""), ReportLine(OK, "ready to fine-tune: f starts a job") if ok
            else ReportLine(ERROR, "fix the errors above before fine-tuning", heading=True)]
    return out + diversity_lines(data.get("diversity"), measuring)


def _kept_lines(data: dict[str, Any]) -> list[ReportLine]:
    """What the export left out at max tokens, and what it held out for evaluation."""
    out = []
    left_out, included = data.get("cut_off_left_out") or 0, data.get("cut_off") or 0
    if left_out:
        out.append(ReportLine(WARNING, f"cut-off: {left_out:,} left out (they hit max tokens); "
                                       f"the cut-off option includes them"))
    elif data.get("include_cut_off") and included:
        out.append(ReportLine(WARNING, f"cut-off: {included:,} included, written as they are (never given a stop)"))
    held = data.get("held_out")
    if held:
        what = [f"{name}={render_value(v)}" for name, values in (held.get("values") or {}).items() for v in values]
        if held.get("combos"):
            what.append(f"{held['combos']} combination(s)")
        out.append(ReportLine(NOTE, f"held out for evaluation: {held.get('cells', 0):,} cell(s), "
                                    f"{held.get('completions', 0):,} completion(s) ({' · '.join(what)}), "
                                    f"in neither file; F7 Eval asks them"))
    return out


def diversity_lines(data: dict[str, Any] | None, measuring: bool = False) -> list[ReportLine]:
    """The diversity table, kept vs all finished (DiversityStats.rows), its labels
    shortened to fit the pane; ↓ lower is more varied, ↑ higher is."""
    if data is None:
        return [ReportLine(TITLE, ""), ReportLine(NOTE, "diversity: measuring kept vs all…")] if measuring else []
    stats = DiversityStats(data.get("min_grade"), data["kept"], data["all"])
    out = [ReportLine(TITLE, ""), ReportLine(TITLE, "diversity of the kept examples"),
           ReportLine(FIGURE, f"{'':<15}{'kept':>9}{'all':>9}")]
    for label, kept, every in stats.rows():
        short, _, why = label.partition(" (")
        arrow = " ↓" if why.startswith("lower") else " ↑" if why.startswith("higher") else ""
        short = short.replace("compression ratio", "compression")
        out.append(ReportLine(FIGURE, f"{short + arrow:<15}{kept:>9}{every:>9}"))
    out.append(ReportLine(NOTE, "↓ lower / ↑ higher is more varied; all: every finished completion"))
    return out


def styled(lines: list[ReportLine]) -> Text:
    """Report lines as Rich text: each styled by its kind, section heads in bold."""
    out = Text()
    for i, line in enumerate(lines):
        if i:
            out.append("\n")
        style = REPORT_STYLES.get(line.kind, "")
        out.append(line.text, style=f"bold {style}".strip() if line.heading else style)
    return out


def export_title(name: str, done: int, rejected: int, cut_off: int, width: int) -> Text:
    """The header: what an export at the defaults takes (done, less the rejected and the
    cut-off ones) in ``width`` columns; the project's name only where it fits (the
    status line has it too)."""
    kept = done - rejected - cut_off
    parts = [f"{done:,} done", f"{kept:,} kept", f"{rejected:,} rejected"]
    if cut_off:
        parts.append(f"{cut_off:,} cut off")
    head = "Export & fine-tune"
    for shown in ([head, name, *parts], [head, *parts], ["Export", *parts]):
        if len(" · ".join(shown)) <= width:
            break
    return Text.assemble((shown[0], "bold"), " · " + " · ".join(shown[1:]))


def export_ok(export: Any) -> bool:
    """Whether an export record's files passed validation (train and validation split)."""
    data = (export.report or {}) if export is not None else {}
    valid = data.get("valid") or {}
    return export is not None and bool(data.get("ok", False)) and bool(valid.get("ok", True))


class ExportDone(Message):
    def __init__(self, result: Any | None, error: str | None) -> None:
        super().__init__()
        self.result = result
        self.error = error


class JobChanged(Message):
    """The followed job's state; ``recorded``: its status change is now in the project."""

    def __init__(self, state: JobState, recorded: bool = False) -> None:
        super().__init__()
        self.state = state
        self.recorded = recorded

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobChanged) and not message.recorded


class DiversityDone(Message):
    def __init__(self, export_id: int, error: str | None) -> None:
        super().__init__()
        self.export_id = export_id
        self.error = error


class ModelExported(Message):
    def __init__(self, done: Any | None, error: str | None) -> None:
        super().__init__()
        self.done = done  # a pipeline ModelExport
        self.error = error


class Loaded(Message):
    def __init__(self, title: Text, export: Any, latest_job: Any) -> None:
        super().__init__()
        self.title = title
        self.export = export
        self.latest_job = latest_job


class ExportScreen(SectionScreen):
    """Export options, the validation report, and the fine-tuning job."""

    MODE = "export"
    CSS_PATH = "export.tcss"
    HELP_TITLE = "Export & fine-tune"
    HELP = ("e writes the kept examples to a JSONL file and validates it: errors, warnings, token counts and "
            "the cost of training on this backend, shown before anything is uploaded (pgdn/pgup scroll the "
            "report). o edits the options: format, min grade, cut-off completions, and what to hold out of "
            "training for F7 Eval (hold out: values such as place=Oslo; combos: whole combinations). "
            "f fine-tunes on the current backend once the export has no errors, with a live loss chart; "
            "c cancels the job; p tries the tuned model in the playground; x exports it for another engine "
            "(hf, gguf [q8_0] for llama.cpp, ollama, vllm; then a directory) and shows the command that runs it "
            "there. d measures the kept set's diversity.")
    AUTO_FOCUS = ""  # letters are commands until `o` (or tab) enters the options
    BINDINGS = [
        Binding("e", "export", "Export+validate", id="export.run"),
        Binding("f", "finetune", "Fine-tune", id="export.finetune"),
        Binding("c", "cancel_job", "Cancel job", id="export.cancel_job"),
        Binding("p", "playground", "Try model", id="export.playground"),
        Binding("o", "edit_options", "Options", id="export.options"),
        Binding("d", "diversity", "Measure diversity", show=False, id="export.diversity"),
        Binding("x", "export_model", "Export model", show=False, id="export.model"),
        Binding("escape", "leave_options", "Done editing", show=False, id="export.leave"),
        # The report is taller than its box at 80x24 (token statistics, cost, verdict):
        # these keys scroll it from anywhere, as the hint on the job pane's top rule says.
        Binding("pagedown", "scroll_report(1)", "report down", show=False, id="export.report_down"),
        Binding("pageup", "scroll_report(-1)", "report up", show=False, id="export.report_up"),
    ]

    title_text: reactive[Text] = reactive(Text, init=False)
    """The header: the project's name and counts, as the store has them now."""
    export: reactive[Any] = reactive(None, init=False, bindings=True)
    """The latest export recorded in the project (an ExportRecord)."""
    note: reactive[str] = reactive("", init=False)
    """What the report pane says instead of a report (while exporting)."""
    job: reactive[JobState] = reactive(JobState, init=False, bindings=True)
    error: reactive[str] = reactive("", init=False)
    busy: reactive[str | None] = reactive(None, bindings=True)  # exporting | uploading | cancelling
    measuring: reactive[int | None] = reactive(None, init=False, bindings=True)
    """The export whose diversity a worker is measuring (None: none)."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.result: Any = None  # this session's latest ExportResult (its warnings are not recorded)
        self.poll_s = 1.0
        self._following: str | None = None  # the job a follow worker is on
        self._seen_job: tuple[str, str] | None = None  # (id, status) of the stored job last shown
        self._announced: str | None = None

    @property
    def default_path(self) -> Path:
        return default_export_path(self.ctx.path)

    # -- layout ---------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        yield Static(id="exp-title")
        with Horizontal(id="exp-main"):
            with Vertical(id="exp-form"):
                yield Static("export", classes="form-head")
                yield from self._row("format", Select(FORMATS, value="chat", allow_blank=False, compact=True,
                                                      id="opt-format"))
                yield from self._row("min grade", Input(id="opt-min_grade", placeholder=EXPORT["min_grade"].unset,
                                                        compact=True))
                yield from self._row("separator", Input(id="opt-separator", placeholder="auto", compact=True))
                yield from self._row("stop", Input(id="opt-stop", placeholder="auto", compact=True))
                yield from self._row("valid frac", Input("0", id="opt-validation_fraction", compact=True))
                yield from self._row("output", Input(fit_path(self.default_path, 10_000), id="opt-out_path",
                                                     compact=True))
                yield from self._row("cut-off", Select(CUT_OFF_CHOICES, value="no", allow_blank=False, compact=True,
                                                       id="opt-include_cut_off"))
                yield from self._row("hold out", Input(id="opt-hold_out", placeholder="none · place=Oslo",
                                                       compact=True))
                yield from self._row("combos", Input(id="opt-hold_out_combos", placeholder="0", compact=True))
                yield Static("fine-tune", classes="form-head spaced")
                yield from self._row("base model", Input(id="opt-base_model", placeholder="backend default",
                                                         compact=True))
                yield from self._row("epochs", Input(id="opt-epochs", placeholder=FINETUNE["epochs"].unset,
                                                     compact=True))
                yield from self._row("suffix", Input(id="opt-suffix", placeholder="none", compact=True))
            with Vertical(id="exp-right"):
                with VerticalScroll(id="exp-report-box"):
                    yield Static(id="exp-report")
                with Vertical(id="exp-job"):
                    yield Static(id="exp-job-status")
                    yield Static(id="exp-job-events")
                    yield Static(id="exp-exit")
                    yield Static(id="exp-loss-legend")
                    yield PlotextPlot(id="exp-loss")
        yield Static(id="exp-error")

    def _row(self, label: str, widget) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label(label, classes="field-label")
            yield widget

    def on_mount(self) -> None:
        self.query_one("#exp-loss").can_focus = False
        self.query_one("#exp-exit").display = False  # until a model is exported (x)
        report_box = self.query_one("#exp-report-box")
        report_box.can_focus = False
        for attribute in ("virtual_size", "size", "scroll_y"):
            self.watch(report_box, attribute, lambda *_: self._report_hint(), init=False)
        self._sync_format("chat")
        # Until an export says otherwise (it refills the form), the project's proposal:
        # the demo holds place=Oslo out, so F7 Eval has held-out prompts at once.
        self.query_one("#opt-hold_out", Input).value = " ".join(proposed_hold_out(self.ctx.path))
        self._render_report()
        self._render_job()
        self.load_state()

    # -- showing what the state holds --------------------------------------------
    def watch_title_text(self, text: Text) -> None:
        self.query_one("#exp-title", Static).update(text)

    def watch_export(self, old: Any, new: Any) -> None:
        if new is not None and (old is None or old.id != new.id):
            self._fill_from_export(new)
        self._render_report()

    def watch_note(self) -> None:
        self._render_report()

    def watch_measuring(self) -> None:
        self._render_report()

    def watch_job(self) -> None:
        self._render_job()

    def watch_error(self, message: str) -> None:
        widget = self.query_one("#exp-error", Static)
        widget.display = bool(message)
        widget.update(Text(message, style="bold red"))

    def on_resize(self) -> None:
        self._render_report()  # the paths are fitted to the pane's width

    def _report_width(self) -> int:
        width = self.query_one("#exp-report-box").scrollable_content_region.width
        return max(width - 1, 20) if width else 44

    def _render_report(self) -> None:
        if self.note:
            text = Text(self.note, style="yellow")
        elif self.export is None:
            text = Text("e exports and validates: nothing is uploaded before you see this report.", style="dim")
        else:
            warnings = self.result.warnings if self.result and self.result.export_id == self.export.id else None
            measuring = self.measuring is not None and self.measuring == self.export.id
            text = styled(report_lines(self.export, self._report_width(), warnings, measuring))
        report = self.query_one("#exp-report", Static)
        if str(report.render()) != str(text):  # a new report starts at its top
            self.query_one("#exp-report-box").scroll_home(animate=False)
        report.update(text)

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

    def _render_job(self) -> None:
        job = self.job
        if job.id is None and not job.error and not job.status:
            status = Text("no job yet · f fine-tunes on the current backend once the export has no errors",
                          style="dim")
        else:
            status = Text()
            if job.fine_tuned_model:
                # First, so it is never the line cut off: the id a person copies or tries (p).
                status.append(f"{job.fine_tuned_model}\n", style="bold green")
            status.append_text(Text.assemble(("job ", "dim"), (job.id or "–", ""), "  ",
                                             (job.status, JOB_STYLES.get(job.status, "bold"))))
            if job.took_s is not None:  # beside the report's estimate: what it really took
                status.append(f" in {format_duration(job.took_s)}", style="dim")
            if job.model:
                status.append(f" · {job.model}", style="dim")
            if job.error:
                status.append(f"\n{job.error}", style="red")
        self.query_one("#exp-job-status", Static).update(status)
        events = self.query_one("#exp-job-events", Static)
        events.update(Text(job.message or "", style="dim", no_wrap=True, overflow="ellipsis"))
        events.display = bool(job.message)
        self._render_chart(job)

    def _render_chart(self, job: JobState) -> None:
        """The loss curves, their legend on its own line above the plot (never over the curves)."""
        legend = Text(no_wrap=True, overflow="ellipsis")
        if job.losses:
            legend.append("loss  ", style="bold")
            step = f"step {int(job.steps[-1])}" + (f"/{job.total_steps}" if job.total_steps else "")
            legend.append(f"━ train {job.losses[-1]:.3f}", style="rgb({},{},{})".format(*TRAIN_RGB))
            if job.valid_losses:
                legend.append(f"  ━ valid {job.valid_losses[-1]:.3f}", style="rgb({},{},{})".format(*VALID_RGB))
            legend.append(f"  · {step}", style="dim")
            if job.eta_s is not None:  # measured from the job's own steps
                legend.append(f" · ETA {format_duration(job.eta_s)}", style="dim")
        legend_line = self.query_one("#exp-loss-legend", Static)
        legend_line.update(legend)
        plot = self.query_one("#exp-loss", PlotextPlot)
        legend_line.display = plot.display = bool(job.losses)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        if job.losses:
            plt.plot(job.steps, job.losses, marker="braille", color=TRAIN_RGB)
        if job.valid_losses:
            plt.plot(job.valid_steps, job.valid_losses, marker="braille", color=VALID_RGB)
        plot.refresh()

    # -- the form ------------------------------------------------------------------
    def _raw(self) -> dict[str, str]:
        raw = {w.id.removeprefix("opt-"): w.value for w in self.query(Input) if w.id and w.id.startswith("opt-")}
        raw["format"] = str(self.query_one("#opt-format", Select).value)
        raw["include_cut_off"] = str(self.query_one("#opt-include_cut_off", Select).value)
        return raw

    def _sync_format(self, fmt: str) -> None:
        for name in ("separator", "stop"):
            self.query_one(f"#opt-{name}", Input).disabled = fmt != "completion"

    @on(Select.Changed, "#opt-format")
    def _format_changed(self, event: Select.Changed) -> None:
        self._sync_format(str(event.value))

    def _fill_from_export(self, export: Any) -> None:
        """The form says what the latest export used: the next `e` repeats it."""
        self.query_one("#opt-format", Select).value = export.format
        self._sync_format(export.format)
        self.query_one("#opt-min_grade", Input).value = "" if export.min_grade is None else str(export.min_grade)
        self.query_one("#opt-separator", Input).value = _escape(export.separator)
        self.query_one("#opt-stop", Input).value = _escape(export.stop)
        self.query_one("#opt-validation_fraction", Input).value = f"{export.validation_fraction:g}"
        self.query_one("#opt-out_path", Input).value = fit_path(export.path, 10_000)
        data = export.report or {}
        self.query_one("#opt-include_cut_off", Select).value = "yes" if data.get("include_cut_off") else "no"
        held = data.get("held_out") or {}
        self.query_one("#opt-hold_out", Input).value = " ".join(
            f"{name}={render_value(v)}" for name, values in (held.get("values") or {}).items() for v in values)
        self.query_one("#opt-hold_out_combos", Input).value = str(held["combos"]) if held.get("combos") else ""

    def action_edit_options(self) -> None:
        self.call_after_refresh(self.query_one("#opt-format", Select).focus)

    def action_leave_options(self) -> None:
        self.set_focus(None)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.set_focus(None)
        self.action_export()

    # -- reading the project -------------------------------------------------------
    def refresh_from_project(self, what: frozenset[str]) -> None:
        self.load_state()

    @work(thread=True, exclusive=True, group="exp-load", exit_on_error=False)
    def load_state(self) -> None:
        store = self.ctx.store
        counts = store.status_counts()
        try:
            name = self.ctx.spec().name
        except Exception:  # noqa: BLE001 - a broken spec shows on the grid screen; the name falls back
            name = self.ctx.path.stem
        # Cut off at max tokens and not rejected: done, but left out of an export by default.
        cut_off = sum(1 for r in store.review_rows(where="cut_off") if r[2] != 0)
        title = export_title(name, counts.done, counts.rejected, cut_off, self.app.size.width - 2)
        jobs = store.jobs()
        self.post_message(Loaded(title, store.latest_export(), jobs[-1] if jobs else None))

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        self.title_text = message.title
        self.export = message.export
        record = message.latest_job
        if record is None or record.id == self._following or (record.id, record.status) == self._seen_job:
            return  # a job being followed shows its live state, richer than its record
        self._seen_job = (record.id, record.status)
        self.job = JobState.from_record(record)
        if not self.job.finished:
            self.follow(self.job)

    # -- state ------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        job_running = bool(self.job.id) and not self.job.finished
        if action == "export":
            return None if self.busy else True
        if action == "diversity":
            return self.export is not None and self.measuring is None
        if action == "finetune":
            if job_running:
                return False
            return None if (self.busy or not export_ok(self.export)) else True
        if action == "cancel_job":
            return job_running and self.busy != "cancelling"
        if action == "playground":
            return bool(self.job.fine_tuned_model) and self.job.status == "succeeded"
        if action == "export_model":
            if not (self.job.fine_tuned_model and self.job.status == "succeeded"):
                return False
            return None if self.busy else True
        return True

    # -- export -----------------------------------------------------------------
    def action_export(self) -> None:
        try:
            opts = ExportOptions.parse(self._raw(), self.default_path)
            hold_out = opts.hold_out_choice(self.ctx.spec())
        except ValueError as exc:
            self.error = str(exc)
            return
        self.error = ""
        self.busy = "exporting"
        self.note = f"exporting to {fit_path(opts.out_path, self._report_width() - 13)} and validating…"
        self.run_export(opts, hold_out)

    @work(thread=True, exclusive=True, group="exp-export", exit_on_error=False)
    def run_export(self, opts: ExportOptions, hold_out: HoldOut | None = None) -> None:
        from ...pipeline.generation.estimate import backend_for_costs
        from ...pipeline.training.export import export_project

        try:
            result = export_project(
                self.ctx.store, opts.out_path, format=opts.format, min_grade=opts.min_grade,
                separator=opts.separator, stop=opts.stop, validation_fraction=opts.validation_fraction,
                model=opts.base_model, include_cut_off=opts.include_cut_off, hold_out=hold_out,
                backend=backend_for_costs(),
            )
        except Exception as exc:  # noqa: BLE001 - ExportError, a locked file...: one line, inline
            self.post_message(ExportDone(None, one_line(exc)))
        else:
            self.post_message(ExportDone(result, None))

    @on(ExportDone)
    def _export_done(self, message: ExportDone) -> None:
        self.busy = None
        self.note = ""
        if message.error:
            self.error = f"export: {message.error} (nothing was written)"
            return
        self.result = message.result
        self.app.notify(f"exported {self.result.n_train:,} example(s) to {fit_path(self.result.path, 60)}",
                        title="Export")
        self.changed("exports")  # the report comes back from the store, as every other screen sees it
        self.measuring = self.result.export_id
        self.measure_diversity(self.result.export_id)

    # -- diversity ---------------------------------------------------------------
    def action_diversity(self) -> None:
        """Measure (again) the diversity of the latest export: for one the CLI made."""
        if self.export is not None:
            self.measuring = self.export.id
            self.measure_diversity(self.export.id)

    @work(thread=True, exclusive=True, group="exp-diversity", exit_on_error=False)
    def measure_diversity(self, export_id: int) -> None:
        """Seconds on a large project (Self-BLEU over a sample, distinct-n and gzip over
        every text): here, never on the event loop; the result is stored with the export."""
        from ...pipeline.training.export import record_diversity

        error = None
        try:
            export = next((e for e in self.ctx.store.exports() if e.id == export_id), None)
            if export is not None:
                record_diversity(self.ctx.store, export)
        except Exception as exc:  # noqa: BLE001 - a file gone, a locked project: said inline
            error = one_line(exc)
        self.post_message(DiversityDone(export_id, error))

    @on(DiversityDone)
    def _diversity_done(self, message: DiversityDone) -> None:
        if self.measuring == message.export_id:
            self.measuring = None
        if message.error:
            self.error = f"diversity: {message.error}"
        else:
            self.changed("exports")

    # -- fine-tuning ------------------------------------------------------------
    def action_finetune(self) -> None:
        try:
            opts = ExportOptions.parse(self._raw(), self.default_path)
        except ValueError as exc:
            self.error = str(exc)
            return
        if self.export is None:
            return
        self.error = ""
        self.busy = "uploading"
        self.job = JobState(status="uploading the training file…", model=opts.base_model)
        self.start_job(opts, self.export)

    @work(thread=True, exclusive=True, group="exp-job-start", exit_on_error=False)
    def start_job(self, opts: ExportOptions, export: Any) -> None:
        from ...pipeline.training import finetune

        try:
            backend = self.ctx.backend()
            model = opts.base_model or backend.default_model
            if not model:
                raise ValueError(f"give a base model to fine-tune ({backend.label} has no default)")
            job = finetune.start_finetune(
                backend, Path(export.path), model,
                validation_path=Path(export.valid_path) if export.valid_path else None,
                epochs=opts.epochs, suffix=opts.suffix, store=self.ctx.store, export_id=export.id,
            )
        except Exception as exc:  # noqa: BLE001 - refused (OpenAI), backend down...: one message
            self.post_message(JobChanged(JobState(status="refused", model=opts.base_model, error=one_line(exc))))
            self.app.call_from_thread(self._job_started, None)
            return
        self.post_message(JobChanged(JobState(id=job.id, status=job.status, model=job.model), recorded=True))
        self.app.call_from_thread(self._job_started, JobState(id=job.id, status=job.status, model=job.model))

    def _job_started(self, job: JobState | None) -> None:
        self.busy = None
        if job is not None:
            self.follow(job)

    @work(thread=True, exclusive=True, group="exp-job-follow", exit_on_error=False)
    def follow(self, start: JobState) -> None:
        from ...pipeline.training.finetune import JobTracker

        worker = get_current_worker()
        self._following = start.id
        tracker = JobTracker(start.id, model=start.model, status=start.status, store=self.ctx.store)

        def update(state: JobState, recorded: bool) -> None:
            if worker.is_cancelled:
                raise _StopFollowing
            self.post_message(JobChanged(state, recorded))

        try:
            tracker.follow(self.ctx.backend(), poll_s=self.poll_s, on_update=update)
        except _StopFollowing:
            return
        except Exception as exc:  # noqa: BLE001 - the backend went away: say so, keep the screen
            self.post_message(JobChanged(replace(tracker.state, error=one_line(exc))))
        finally:
            self._following = None

    @on(JobChanged)
    def _job_changed(self, message: JobChanged) -> None:
        state = message.state
        self.job = state
        if state.id is not None:
            self._seen_job = (state.id, state.status)
        if message.recorded:
            self.changed("jobs")
        if state.status == "succeeded" and state.fine_tuned_model and self._announced != state.id:
            self._announced = state.id
            self.app.notify(f"{state.fine_tuned_model} is ready: p tries it in the playground", title="Fine-tuning")

    def action_cancel_job(self) -> None:
        if self.job.id:
            self.busy = "cancelling"
            self.cancel_job(self.job.id)

    @work(thread=True, exclusive=True, group="exp-job-cancel", exit_on_error=False)
    def cancel_job(self, job_id: str) -> None:
        from ...pipeline.training import finetune

        error = None
        try:
            finetune.cancel_job(self.ctx.backend(), job_id)
        except Exception as exc:  # noqa: BLE001 - shown inline
            error = one_line(exc)
        self.app.call_from_thread(self._cancelled, error)

    def _cancelled(self, error: str | None) -> None:
        self.busy = None
        if error:
            self.error = f"cancel: {error}"
        else:
            self.app.notify("cancel requested", title="Fine-tuning")

    def action_playground(self) -> None:
        self.post_message(OpenPlayground(self.job.fine_tuned_model))

    # -- exits: the tuned model for another engine ------------------------------------
    def action_export_model(self) -> None:
        from ..widgets.modals import AskModal

        model = self.job.fine_tuned_model
        default = f"gguf {fit_path(self.ctx.path.with_name(self.ctx.path.stem + '-gguf'), 10_000)}"
        question = (f"Export {model} for another engine: hf (transformers, vLLM), gguf (llama.cpp; "
                    "add q8_0 for 8-bit), ollama (GGUF + Modelfile) or vllm (LoRA adapter), then a new directory")

        def chosen(text: str | None) -> None:
            if not text or not model:
                return
            try:
                to, quant, out = parse_exit(text, self.ctx.path.with_name(self.ctx.path.stem))
            except ValueError as exc:
                self.error = str(exc)
                return
            self.error = ""
            self.busy = "exporting the model"
            self.export_tuned(model, to, quant, out)

        self.app.push_screen(AskModal(question, value=default, title="Export model"), chosen)

    @work(thread=True, exclusive=True, group="exp-model-export", exit_on_error=False)
    def export_tuned(self, model: str, to: str, quant: str | None, out: Path) -> None:
        from ...pipeline.training import finetune

        try:
            done = finetune.export_model(self.ctx.backend(), model, out, to=to, quant=quant)
        except Exception as exc:  # noqa: BLE001 - refused (not empty, unknown model...): one line, inline
            self.post_message(ModelExported(None, one_line(exc)))
        else:
            self.post_message(ModelExported(done, None))

    @on(ModelExported)
    def _model_exported(self, message: ModelExported) -> None:
        self.busy = None
        widget = self.query_one("#exp-exit", Static)
        if message.error:
            self.error = f"export model: {message.error}"
            return
        done = message.done
        text = Text(f"{done.target} → {fit_path(done.output_dir, 60)}\n", style="bold")
        for command in done.commands:
            text.append(f"$ {command}\n", style="")
        widget.update(text)
        widget.display = True
        self.app.notify(f"wrote {fit_path(done.output_dir, 60)}; run: {done.commands[0] if done.commands else ''}",
                        title="Export model")


class _StopFollowing(Exception):
    """The screen stopped following (the worker was cancelled)."""
