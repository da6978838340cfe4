"""Generate: start, pause, resume and cancel the teacher run; follow it live.

Runs start detached (``runs.start_detached``), so quitting the app or losing the
SSH connection does not stop them; the screen only reads the run row in the
project file and so attaches to a run that is already going when the project is
opened again, or that the command line started meanwhile (it hears of it through
``refresh_from_project``, then follows it about twice a second).

The options form follows the rule the command line follows (see
``pipeline.options``): what it holds is passed to the next run and recorded on
that run; the grid's defaults (the spec's [generation]) change only by ctrl+s,
"save as the grid's defaults". While a run is active the form shows that run's
own settings, read-only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Input, Label, ProgressBar, Sparkline

from ...core.errors import one_line
from ...pipeline.format.cost import budget_text, usd as usd  # usd: the screen's tests read it here
from ...pipeline.generation.progress import Progress, format_duration
from ...pipeline.spec.options import GENERATION
from ...store import CompletionRecord, RunRecord, StatusCounts
from ..context import ProjectContext
from ..section import SectionScreen
from ..widgets.line import Line

if TYPE_CHECKING:
    from ...pipeline.generation.generate import GenerateOptions

POLL_S = 0.5
SPARK_POINTS = 120
ESTIMATE_DEBOUNCE_S = 0.4
ACTIVE = ("starting", "running", "stopping")


@dataclass
class Snapshot:
    """Everything the screen shows, read from the project file in one go."""

    run: RunRecord | None
    progress: Progress | None
    counts: StatusCounts
    tail: list[CompletionRecord]


class Polled(Message):
    """A fresh snapshot; only the newest one matters."""

    def __init__(self, snap: Snapshot) -> None:
        super().__init__()
        self.snap = snap

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Polled)


class Settings:
    """The options form read back into typed values, with the bounds and one-line
    errors of ``pipeline.options`` (the command line's flags use the same)."""

    FIELDS = ("model", "temperature", "max_tokens", "samples", "concurrency", "rpm", "tpm", "max_cost")
    PER_RUN = ("model", "temperature", "max_tokens", "concurrency", "rpm", "tpm", "max_cost")
    """What a run takes from the form; ``samples`` is the grid's (ctrl+s saves it).
    The limits and the budget (``max_cost``) are a run's only: ctrl+s leaves them out."""

    @staticmethod
    def parse(raw: dict[str, str]) -> dict[str, Any]:
        return {name: GENERATION[name].parse(raw.get(name, "")) for name in Settings.FIELDS}

    @staticmethod
    def show(values: dict[str, Any]) -> dict[str, str]:
        """Typed values as the form shows them."""
        return {name: GENERATION[name].format(value) for name, value in values.items() if name in Settings.FIELDS}

    @staticmethod
    def options(values: dict[str, Any]) -> GenerateOptions:
        from ...pipeline.generation.generate import GenerateOptions

        return GenerateOptions(**{name: values[name] for name in Settings.PER_RUN})


class GenerateScreen(SectionScreen):
    """The teacher run: options, controls, progress, rates and a live tail."""

    MODE = "generate"
    CSS_PATH = "generate.tcss"
    HELP_TITLE = "Generate"
    HELP = ("s starts a run with the options shown (o edits them; ctrl+s saves them as the grid's defaults). "
            "Runs go on in the background when the app quits; p pauses, c cancels, s resumes. "
            "b sends the pending cells through the provider's Batch API instead (half the price, results "
            "within 24 h); the batch is followed in the background, and b (or s) picks it up again.")
    AUTO_FOCUS = ""  # letters are commands until `o` (or tab) enters the options
    BINDINGS = [
        # On a cold local server s starts the server alone: the estimate comes before the run.
        Binding("s", "start_server", "Start server", tooltip="start the local server (then see the estimate)",
                id="generate.start_server"),
        Binding("s", "start", "Start", id="generate.start"),
        Binding("s", "resume", "Resume", id="generate.resume"),
        Binding("b", "start_batch", "Batch", show=False, id="generate.batch",
                tooltip="generate through the Batch API (half price, within 24 h)"),
        Binding("p", "pause", "Pause", id="generate.pause"),
        Binding("c", "cancel", "Cancel", id="generate.cancel"),
        Binding("o", "edit_settings", "Options", id="generate.options"),
        Binding("ctrl+s", "save_defaults", "save defaults", tooltip="save the options as the grid's defaults",
                id="generate.save_defaults"),
        Binding("escape", "leave_settings", "Done editing", show=False, id="generate.leave"),
    ]

    def __init__(self, ctx: ProjectContext) -> None:
        super().__init__(ctx)
        self.snap: Snapshot | None = None
        self.busy: str | None = None  # "starting" | "stopping" while a control call runs
        self.error: str | None = None
        self.defaults: dict[str, str] = {}  # the spec's [generation], as the form shows it
        self.spec_line: tuple[str, int] = (ctx.path.stem, 0)
        self._attached = False  # the form shows an active run's settings, not the next run's
        self._form_before: dict[str, str] | None = None  # the next run's form, kept while attached
        self._rates: list[float] = []
        self._last_elapsed: float | None = None
        self._timer: Timer | None = None
        self.poll_interval = POLL_S
        self.estimate: str | None = None  # the time estimate for the next run, in words
        self.budget: str | None = None  # with a max cost: what the next run could cost, and what the budget does
        self._server_start: float | None = None  # when a start began that must start the local server
        self.server_cold = False  # no local server runs yet (and no OPENAI_* settings): s starts it first
        self._estimate_timer: Timer | None = None

    # -- layout ---------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        with Vertical(id="gen-body"):
            yield Line(id="gen-title")
            with Vertical(id="gen-settings"):
                with Horizontal(classes="form-row"):
                    yield Label("model", classes="field-label")
                    yield Input(id="set-model", placeholder=GENERATION["model"].unset, compact=True)
                    yield Label("temp", classes="field-label")
                    yield Input(id="set-temperature", compact=True, classes="short")
                    yield Label("max tokens", classes="field-label")
                    yield Input(id="set-max_tokens", compact=True, classes="short")
                    yield Label("samples", classes="field-label")
                    yield Input(id="set-samples", compact=True, classes="short")
                with Horizontal(classes="form-row"):  # how the run goes: the run's only
                    yield Label("concurrency", classes="field-label")
                    yield Input(id="set-concurrency", placeholder=GENERATION["concurrency"].unset, compact=True,
                                classes="short")
                    yield Label("rpm", classes="field-label")
                    yield Input(id="set-rpm", placeholder=GENERATION["rpm"].unset, compact=True, classes="short")
                    yield Label("tpm", classes="field-label")
                    yield Input(id="set-tpm", placeholder=GENERATION["tpm"].unset, compact=True, classes="short")
                    yield Label("max cost $", classes="field-label")
                    yield Input(id="set-max_cost", placeholder=GENERATION["max_cost"].unset, compact=True,
                                classes="short")
            yield Line(id="gen-state")
            with Horizontal(id="gen-progress-row"):
                yield ProgressBar(id="gen-progress", show_eta=False)
                yield Line(id="gen-fraction")
            yield Line(id="gen-counts")
            yield Line(id="gen-rates")
            yield Line(id="gen-note")
            with Horizontal(id="gen-spark-row"):
                yield Label("req/s", id="gen-spark-label")
                yield Sparkline([], id="gen-spark")
            yield Line("Newest completions", id="gen-tail-title")
            yield Line(id="gen-tail")
            yield Line(id="gen-error")

    def on_mount(self) -> None:
        self.query_one("#gen-progress", ProgressBar).can_focus = False
        self.query_one("#gen-settings").border_title = "options for the next run"
        self.load_settings()
        self.poll()
        self._timer = self.set_interval(self.poll_interval, self._tick)

    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()  # catches up on what changed while hidden
        if self._timer is not None:
            self.poll()
            self._timer.resume()

    def _tick(self) -> None:
        """Follow an active run (its heartbeat) and a start's phase closely; when
        nothing runs, ``refresh_from_project`` says when to look again."""
        if self.busy or self._active():
            self.poll()

    def refresh_from_project(self, what: frozenset[str]) -> None:
        """A run started or ended elsewhere (the CLI, another app), completions came
        in, the grid or its defaults changed: read it all again."""
        self.poll()
        if not what.isdisjoint({"grid", "settings", "external"}):
            self.load_settings()

    # -- reading the store (threads) --------------------------------------------
    @work(thread=True, exclusive=True, group="gen-settings", exit_on_error=False)
    def load_settings(self) -> None:
        try:
            spec = self.ctx.reload_spec()
        except Exception as exc:  # noqa: BLE001 - shown inline
            self.app.call_from_thread(self._show_error, f"cannot read the grid spec: {one_line(exc)}")
            return
        s = spec.settings
        values = Settings.show({"model": s.model, "temperature": s.temperature, "max_tokens": s.max_tokens,
                                "samples": s.samples})
        self.app.call_from_thread(self._fill_settings, values, spec.name, spec.cell_count)

    def _fill_settings(self, defaults: dict[str, str], name: str, cells: int) -> None:
        """The spec's defaults into the form, where the form still shows the old ones
        (what a person typed for the next run stays)."""
        old, self.defaults = self.defaults, defaults
        form = self._form_before if self._attached else None
        for key, value in defaults.items():
            if form is not None:
                if form.get(key, "") == old.get(key, ""):
                    form[key] = value
                if key in Settings.PER_RUN:  # shown from the active run; samples is the grid's
                    continue
            field = self.query_one(f"#set-{key}", Input)
            if field.value == old.get(key, ""):
                field.value = value
        self.spec_line = (name, cells)
        self._render_title()
        self.refresh_estimate()

    def refresh_estimate(self) -> None:
        """Estimate the next run with the options shown (in a thread: it asks the server)."""
        if self._attached:
            return
        try:
            values = Settings.parse(self._raw_settings())
        except ValueError:
            return  # the inline error says what is wrong; the last estimate stays
        self.estimate_run(Settings.options(values))

    @work(thread=True, exclusive=True, group="gen-estimate", exit_on_error=False)
    def estimate_run(self, options: GenerateOptions) -> None:
        from ...pipeline.generation.estimate import local_server_starting
        from ...pipeline.generation.generate import nothing_to_generate, preview_run, worst_cost

        budget = None
        cold = False
        try:
            cold = local_server_starting()
            if cold and nothing_to_generate(self.ctx.store, options) is not None:
                # Nothing to do needs no server to say so (and s then says why, starting nothing).
                text, cold = "nothing left to generate", False
            elif cold:  # never start the server unasked: s starts it (alone), then this estimates
                text = ("no estimate until the local server runs: s starts it (the first start fetches "
                        "the model, ~1 min) and estimates; s again starts the run")
            else:
                plan, estimate = preview_run(self.ctx.path, options, start_local=False)
                text = estimate.text
                if options.max_cost is not None:
                    budget = budget_text(options.max_cost, *worst_cost(self.ctx.store, plan, options)[:2])
        except Exception as exc:  # noqa: BLE001 - no estimate is not an error
            text = f"no estimate: {one_line(exc)}"
        self.app.call_from_thread(self._show_estimate, text, budget, cold)

    def _show_estimate(self, text: str, budget: str | None = None, cold: bool = False) -> None:
        self.estimate, self.budget = text, budget
        if cold != self.server_cold:
            self.server_cold = cold
            self.refresh_bindings()  # s: start the server, or start the run
        self._render_note()

    @work(thread=True, exclusive=True, group="gen-poll", exit_on_error=False)
    def poll(self) -> None:
        from ...pipeline.generation import runs

        store = self.ctx.store
        run = runs.reconcile(store) or store.latest_run()
        progress = Progress.from_dict(run.progress) if run and run.progress else None
        counts = store.status_counts()
        tail = store.completions(status="done", limit=12, newest_first=True)
        self.post_message(Polled(Snapshot(run, progress, counts, tail)))

    # -- showing it ---------------------------------------------------------------
    def _set(self, widget_id: str, text: Text | str) -> None:
        """Set a line; it repaints only if what it says changed."""
        self.query_one(f"#{widget_id}", Line).text = text

    def _render_title(self) -> None:
        name, cells = self.spec_line
        total = self.snap.counts.completions if self.snap else 0
        self._set("gen-title", Text.assemble(
            ("Generate", "bold"), f" · {name} · {cells:,} cells · {total:,} completions",
        ))

    @on(Polled)
    def _on_polled(self, message: Polled) -> None:
        self.snap = snap = message.snap
        self._render_title()
        run, p, counts = snap.run, snap.progress, snap.counts
        active = bool(run and run.state in ACTIVE)
        self._set("gen-state", self._state_text(run, p, active))
        # Progress over the whole grid (a resumed run's total is only what was left).
        total = counts.completions or 1
        finished = counts.done + counts.failed
        bar = self.query_one("#gen-progress", ProgressBar)
        if (bar.total, bar.progress) != (total, finished):
            bar.update(total=total, progress=finished)
        self._set("gen-fraction", f"{counts.done:,}/{counts.completions:,}")
        # The counts are read now; the run's in-flight figure is its last heartbeat's,
        # which at the end of a run can still name requests whose rows are done: only
        # rows still marked running can be in flight, so pending never goes below 0.
        in_flight = min(p.in_flight, counts.running) if (p and active) else 0
        self._set("gen-counts", Text.assemble(
            ("done ", "dim"), (f"{counts.done:,}", "bold green"),
            ("   failed ", "dim"), (f"{counts.failed:,}", "bold red" if counts.failed else "bold"),
            ("   in flight ", "dim"), (f"{in_flight:,}", "bold"),
            ("   pending ", "dim"), (f"{counts.pending + counts.running - in_flight:,}", "bold"),
        ))
        if p is not None:
            cost = "unknown" if p.cost_usd is None else f"${p.cost_usd:,.4f}"
            eta = format_duration(p.eta_s) if (p.eta_s is not None and active) else "–"
            rates = Text.assemble(
                (f"{p.requests_per_s:.1f}", "bold"), (" req/s   ", "dim"),
                (f"{p.tokens_per_s:,.0f}", "bold"), (" tok/s   ", "dim"),
                ("cost ", "dim"), (cost, "bold"), ("   ETA ", "dim"), (eta, "bold"),
            )
            if active and p.elapsed_s != self._last_elapsed:
                self._last_elapsed = p.elapsed_s
                self._rates = (self._rates + [p.requests_per_s])[-SPARK_POINTS:]
                self.query_one("#gen-spark", Sparkline).data = list(self._rates)
        else:
            rates = Text("req/s, tok/s, cost and ETA appear once a run is going", style="dim")
        self._set("gen-rates", rates)
        self._set("gen-tail", self._tail_text(snap.tail))
        self._sync_controls(active)
        self._render_note()

    def _state_text(self, run: RunRecord | None, p: Progress | None, active: bool) -> Text:
        if self.busy == "starting" and not active:
            return Text(self._starting_text(), style="yellow")
        if run is None:
            return Text("no run yet · s to start", style="dim")
        label = "paused" if run.state == "stopped" else run.state
        if self.busy == "stopping" and active:
            label = "stopping"
        style = {"running": "bold green", "starting": "yellow", "stopping": "yellow",
                 "finished": "bold", "failed": "bold red", "died": "bold red"}.get(run.state, "")
        state = Text.assemble(("● " if active else "○ ", style), (label, style), f"  run #{run.id}")
        if run.model:
            state.append(f" · {run.model}")
        if p is not None:
            state.append(f" · {format_duration(p.elapsed_s)}")
        if run.error and not active:
            state.append(f" · {run.error}", style="red")
        elif p is not None and p.stopped_by and not active:
            state.append(f" · {p.stopped_by}", style="yellow")
        if p is not None and p.phase and active:
            state.append(f" · {p.phase}", style="yellow")
        return state

    def _starting_text(self) -> str:
        if self._server_start is None:
            return "starting a run…"
        from ...pipeline.generation.estimate import local_server_phase

        return local_server_phase(self._server_start)

    def _render_note(self) -> None:
        """Under the rates: the run's time estimate, and why requests were retried."""
        snap = self.snap
        run = snap.run if snap else None
        p = snap.progress if snap else None
        active = bool(run and run.state in ACTIVE)
        note = Text()
        if active:
            # The estimate made at the run's start, only until the run has measured its own
            # speed: then the ETA above says more, and two figures side by side mislead.
            measured = p is not None and (p.done or p.failed or p.tokens_per_s > 0)
            estimate = p.estimate if (p is not None and not p.retries and not measured) else None
        else:
            estimate = None if self.busy == "starting" else self.estimate  # starting: the state line says
        if estimate:
            if estimate[0].isdigit() or estimate.startswith(("about", "up to", "at least")):
                note.append("estimate: ", style="dim")
            note.append(estimate)
            if self.budget and not active:
                note.append("\n")
                note.append(self.budget)
        if p is not None and p.retries:
            if note.plain:
                note.append("\n")
            note.append(p.retry_text() if active else f"last run: {p.retry_text()}", style="yellow")
        self._set("gen-note", note)

    def _tail_text(self, tail: list[CompletionRecord]) -> Text:
        if not tail:
            return Text("nothing generated yet", style="dim")
        out = Text(no_wrap=True, overflow="ellipsis")
        for i, c in enumerate(tail):
            if i:
                out.append("\n")
            cell = "·".join(str(v) for v in c.values.values())
            preview = " ".join((c.text or "").split())
            out.append(f"#{c.id:<5}", style="dim")
            out.append(f"{cell[:28]:<28} ", style="cyan")
            out.append(f"{c.length or 0:>5} ", style="dim")
            out.append(preview)
        return out

    def _sync_controls(self, active: bool) -> None:
        if active and not self._attached and self.snap and self.snap.run:
            self._attached = True
            self._form_before = self._raw_settings()  # the next run's options, back when this one ends
            self._show_run_settings(self.snap.run)
        elif self._attached and not active:
            self._attached = False
            for key, value in (self._form_before or self.defaults).items():
                self.query_one(f"#set-{key}", Input).value = value
            self._form_before = None
            self.refresh_estimate()
        settings = self.query_one("#gen-settings")
        settings.border_title = "this run's options (read-only)" if self._attached else "options for the next run"
        for field in Settings.FIELDS:
            self.query_one(f"#set-{field}", Input).disabled = self._attached
        self.refresh_bindings()

    def _show_run_settings(self, run: RunRecord) -> None:
        """While a run is active, the form shows what it runs with: it may have been
        started from the command line with other settings than the form's."""
        p = run.params or {}
        # A run recorded without a max cost had none (runs before it was recorded too).
        values = Settings.show({"model": run.model, "max_cost": None,
                                **{k: p[k] for k in Settings.PER_RUN if k in p}})
        for key, value in values.items():
            self.query_one(f"#set-{key}", Input).value = value

    def _show_error(self, message: str | None) -> None:
        self.error = message
        widget = self.query_one("#gen-error", Line)
        widget.display = bool(message)
        widget.text = Text(message or "", style="bold red")

    # -- state -----------------------------------------------------------------
    def _active(self) -> bool:
        return bool(self.snap and self.snap.run and self.snap.run.state in ACTIVE)

    def _can_resume(self) -> bool:
        """Something was started before and work is left: s resumes it."""
        snap = self.snap
        return bool(snap and snap.run and (snap.counts.pending or snap.counts.failed))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "start_server":
            return self.server_cold and not (self._active() or self.busy)
        if action in ("start", "resume") and self.server_cold and not self.busy:
            return False  # s starts the server first
        if action == "start_batch":
            return not (self._active() or self.busy)
        if action in ("start", "resume"):
            if self._active() or self.busy:
                return False
            resume = self._can_resume()
            return resume if action == "resume" else not resume
        if action in ("pause", "cancel"):
            return self._active() and self.busy != "stopping"
        if action == "save_defaults":
            return not self._attached
        return True

    # -- intents ------------------------------------------------------------------
    def _raw_settings(self) -> dict[str, str]:
        return {f: self.query_one(f"#set-{f}", Input).value for f in Settings.FIELDS}

    def _parsed(self) -> dict[str, Any] | None:
        """The form's values, or None after showing what is wrong."""
        try:
            values = Settings.parse(self._raw_settings())
        except ValueError as exc:
            self._show_error(str(exc))
            return None
        self._show_error(None)
        return values

    def action_start(self) -> None:
        self._start()

    def action_start_server(self) -> None:
        if self._startable() is None:
            return  # the form is wrong: said inline, as s would with a running server
        self.busy = "starting"
        self._server_start = time.time()  # the state line shows the server's phase meanwhile
        self.refresh_bindings()
        self._set("gen-state", Text(self._starting_text(), style="yellow"))
        self.start_server()

    @work(thread=True, exclusive=True, group="gen-control", exit_on_error=False)
    def start_server(self) -> None:
        from ...pipeline.client.resolve import resolve_backend

        try:
            resolve_backend(start_local=True)
        except Exception as exc:  # noqa: BLE001 - BackendError (no model, no extra): shown inline
            self.app.call_from_thread(self._control_done, one_line(exc))
        else:
            self.app.call_from_thread(self._server_ready)

    def _server_ready(self) -> None:
        self.server_cold = False
        self._control_done(None)
        self.notify("the local server runs: the estimate is below; s starts the run", title="Generate")
        self.refresh_estimate()

    def action_resume(self) -> None:
        self._start()

    def action_start_batch(self) -> None:
        self._start(batch=True)

    def _startable(self, batch: bool = False) -> dict[str, Any] | None:
        """The form's values if a run could start with them, else None after saying why."""
        values = self._parsed()
        if values is None:
            return None
        if self.defaults and Settings.show({"samples": values["samples"]})["samples"] != self.defaults.get("samples"):
            self._show_error("samples is the grid's, not a run's: ctrl+s saves it as the grid's default first")
            return None
        if batch and values["max_cost"] is not None:  # a batch is sent whole: nothing could stop it part-way
            self._show_error("max cost applies to live runs (s), not to a batch (b): a batch is sent whole")
            return None
        return values

    def _start(self, batch: bool = False) -> None:
        values = self._startable(batch)
        if values is None:
            return
        self.busy = "starting"
        self.refresh_bindings()
        self._set("gen-state", Text("starting a run…", style="yellow"))
        self.start_run(Settings.options(values), batch)

    @work(thread=True, exclusive=True, group="gen-control", exit_on_error=False)
    def start_run(self, options: GenerateOptions, batch: bool = False) -> None:
        from ...pipeline.generation import batch as batch_api, runs
        from ...pipeline.generation.estimate import local_server_starting
        from ...pipeline.generation.generate import GenerateError, NothingToDo

        try:
            if local_server_starting():  # start_detached starts it first: say so, with the time it takes
                self.app.call_from_thread(setattr, self, "_server_start", time.time())
            if batch:
                batch_api.start_detached_batch(self.ctx.path, batch_api.BatchOptions(generate=options))
            elif note := batch_api.open_batch_note(self.ctx.store):
                raise GenerateError(note + "; b follows it here")
            else:
                runs.start_detached(self.ctx.path, options)
        except NothingToDo as exc:  # not an error: a notice, and no run
            self.app.call_from_thread(self.notify, str(exc), title="Generate")
            self.app.call_from_thread(self._control_done, None)
        except Exception as exc:  # noqa: BLE001 - GenerateError, BackendError, RunConflict: shown inline
            self.app.call_from_thread(self._control_done, one_line(exc))
        else:
            self.app.call_from_thread(self._control_done, None, True)

    def _control_done(self, error: str | None, changed: bool = False) -> None:
        self.busy = None
        self._server_start = None
        if error:
            self._show_error(error)
        self.refresh_bindings()
        if changed:
            self.changed("runs")  # refreshes this screen too
        else:
            self.poll()

    def action_pause(self) -> None:
        self._stop("paused: s resumes it")

    def action_cancel(self) -> None:
        self._stop("cancelled: in-flight requests went back to pending; s resumes")

    def _stop(self, note: str) -> None:
        self.busy = "stopping"
        self.refresh_bindings()
        self.stop_run(note)

    @work(thread=True, exclusive=True, group="gen-control", exit_on_error=False)
    def stop_run(self, note: str) -> None:
        from ...pipeline.generation import runs

        try:
            run = runs.request_stop(self.ctx.path, wait_s=30.0)
        except Exception as exc:  # noqa: BLE001 - the pause/cancel controls must come back, with the reason
            self.app.call_from_thread(self._control_done, one_line(exc))
            return
        if run is not None and run.active:
            self.app.call_from_thread(self._control_done, "the run has not stopped yet; it will at its next step")
        else:
            self.app.call_from_thread(self.notify, note, title="Generate")
            self.app.call_from_thread(self._control_done, None, True)

    def action_edit_settings(self) -> None:
        if self._attached:
            run = self.snap.run if self.snap else None
            self.notify(f"run #{run.id if run else '?'} runs with the options shown (read-only); "
                        "p pauses it, then o edits them for the next run", title="Options")
            return
        # After this key is done with: focusing now would hand the "o" to the input.
        self.call_after_refresh(self.query_one("#set-model", Input).focus)

    def action_leave_settings(self) -> None:
        self.set_focus(None)

    def action_save_defaults(self) -> None:
        values = self._parsed()
        if values is not None:
            self.save_defaults(values)

    @work(thread=True, exclusive=True, group="gen-settings", exit_on_error=False)
    def save_defaults(self, values: dict[str, Any]) -> None:
        from ...pipeline.spec.grid_edit import save_generation_defaults

        try:
            changed = save_generation_defaults(self.ctx.store, model=values["model"] or "",
                                               temperature=values["temperature"], max_tokens=values["max_tokens"],
                                               samples=values["samples"])
        except Exception as exc:  # noqa: BLE001 - GridError etc.: shown inline
            self.app.call_from_thread(self._show_error, one_line(exc))
            return
        self.app.call_from_thread(self._defaults_saved, changed)

    def _defaults_saved(self, changed: bool) -> None:
        if not changed:
            self.notify("the grid's defaults already are these", title="Generate")
            return
        self.notify("saved as the grid's defaults (model, temperature, max tokens, samples)", title="Generate")
        self.changed("grid", "settings")

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        """Edited options: estimate again once the typing pauses."""
        if self._attached or not self.is_mounted:
            return
        if self._estimate_timer is not None:
            self._estimate_timer.stop()
        self._estimate_timer = self.set_timer(ESTIMATE_DEBOUNCE_S, self.refresh_estimate)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        """Enter: done editing; the options are checked (and kept for the next run)."""
        if self._parsed() is not None:
            self.set_focus(None)
            self.refresh_estimate()
