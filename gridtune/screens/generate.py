"""Generate: start, pause, resume and cancel the teacher run; follow it live.

Runs start detached (``runs.start_detached``), so quitting the app or losing the
SSH connection does not stop them; the screen only reads the run row in the
project file (about twice a second, in a thread) and so attaches to a run that
is already going when the project is opened again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, ProgressBar, Sparkline, Static

from ..tui.section import SectionScreen
from ..tui.widgets import StatusLine
from ..pipeline.progress import Progress, format_duration
from ..store import CompletionRecord, RunRecord, StatusCounts

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
    """The settings form read back into typed values, with one-line errors."""

    FIELDS = ("model", "temperature", "max_tokens", "samples", "concurrency", "rpm", "tpm")

    @staticmethod
    def parse(raw: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"model": raw.get("model", "").strip() or None}

        def number(name: str, kind: type, *, optional: bool = False, lo: float | None = None,
                   hi: float | None = None) -> None:
            text = raw.get(name, "").strip()
            label = name.replace("_", " ")
            if not text or (optional and text.lower() in ("none", "-", "off", "auto")):
                if optional:
                    out[name] = None
                    return
                raise ValueError(f"{label}: give a number")
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"{label}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None
            if lo is not None and value < lo or hi is not None and value > hi:
                rng = f"within {lo:g}..{hi:g}" if hi is not None else f"at least {lo:g}"
                raise ValueError(f"{label}: must be {rng}, not {text}")
            out[name] = value

        number("temperature", float, lo=0, hi=2)
        number("max_tokens", int, lo=1)
        number("samples", int, lo=1, hi=100)
        number("concurrency", int, optional=True, lo=1, hi=1024)
        number("rpm", float, optional=True, lo=0.001)
        number("tpm", float, optional=True, lo=0.001)
        return out


class GenerateScreen(SectionScreen):
    MODE = "generate"
    """The teacher run: settings, controls, progress, rates and a live tail."""

    CSS_PATH = "generate.tcss"
    AUTO_FOCUS = ""  # letters are commands until `o` (or tab) enters the settings
    BINDINGS = [
        Binding("s", "start", "Start", id="generate.start"),
        Binding("s", "resume", "Resume", id="generate.resume"),
        Binding("p", "pause", "Pause", id="generate.pause"),
        Binding("c", "cancel", "Cancel", id="generate.cancel"),
        Binding("o", "edit_settings", "Options", id="generate.options"),
        Binding("escape", "leave_settings", "Done editing", show=False, id="generate.leave"),
    ]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.snap: Snapshot | None = None
        self.busy: str | None = None  # "starting" | "stopping" while a control call runs
        self.error: str | None = None
        self._shown: dict[str, Any] = {}
        self._attached = False  # the fields show an active run's settings, not the spec's
        self._rates: list[float] = []
        self._last_elapsed: float | None = None
        self._timer = None
        self.poll_interval = POLL_S
        self.estimate: str | None = None  # the time estimate for the next run, in words
        self._server_start: float | None = None  # when a start began that must start the local server
        self._estimate_timer = None

    # -- layout ---------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusLine()
        with Vertical(id="gen-body"):
            yield Static(id="gen-title")
            with Vertical(id="gen-settings"):
                with Horizontal(classes="form-row"):
                    yield Label("model", classes="field-label")
                    yield Input(id="set-model", placeholder="backend default", compact=True)
                    yield Label("temp", classes="field-label")
                    yield Input(id="set-temperature", compact=True, classes="short")
                    yield Label("max tokens", classes="field-label")
                    yield Input(id="set-max_tokens", compact=True, classes="short")
                with Horizontal(classes="form-row"):
                    yield Label("samples", classes="field-label")
                    yield Input(id="set-samples", compact=True, classes="short")
                    yield Label("concurrency", classes="field-label")
                    yield Input(id="set-concurrency", placeholder="auto", compact=True, classes="short")
                    yield Label("rpm", classes="field-label")
                    yield Input(id="set-rpm", placeholder="none", compact=True, classes="short")
                    yield Label("tpm", classes="field-label")
                    yield Input(id="set-tpm", placeholder="none", compact=True, classes="short")
            yield Static(id="gen-state")
            with Horizontal(id="gen-progress-row"):
                yield ProgressBar(id="gen-progress", show_eta=False)
                yield Static(id="gen-fraction")
            yield Static(id="gen-counts")
            yield Static(id="gen-rates")
            yield Static(id="gen-note")
            with Horizontal(id="gen-spark-row"):
                yield Label("req/s", id="gen-spark-label")
                yield Sparkline([], id="gen-spark")
            yield Static("Newest completions", id="gen-tail-title")
            yield Static(id="gen-tail")
            yield Static(id="gen-error")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#gen-progress", ProgressBar).can_focus = False
        self.load_settings()
        self.poll()
        self._timer = self.set_interval(self.poll_interval, self.poll)

    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    def on_screen_resume(self) -> None:
        if self._timer is not None:
            self.poll()
            self._timer.resume()

    # -- reading the store (threads) --------------------------------------------
    @work(thread=True, exclusive=True, group="gen-settings", exit_on_error=False)
    def load_settings(self) -> None:
        try:
            spec = self.ctx.spec()
        except Exception as exc:  # noqa: BLE001 - shown inline
            self.app.call_from_thread(self._show_error, f"cannot read the grid spec: {exc}")
            return
        s = spec.settings
        values = {"model": s.model or "", "temperature": f"{s.temperature:g}",
                  "max_tokens": str(s.max_tokens), "samples": str(s.samples)}
        self.app.call_from_thread(self._fill_settings, values, spec.name, spec.cell_count)

    def _fill_settings(self, values: dict[str, str], name: str, cells: int) -> None:
        if not self._attached:  # an active run's own settings stay shown
            for key, value in values.items():
                self.query_one(f"#set-{key}", Input).value = value
        self._spec_line = (name, cells)
        self._render_title()
        self.refresh_estimate()

    def refresh_estimate(self) -> None:
        """Estimate the next run with the settings shown (in a thread: it asks the server)."""
        try:
            values = Settings.parse(self._raw_settings())
        except ValueError:
            return  # the inline error says what is wrong; the last estimate stays
        self.estimate_run(values)

    @work(thread=True, exclusive=True, group="gen-estimate", exit_on_error=False)
    def estimate_run(self, values: dict[str, Any]) -> None:
        from ..pipeline.estimate import local_server_starting
        from ..pipeline.generate import GenerateOptions, preview_run

        options = GenerateOptions(concurrency=values["concurrency"], rpm=values["rpm"], tpm=values["tpm"],
                                  model=values["model"], max_tokens=values["max_tokens"])
        try:
            if local_server_starting():  # never start the server just to estimate
                text = "no estimate until the local server runs: s starts it (the first start fetches the model, ~1 min)"
            else:
                text = preview_run(self.ctx.path, options, start_local=False)[1].text
        except Exception as exc:  # noqa: BLE001 - no estimate is not an error
            text = f"no estimate: {_one_line(exc)}"
        self.app.call_from_thread(self._show_estimate, text)

    def _show_estimate(self, text: str) -> None:
        self.estimate = text
        self._render_note()

    @work(thread=True, exclusive=True, group="gen-poll", exit_on_error=False)
    def poll(self) -> None:
        from ..pipeline import runs

        store = self.ctx.store
        run = runs.reconcile(store) or store.latest_run()
        progress = Progress.from_dict(run.progress) if run and run.progress else None
        counts = store.status_counts()
        tail = store.completions(status="done", limit=12, newest_first=True)
        self.post_message(Polled(Snapshot(run, progress, counts, tail)))

    # -- showing it ---------------------------------------------------------------
    def _set(self, widget_id: str, value: Any) -> None:
        """Update a Static only when what it shows changed (no needless repaints)."""
        if self._shown.get(widget_id) != value:
            self._shown[widget_id] = value
            self.query_one(f"#{widget_id}", Static).update(value)

    def _render_title(self) -> None:
        name, cells = getattr(self, "_spec_line", (self.ctx.path.stem, 0))
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
        # State line
        if run is None:
            state = Text("no run yet · s to start", style="dim")
        else:
            label = "paused" if run.state == "stopped" else run.state
            if self.busy == "stopping" and active:
                label = "stopping"
            style = {"running": "bold green", "starting": "yellow", "stopping": "yellow",
                     "finished": "bold", "failed": "bold red", "died": "bold red"}.get(run.state, "")
            state = Text.assemble(("● " if active else "○ ", style), (label, style),
                                  f"  run #{run.id}")
            if run.model:
                state.append(f" · {run.model}")
            if p is not None:
                state.append(f" · {format_duration(p.elapsed_s)}")
            if run.error and not active:
                state.append(f" · {run.error}", style="red")
            if p is not None and p.phase and active:
                state.append(f" · {p.phase}", style="yellow")
        if self.busy == "starting" and not active:
            state = Text(self._starting_text(), style="yellow")
        self._set("gen-state", state)
        # Progress over the whole grid (a resumed run's total is only what was left).
        total = counts.completions or 1
        finished = counts.done + counts.failed
        bar = self.query_one("#gen-progress", ProgressBar)
        if (bar.total, bar.progress) != (total, finished):
            bar.update(total=total, progress=finished)
        self._set("gen-fraction", f"{counts.done:,}/{counts.completions:,}")
        in_flight = p.in_flight if (p and active) else 0
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

    def _starting_text(self) -> str:
        if self._server_start is None:
            return "starting a run…"
        from ..pipeline.estimate import local_server_phase

        return local_server_phase(self._server_start)

    def _render_note(self) -> None:
        """Under the rates: the run's time estimate, and why requests were retried."""
        snap = self.snap
        run = snap.run if snap else None
        p = snap.progress if snap else None
        active = bool(run and run.state in ACTIVE)
        note = Text()
        if active:  # the run's own estimate, made at its start, unless retries need saying
            estimate = p.estimate if (p is not None and not p.retries) else None
        else:
            estimate = None if self.busy == "starting" else self.estimate  # starting: the state line says
        if estimate:
            if estimate[0].isdigit() or estimate.startswith(("about", "up to", "at least")):
                note.append("estimate: ", style="dim")
            note.append(estimate)
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
        key = (active, self.busy, self._can_resume())
        if self._shown.get("_controls") != key:
            was_active, self._attached = self._attached, active
            self._shown["_controls"] = key
            if active and not was_active and self.snap and self.snap.run:
                self._show_run_settings(self.snap.run)
            elif was_active and not active:
                self.load_settings()  # back to the spec's, for the next run
            for field in Settings.FIELDS:
                self.query_one(f"#set-{field}", Input).disabled = active
            self.refresh_bindings()

    def _show_run_settings(self, run) -> None:
        """While a run is active, its fields show what it runs with: it may have been
        started from the command line with other settings than the spec's."""
        p = run.params or {}
        values = {"model": run.model or ""}
        for key in ("temperature", "max_tokens", "concurrency", "rpm", "tpm"):
            if key in p:
                values[key] = "" if p[key] is None else f"{p[key]:g}" if isinstance(p[key], float) else str(p[key])
        for key, value in values.items():
            self.query_one(f"#set-{key}", Input).value = value

    def _show_error(self, message: str | None) -> None:
        self.error = message
        widget = self.query_one("#gen-error", Static)
        widget.display = bool(message)
        self._set("gen-error", Text(message or "", style="bold red"))

    # -- state -----------------------------------------------------------------
    def _active(self) -> bool:
        return bool(self.snap and self.snap.run and self.snap.run.state in ACTIVE)

    def _can_resume(self) -> bool:
        """Something was started before and work is left: s resumes it."""
        snap = self.snap
        return bool(snap and snap.run and (snap.counts.pending or snap.counts.failed))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "resume"):
            if self._active() or self.busy:
                return False
            resume = self._can_resume()
            return resume if action == "resume" else not resume
        if action in ("pause", "cancel"):
            return self._active() and self.busy != "stopping"
        if action == "edit_settings":
            return not self._active()
        return True

    # -- intents ------------------------------------------------------------------
    def _raw_settings(self) -> dict[str, str]:
        return {f: self.query_one(f"#set-{f}", Input).value for f in Settings.FIELDS}

    def action_start(self) -> None:
        self._start()

    def action_resume(self) -> None:
        self._start()

    def _start(self) -> None:
        try:
            values = Settings.parse(self._raw_settings())
        except ValueError as exc:
            self._show_error(str(exc))
            return
        self._show_error(None)
        self.busy = "starting"
        self.refresh_bindings()
        self._set("gen-state", Text("starting a run…", style="yellow"))
        self.start_run(values)

    @work(thread=True, exclusive=True, group="gen-control", exit_on_error=False)
    def start_run(self, values: dict[str, Any]) -> None:
        from ..pipeline.generate import GenerateOptions

        try:
            self._save_spec(values)
            from ..pipeline import runs
            from ..pipeline.estimate import local_server_starting

            if local_server_starting():  # start_detached starts it first: say so, with the time it takes
                self.app.call_from_thread(setattr, self, "_server_start", time.time())
            options = GenerateOptions(concurrency=values["concurrency"], rpm=values["rpm"], tpm=values["tpm"])
            runs.start_detached(self.ctx.path, options)
        except Exception as exc:  # noqa: BLE001 - GenerateError, BackendError, RunConflict: shown inline
            self.app.call_from_thread(self._control_done, _one_line(exc))
        else:
            self.app.call_from_thread(self._control_done, None)

    def _save_spec(self, values: dict[str, Any]) -> bool:
        """Write model/temperature/max tokens/samples into the spec if they changed."""
        from ..pipeline.project import apply_spec

        spec = self.ctx.spec()
        s = spec.settings
        new = dataclasses.replace(s, model=values["model"], temperature=values["temperature"],
                                  max_tokens=values["max_tokens"], samples=values["samples"])
        if new == s:
            return False
        apply_spec(self.ctx.store, dataclasses.replace(spec, settings=new))
        self.ctx.reload_spec()
        return True

    def _control_done(self, error: str | None) -> None:
        self.busy = None
        self._server_start = None
        if error:
            self._show_error(error)
        self.refresh_bindings()
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
        from ..pipeline import runs

        try:
            run = runs.request_stop(self.ctx.path, wait_s=30.0)
        except Exception as exc:  # noqa: BLE001
            self.app.call_from_thread(self._control_done, _one_line(exc))
            return
        if run is not None and run.active:
            self.app.call_from_thread(self._control_done, "the run has not stopped yet; it will at its next step")
        else:
            self.app.call_from_thread(self.app.notify, note, title="Generation")
            self.app.call_from_thread(self._control_done, None)

    def action_edit_settings(self) -> None:
        # After this key is done with: focusing now would hand the "e" to the input.
        self.call_after_refresh(self.query_one("#set-model", Input).focus)

    def action_leave_settings(self) -> None:
        self.set_focus(None)

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        """Edited settings: estimate again once the typing pauses."""
        if self._attached or not self.is_mounted:
            return
        if self._estimate_timer is not None:
            self._estimate_timer.stop()
        self._estimate_timer = self.set_timer(ESTIMATE_DEBOUNCE_S, self.refresh_estimate)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        try:
            values = Settings.parse(self._raw_settings())
        except ValueError as exc:
            self._show_error(str(exc))
            return
        self._show_error(None)
        self.save_settings(values)

    @work(thread=True, exclusive=True, group="gen-settings", exit_on_error=False)
    def save_settings(self, values: dict[str, Any]) -> None:
        try:
            changed = self._save_spec(values)
        except Exception as exc:  # noqa: BLE001 - GridError etc.
            self.app.call_from_thread(self._show_error, _one_line(exc))
            return
        if changed:
            self.app.call_from_thread(self.app.notify, "settings saved to the grid spec", title="Generate")
            self.app.call_from_thread(self.poll)
        self.app.call_from_thread(self.refresh_estimate)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
