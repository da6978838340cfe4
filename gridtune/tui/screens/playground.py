"""Playground: prompt the tuned model (and its base beside it) with held-out values.

The prompt is the grid's training template filled with values typed per
variable; the screen suggests values the grid never had and combinations that
were not trained, and marks a combination that *was* in the training data.
Replies stream in; a reply that ran to max tokens without a stop, or that
repeats itself (the repeated n-grams highlighted), gets a warning.

The playground follows the project: the latest export gives the prompt's format,
separator and stop (the title says which export), and the latest tuned model goes
in A with its base model in B. A new export or job (``ProjectChanged`` "exports",
"jobs", or another process's change) moves it along; ``OpenPlayground`` from the
export screen puts that screen's tuned model in A.

From the playground back into the data (issue 11): ``a`` adds a finished answer
to the training data with the values it was asked with (pipeline.promote: marked
as written by its model, graded by the person, default 5; a new cell, kept through
grid edits, when the values are not in the grid), and ``w`` adds those values to
the evaluation set as a case to watch, with a note. Both ask first in a small
dialog; the store is written by the pipeline in a worker, then ``changed(...)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Input, Label, OptionList, Select, Static
from textual.worker import get_current_worker

from ...core.errors import one_line
from ...pipeline.evaluation import playground as pg
from ...pipeline.evaluation.promote import DEFAULT_GRADE
from ...pipeline.format.validate import show
from ...pipeline.spec.grid import coerce_values, render_value
from ...pipeline.spec.options import EVALUATION, GENERATION, OptionError
from ..events import OpenPlayground
from ..section import SectionScreen

FLUSH_S = 0.05  # batch streamed pieces: at most ~20 repaints a second per pane
PANES = ("a", "b")


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _escape(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


def parse_stops(text: str) -> list[str]:
    """Stop sequences as typed: separated by ' | ', with \\n for a newline."""
    return [_unescape(s) for s in text.split(" | ") if s.strip(" ") != "" or s == " "] if text else []


@dataclass
class Loaded:
    spec: Any
    trained: set[str]
    export: Any
    jobs: list[Any]


class StateLoaded(Message):
    def __init__(self, loaded: Loaded) -> None:
        super().__init__()
        self.loaded = loaded


class ModelsListed(Message):
    def __init__(self, models: list[str], error: str | None) -> None:
        super().__init__()
        self.models = models
        self.error = error


class Streamed(Message):
    """New text for a pane (batched), or its end."""

    def __init__(self, pane: str, run: int, text: str, finish_reason: str | None = None,
                 done: bool = False, error: str | None = None) -> None:
        super().__init__()
        self.pane = pane
        self.run = run
        self.text = text
        self.finish_reason = finish_reason
        self.done = done
        self.error = error


class ModelPicker(ModalScreen[str | None]):
    """Pick a model from the backend's list (enter), or escape."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="playground.picker.cancel")]
    DEFAULT_CSS = """
    ModelPicker { align: center middle; }
    ModelPicker > Vertical { width: 60; height: auto; max-height: 18; border: round $primary;
                             background: $surface; padding: 0 1; }
    ModelPicker OptionList, ModelPicker OptionList:focus { height: auto; max-height: 14; border: none; }
    """

    def __init__(self, title: str, models: list[str], current: str) -> None:
        super().__init__()
        self.title_text = title
        self.models = models
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield OptionList(*self.models)

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        if self.current in self.models:
            options.highlighted = self.models.index(self.current)
        options.focus()

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.models[event.option_index])


@dataclass
class Asked:
    """What a run asked: the values and settings, for the answers it gets."""

    values: dict[str, Any]
    format: str
    params: dict[str, Any]


class AnswerDialog(ModalScreen[dict[str, Any] | None]):
    """Add an answer to the data (a grade) or its values to the evaluation set (a note).

    Returns {"pane": "a"|"b", "grade": int} or {"pane": ..., "note": str}; None on escape.
    A bad grade is said in one line and the dialog stays.
    """

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="playground.dialog.cancel")]
    DEFAULT_CSS = """
    AnswerDialog { align: center middle; }
    AnswerDialog > Vertical { width: 64; height: auto; border: round $primary; background: $surface;
                              padding: 0 1; }
    AnswerDialog .form-row { height: 1; }
    AnswerDialog .field-label { width: 8; color: $text-muted; }
    AnswerDialog .form-row Input, AnswerDialog .form-row Select { width: 1fr; }
    AnswerDialog #dlg-error { color: $error; text-style: bold; height: auto; }
    AnswerDialog #dlg-hint { color: $text-muted; }
    """

    def __init__(self, kind: str, values_text: str, panes: dict[str, str], default_note: dict[str, str]) -> None:
        super().__init__()
        self.kind = kind  # "promote" | "watch"
        self.values_text = values_text
        self.panes = panes  # pane -> model of a finished answer
        self.default_note = default_note

    def compose(self) -> ComposeResult:
        title = ("Add this answer to the training data" if self.kind == "promote"
                 else "Watch these values in the evaluation set")
        first = next(iter(self.panes))
        with Vertical():
            yield Label(Text(title, style="bold"))
            yield Label(Text(self.values_text, no_wrap=True, overflow="ellipsis"), id="dlg-values")
            if len(self.panes) > 1:
                with Horizontal(classes="form-row"):
                    yield Label("answer", classes="field-label")
                    yield Select([(f"{p.upper()} · {m}", p) for p, m in self.panes.items()], value=first,
                                 allow_blank=False, compact=True, id="dlg-pane")
            else:
                yield Label(Text(f"answer {first.upper()} · {self.panes[first]}", style="dim"))
            with Horizontal(classes="form-row"):
                if self.kind == "promote":
                    yield Label("grade", classes="field-label")
                    yield Input(str(DEFAULT_GRADE), id="dlg-grade", compact=True)
                else:
                    yield Label("note", classes="field-label")
                    yield Input(self.default_note.get(first, ""), id="dlg-note", compact=True)
            yield Static(id="dlg-error")
            yield Label("enter adds · esc cancels", id="dlg-hint")

    def on_mount(self) -> None:
        self.query_one("#dlg-grade" if self.kind == "promote" else "#dlg-note", Input).focus()

    def _pane(self) -> str:
        selects = self.query("#dlg-pane")
        return str(selects.first(Select).value) if selects else next(iter(self.panes))

    @on(Select.Changed, "#dlg-pane")
    def _pane_changed(self, event: Select.Changed) -> None:
        if self.kind == "watch":
            self.query_one("#dlg-note", Input).value = self.default_note.get(str(event.value), "")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.kind == "watch":
            self.dismiss({"pane": self._pane(), "note": event.value.strip()})
            return
        try:
            grade = EVALUATION["grade"].parse(event.value)
        except OptionError as exc:
            self.query_one("#dlg-error", Static).update(str(exc))
            return
        self.dismiss({"pane": self._pane(), "grade": grade})


class Added(Message):
    """A promotion or a watched case reached the project (or failed: ``error``)."""

    def __init__(self, kind: str, summary: str, error: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.summary = summary
        self.error = error


class PlaygroundScreen(SectionScreen):
    """Try a model on held-out values, two models side by side."""

    MODE = "playground"
    CSS_PATH = "playground.tcss"
    HELP_TITLE = "Playground"
    HELP = ("The prompt is the grid's training template with the values in the fields, asked the way the "
            "latest export trains (format, separator, stop): the tuned model in A, its base in B. n fills "
            "values the grid never had, h a combination not trained on, t one that was; o edits the fields, "
            "r runs, s stops. m and b pick the models, f switches chat/legacy. Once an answer is in, a adds "
            "it to the training data (graded by you) and w adds its values to the evaluation set (F7).")
    AUTO_FOCUS = ""  # letters are commands; o (or tab) goes into the fields
    BINDINGS = [
        Binding("r", "run", "Run", id="playground.run"),
        Binding("n", "held_out_values", "new values", id="playground.held_out_values"),
        Binding("h", "held_out_combination", "untrained", id="playground.held_out_combination"),
        Binding("t", "trained_combination", "trained", id="playground.trained_combination"),
        Binding("m", "pick_model('a')", "Model A", show=False, id="playground.model_a"),
        Binding("b", "pick_model('b')", "Model B", show=False, id="playground.model_b"),
        Binding("f", "toggle_format", "Chat/legacy", show=False, id="playground.format"),
        Binding("s", "stop_streams", "Stop", id="playground.stop"),
        Binding("a", "promote", "Add", id="playground.promote"),
        Binding("w", "watch", "Watch", id="playground.watch"),
        Binding("o", "edit", "Fields", show=False, id="playground.fields"),
        Binding("escape", "leave_fields", "Done editing", show=False, id="playground.leave"),
    ]

    export: reactive[Any] = reactive(None, init=False)
    """The export the prompts follow: the project's latest (an ExportRecord), or None."""
    format: reactive[str] = reactive("chat", init=False)
    """The prompt's format: the export's, until `f` switches it."""
    error: reactive[str] = reactive("", init=False)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.spec = None
        self.trained: set[str] = set()
        self.jobs: list[Any] = []
        self.models: list[str] = []
        self._opened_with: str | None = None  # the model OpenPlayground asked for, until the next load
        self._models_from_job: str | None = None  # the job whose models A and B were last set from
        self._cycle = {"n": 0, "h": 0, "t": 0}
        self._run = 0
        self._streams: dict[str, dict[str, Any]] = {}
        self._asked: Asked | None = None  # what the latest run asked (its answers' values)

    @property
    def separator(self) -> str | None:
        return self.export.separator if self.export is not None and self.format == "completion" else None

    # -- layout ---------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        yield Static(id="pg-title")
        with Horizontal(id="pg-models", classes="form-row"):
            yield Label("A", classes="field-label")
            yield Input(id="pg-model-a", placeholder="model (m: pick)", compact=True)
            yield Label("B", classes="field-label")
            yield Input(id="pg-model-b", placeholder="none (b: pick one to compare)", compact=True)
        yield Grid(id="pg-vars")
        with Horizontal(id="pg-params", classes="form-row"):
            yield Label("stop", classes="field-label")
            yield Input(id="pg-stop", placeholder="none", compact=True)
            yield Label("temp", classes="field-label")
            yield Input("0.7", id="pg-temperature", compact=True, classes="short")
            yield Label("max tokens", classes="field-label")
            yield Input("200", id="pg-max_tokens", compact=True, classes="short")
        yield Static(id="pg-mark")
        yield Static(id="pg-prompt")
        with Horizontal(id="pg-outputs"):
            for pane in PANES:
                with Vertical(id=f"pg-pane-{pane}", classes="pane"):
                    with VerticalScroll(classes="pane-scroll"):
                        yield Static(id=f"pg-out-{pane}", classes="pane-text")
                    yield Static(id=f"pg-warn-{pane}", classes="pane-warn")
        yield Static(id="pg-error")

    def on_mount(self) -> None:
        for scroll in self.query(".pane-scroll"):
            scroll.can_focus = False
        self.query_one("#pg-pane-b").display = False
        for pane in PANES:
            self.query_one(f"#pg-pane-{pane}").border_title = f"{pane.upper()}"
        self._render_title()
        self.load_state()
        self.list_models()

    # -- following the project ------------------------------------------------------
    @on(OpenPlayground)
    def _opened_for(self, message: OpenPlayground) -> None:
        """Opened from the export screen: its tuned model in A, the job's base in B,
        the prompts as the latest export (read fresh: it may have just changed)."""
        self._opened_with = message.model
        self.load_state()

    def refresh_from_project(self, what: frozenset[str]) -> None:
        if not {"exports", "jobs", "grades", "completions", "external"}.isdisjoint(what):
            self.load_state()

    @work(thread=True, exclusive=True, group="pg-load", exit_on_error=False)
    def load_state(self) -> None:
        store = self.ctx.store
        try:
            spec = self.ctx.spec()
        except Exception as exc:  # noqa: BLE001 - a broken spec: said here, fixed on the grid screen
            self.app.call_from_thread(setattr, self, "error", f"cannot read the grid spec: {one_line(exc)}")
            return
        loaded = Loaded(spec, pg.trained_keys(store), store.latest_export(), store.jobs())
        self.post_message(StateLoaded(loaded))

    @on(StateLoaded)
    async def _state_loaded(self, message: StateLoaded) -> None:
        loaded = message.loaded
        first = self.spec is None
        self.spec, self.trained, self.jobs = loaded.spec, loaded.trained, loaded.jobs
        if first:
            await self._build_vars()
            self._fill(pg.held_out_values(self.spec, 0))
        self.export = loaded.export
        self._follow_jobs(first)
        self.refresh_bindings()  # the held-out keys depend on the spec and the trained cells
        self._update_mark()

    def watch_export(self, old: Any, new: Any) -> None:
        """A new export: prompts in its format, with its separator, and its stop."""
        if new is None or (old is not None and old.id == new.id):
            return
        self.format = new.format
        stop = new.stop if new.format == "completion" else None
        self.query_one("#pg-stop", Input).value = _escape(stop or "")
        self._render_title()
        self._update_mark()

    def watch_format(self) -> None:
        self._render_title()
        self._update_mark()

    def watch_error(self, message: str) -> None:
        widget = self.query_one("#pg-error", Static)
        widget.display = bool(message)
        widget.update(Text(message, style="bold red"))

    def _follow_jobs(self, first: bool) -> None:
        """A in the tuned model, B its base: the one OpenPlayground named, else the latest
        tuned one when it is new (a model a person picked stays until then)."""
        wanted, self._opened_with = self._opened_with, None
        tuned = [j for j in self.jobs if j.fine_tuned_model and j.status == "succeeded"]
        job = next((j for j in reversed(tuned) if j.fine_tuned_model == wanted), None) if wanted else None
        if wanted and job is None:
            self._set_models(wanted, None)
            return
        job = job or (tuned[-1] if tuned else None)
        if job is not None and (job.id != self._models_from_job or wanted):
            self._models_from_job = job.id
            self._set_models(job.fine_tuned_model, job.model)
        elif job is None and first and self.spec.settings.model:
            self._set_models(self.spec.settings.model, None)

    def _set_models(self, a: str, b: str | None) -> None:
        self.query_one("#pg-model-a", Input).value = a
        if b is not None:
            self.query_one("#pg-model-b", Input).value = b

    async def _build_vars(self) -> None:
        grid = self.query_one("#pg-vars", Grid)
        suggestions = pg.suggest_values(self.spec, n=3)
        rows = []
        for name in self.spec.variables:
            hint = ", ".join(render_value(v) for v in suggestions.get(name, []))
            rows.append(Horizontal(
                Label(name, classes="var-label"),
                Input(id=f"var-{name}", placeholder=f"e.g. {hint}" if hint else "", compact=True,
                      suggester=SuggestFromList([render_value(v) for v in suggestions.get(name, [])]
                                                + [render_value(v) for v in self.spec.variables[name]],
                                                case_sensitive=False)),
                classes="var-row",
            ))
        await grid.mount_all(rows)
        width = max((len(n) for n in self.spec.variables), default=4)
        for label in self.query(".var-label"):
            label.styles.width = min(width + 1, 16)

    @work(thread=True, exclusive=True, group="pg-models", exit_on_error=False)
    def list_models(self) -> None:
        from ...pipeline.training import finetune

        try:
            models = finetune.list_models(self.ctx.backend())
        except Exception as exc:  # noqa: BLE001 - BackendError, FinetuneError: shown, not fatal
            self.post_message(ModelsListed([], one_line(exc)))
        else:
            self.post_message(ModelsListed(models, None))

    @on(ModelsListed)
    def _models_listed(self, message: ModelsListed) -> None:
        self.models = message.models
        if message.error:
            self.error = f"models: {message.error}"
        suggester = SuggestFromList(self.models, case_sensitive=False)
        for pane in PANES:
            self.query_one(f"#pg-model-{pane}", Input).suggester = suggester
        model_a = self.query_one("#pg-model-a", Input)
        if not model_a.value and self.models:
            model_a.value = self.models[0]

    # -- showing ----------------------------------------------------------------------
    def _render_title(self) -> None:
        """Which export the prompts follow, with its format, separator and stop."""
        title = Text.assemble(("Playground", "bold"), " · ")
        export = self.export
        if export is None:
            title.append(f"{self.format} · ", style="")
            title.append("no export yet: F5 exports, then the prompts follow it", style="dim")
        else:
            title.append(f"follows export #{export.id} · {export.format}")
            if export.format == "completion":
                title.append(f" · sep '{show(export.separator or '')}' · stop '{show(export.stop or '')}'",
                             style="dim")
            if self.format != export.format:
                title.append(f" · prompting as {self.format} (f)", style="bold yellow")
        title.no_wrap, title.overflow = True, "ellipsis"
        self.query_one("#pg-title", Static).update(title)

    def values(self) -> dict[str, Any]:
        raw = {name: self.query_one(f"#var-{name}", Input).value for name in self.spec.variables}
        return coerce_values(self.spec, raw)

    def _fill(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.query_one(f"#var-{name}", Input).value = render_value(value)
        self._update_mark()

    def _update_mark(self) -> None:
        if self.spec is None:
            return
        values = self.values()
        kind, names = pg.classify(self.spec, values, self.trained)
        style = {pg.TRAINED: "bold yellow", pg.GRID: "bold cyan", pg.HELD_OUT: "bold green",
                 pg.INCOMPLETE: "dim"}[kind]
        icon = {pg.TRAINED: "⚠ ", pg.GRID: "◇ ", pg.HELD_OUT: "◆ ", pg.INCOMPLETE: "· "}[kind]
        self.query_one("#pg-mark", Static).update(Text.assemble((icon + pg.describe(kind, names), style)))
        if kind == pg.INCOMPLETE:
            self.query_one("#pg-prompt", Static).update("")
            return
        prompt = pg.build_prompt(self.spec, values, self.format, self.separator)
        self.query_one("#pg-prompt", Static).update(
            Text(_escape(prompt.text), style="dim", no_wrap=True, overflow="ellipsis"))

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input.id and event.input.id.startswith("var-"):
            self._update_mark()
        elif event.input.id == "pg-model-b":
            self.query_one("#pg-pane-b").display = bool(event.value.strip())

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.set_focus(None)
        self.action_run()

    # -- state -------------------------------------------------------------------------
    def _streaming(self) -> bool:
        return any(not s.get("done", True) for s in self._streams.values())

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_streams":
            return self._streaming()
        if action == "run":
            return None if self._streaming() else True
        if action in ("promote", "watch"):
            return bool(self._answers()) and not self._streaming()
        if action in ("held_out_values", "held_out_combination", "trained_combination"):
            if self.spec is None:
                return None
            if action == "trained_combination":
                return True if self.trained else None
        return True

    # -- intents -------------------------------------------------------------------------
    def action_held_out_values(self) -> None:
        self._cycle["n"] += 1
        self._fill(pg.held_out_values(self.spec, self._cycle["n"]))

    def action_held_out_combination(self) -> None:
        combos = pg.held_out_combinations(self.spec, self.trained, limit=8)
        if not combos:
            self.app.notify("every combination of grid values is in the training data", title="Playground")
            return
        self._fill(combos[self._cycle["h"] % len(combos)])
        self._cycle["h"] += 1

    def action_trained_combination(self) -> None:
        import json

        keys = sorted(self.trained)
        if not keys:
            return
        self._fill(json.loads(keys[self._cycle["t"] % len(keys)]))
        self._cycle["t"] += 1

    def action_toggle_format(self) -> None:
        self.format = "completion" if self.format == "chat" else "chat"

    def action_pick_model(self, pane: str) -> None:
        if not self.models:
            self.app.notify("the backend listed no models; type one", severity="warning")
            self.call_after_refresh(self.query_one(f"#pg-model-{pane}", Input).focus)
            return
        field = self.query_one(f"#pg-model-{pane}", Input)
        models = self.models if pane == "a" else ["(none)"] + self.models

        def picked(model: str | None) -> None:
            if model is not None:
                field.value = "" if model == "(none)" else model

        self.app.push_screen(ModelPicker(f"Model {pane.upper()}", models, field.value), picked)

    def action_edit(self) -> None:
        self.call_after_refresh(self.query_one("#pg-model-a", Input).focus)

    def action_leave_fields(self) -> None:
        self.set_focus(None)

    def action_stop_streams(self) -> None:
        self._run += 1  # late pieces of the old run are dropped
        for pane, stream in self._streams.items():
            if not stream.get("done", True):
                stream["done"] = True
                self._finish(pane, stream, None, stopped=True)
        self.workers.cancel_group(self, "pg-stream")
        self.refresh_bindings()

    def action_run(self) -> None:
        if self.spec is None:
            return
        values = self.values()
        kind, names = pg.classify(self.spec, values, self.trained)
        if kind == pg.INCOMPLETE:
            self.error = "fill in " + ", ".join(names) + " (n suggests held-out values)"
            return
        try:
            temperature = GENERATION["temperature"].parse(self.query_one("#pg-temperature", Input).value or "0.7")
            max_tokens = GENERATION["max_tokens"].parse(self.query_one("#pg-max_tokens", Input).value or "200")
        except OptionError as exc:
            self.error = str(exc)
            return
        models = {pane: self.query_one(f"#pg-model-{pane}", Input).value.strip() for pane in PANES}
        if not models["a"]:
            self.error = "pick a model for A (m)"
            return
        self.error = ""
        prompt = pg.build_prompt(self.spec, values, self.format, self.separator)
        stops = parse_stops(self.query_one("#pg-stop", Input).value)
        self._asked = Asked(dict(values), self.format, {"temperature": temperature, "max_tokens": max_tokens,
                                                        "stop": stops or None})
        self._run += 1
        self._streams = {}
        for pane in PANES:
            model = models[pane]
            box = self.query_one(f"#pg-pane-{pane}")
            box.display = bool(model)
            if not model:
                continue
            box.border_title = f"{pane.upper()} · {model}"
            box.border_subtitle = "streaming…"
            self._streams[pane] = {"text": "", "done": False, "model": model, "max_tokens": max_tokens}
            self.query_one(f"#pg-out-{pane}", Static).update("")
            self.query_one(f"#pg-warn-{pane}", Static).update("")
            self.stream(pane, self._run, model, prompt, stops, temperature, max_tokens)
        self.refresh_bindings()

    @work(thread=True, group="pg-stream", exit_on_error=False)
    def stream(self, pane: str, run: int, model: str, prompt: pg.Prompt, stops: list[str],
               temperature: float, max_tokens: int) -> None:
        worker = get_current_worker()
        buffer: list[str] = []
        last = time.monotonic()
        try:
            backend = self.ctx.backend()
            for piece in pg.stream_reply(backend, model, prompt, stop=stops or None, temperature=temperature,
                                         max_tokens=max_tokens):
                if worker.is_cancelled or run != self._run:
                    return
                if piece.done:
                    self.post_message(Streamed(pane, run, "".join(buffer), piece.finish_reason, done=True))
                    return
                buffer.append(piece.text)
                now = time.monotonic()
                if now - last >= FLUSH_S:
                    self.post_message(Streamed(pane, run, "".join(buffer)))
                    buffer.clear()
                    last = now
        except Exception as exc:  # noqa: BLE001 - backend errors are shown in the pane
            self.post_message(Streamed(pane, run, "".join(buffer), done=True, error=one_line(exc)))

    @on(Streamed)
    def _streamed(self, message: Streamed) -> None:
        stream = self._streams.get(message.pane)
        if message.run != self._run or stream is None or stream.get("done"):
            return
        stream["text"] += message.text
        if message.done:
            stream["done"] = True
            self._finish(message.pane, stream, message.finish_reason, error=message.error)
            self.refresh_bindings()
        else:
            self.query_one(f"#pg-out-{message.pane}", Static).update(Text(stream["text"]))

    def _finish(self, pane: str, stream: dict[str, Any], finish_reason: str | None, *,
                error: str | None = None, stopped: bool = False) -> None:
        text = stream["text"]
        rep = pg.find_repetition(text)
        body = Text(text)
        for a, b in rep.spans:
            body.stylize("reverse yellow", a, b)
        self.query_one(f"#pg-out-{pane}", Static).update(body)
        warnings = Text()
        if error:
            warnings.append(f"✗ {error}", style="bold red")
        if pg.ran_out(finish_reason):
            warnings.append(("\n" if warnings else "") + f"⚠ ran to max tokens ({stream['max_tokens']}) without a stop",
                            style="bold yellow")
        if rep.found:
            warnings.append(("\n" if warnings else "") + f"⚠ {rep.summary()}", style="bold yellow")
        stream["repetition"] = rep
        stream["finish_reason"] = finish_reason
        stream["finished"] = not stopped and not error
        self.query_one(f"#pg-warn-{pane}", Static).update(warnings)
        box = self.query_one(f"#pg-pane-{pane}")
        words = len(text.split())
        box.border_subtitle = ("stopped" if stopped else f"{finish_reason or 'ended'} · {words} words")

    # -- back into the data ------------------------------------------------------------
    def _answers(self) -> dict[str, dict[str, Any]]:
        """Panes whose answer finished with text (not stopped, not failed)."""
        return {pane: st for pane, st in self._streams.items()
                if st.get("done") and st.get("finished") and st["text"].strip()}

    def _values_text(self, kind: str) -> str:
        assert self._asked is not None
        shown = " · ".join(f"{k}={render_value(v)}" for k, v in self._asked.values.items())
        new = kind == "promote" and pg.classify(self.spec, self._asked.values, self.trained)[0] == pg.HELD_OUT
        return shown + (" (new values: a new cell)" if new else "")

    def _open_dialog(self, kind: str) -> None:
        answers = self._answers()
        if not answers or self._asked is None:
            return
        notes = {}
        for pane, st in answers.items():
            problems = []
            if pg.ran_out(st.get("finish_reason")):
                problems.append("ran to max tokens")
            if st.get("repetition") is not None and st["repetition"].found:
                problems.append("repeats itself")
            notes[pane] = f"{st['model']}: {', '.join(problems) or 'watch'}"
        dialog = AnswerDialog(kind, self._values_text(kind), {p: st["model"] for p, st in answers.items()}, notes)
        asked = self._asked

        def chosen(result: dict[str, Any] | None) -> None:
            if result is None:
                return
            stream = answers[result["pane"]]
            if kind == "promote":
                self.promote(asked, stream["text"], stream["model"], stream.get("finish_reason"), result["grade"])
            else:
                self.watch_case(asked, result["note"] or None)

        self.app.push_screen(dialog, chosen)

    def action_promote(self) -> None:
        self._open_dialog("promote")

    def action_watch(self) -> None:
        self._open_dialog("watch")

    @work(thread=True, group="pg-add", exit_on_error=False)
    def promote(self, asked: Asked, text: str, model: str, finish_reason: str | None, grade: int) -> None:
        from ...pipeline.evaluation.promote import promote_answer

        try:
            done = promote_answer(self.ctx.store, self.spec, dict(asked.values), text, model=model, grade=grade,
                                  finish_reason=finish_reason, params={**asked.params, "format": asked.format})
        except Exception as exc:  # noqa: BLE001 - PromoteError, a locked file: one line
            self.post_message(Added("promote", "", one_line(exc)))
        else:
            self.post_message(Added("promote", done.summary()))

    @work(thread=True, group="pg-add", exit_on_error=False)
    def watch_case(self, asked: Asked, note: str | None) -> None:
        from ...pipeline.evaluation.promote import watch_answer

        try:
            new = watch_answer(self.ctx.store, self.spec, dict(asked.values), note)
        except Exception as exc:  # noqa: BLE001 - PromoteError, a locked file: one line
            self.post_message(Added("watch", "", one_line(exc)))
            return
        shown = " ".join(f"{k}={render_value(v)}" for k, v in asked.values.items())
        self.post_message(Added("watch", f"{shown}: added to the evaluation set; F7 Eval asks it" if new
                                else f"{shown} is already in the evaluation set"))

    @on(Added)
    def _added(self, message: Added) -> None:
        if message.error:
            self.error = f"{'add to data' if message.kind == 'promote' else 'watch'}: {message.error}"
            return
        self.error = ""
        self.app.notify(message.summary, title="Added to the data" if message.kind == "promote" else "Eval")
        self.changed(*(("completions", "grades") if message.kind == "promote" else ("eval",)))
