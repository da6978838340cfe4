"""Eval: did fine-tuning work? The tuned model against its base on held-out prompts.

The screen shows the latest comparison stored in the project (metric by metric,
with intervals and which model is better) and, for the held-out prompt under the
cursor, both models' answers side by side. ``r`` runs the evaluation through
``pipeline.evaluate`` (only answers not stored yet are asked; ``c`` stops it, and
the next ``r`` resumes). The models default to the latest tuned model and its base.
``S`` runs the data-scaling comparison (``pipeline.scaling``: half and all of the
latest export, both against the base) and shows its table in place of the eval
table; ``v`` switches between the two.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.reactive import reactive
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from ...core.errors import one_line
from ...pipeline.evaluation import evaluate as ev, scaling as sc
from ...pipeline.spec.grid import render_value
from ...store import evaluation as evs, scaling as scs
from ..section import SectionScreen


@dataclass
class EvalState:
    """What the screen shows, read from the store in one go."""

    tuned: str = ""
    base: str = ""
    cases: list[evs.EvalCase] = field(default_factory=list)
    latest: dict[str, Any] | None = None
    answers: dict[str, dict[tuple[int, int], evs.EvalAnswer]] = field(default_factory=dict)
    has_export: bool = False
    scaling: scs.ScalingRun | None = None  # the latest data-scaling run


def load_state(store: Any) -> EvalState:
    state = EvalState(cases=evs.cases(store), latest=evs.latest_run(store),
                      has_export=store.latest_export() is not None, scaling=scs.latest(store))
    done = [j for j in store.jobs() if j.status == "succeeded" and j.fine_tuned_model]
    if done:
        state.tuned, state.base = done[-1].fine_tuned_model or "", done[-1].model
    if state.latest:
        state.tuned, state.base = state.latest["model"], state.latest["against"] or state.base
        setup = state.latest["setup"]
        for model in {state.latest["model"], state.latest["against"]} - {None}:
            state.answers[model] = evs.answers(store, model, setup)
    return state


# What to do, in this app's keys (never a command-line flag): where held-out prompts come from.
LIVE_EVERY_S = 1.0  # a run's answers are re-read at most this often while it goes

NO_EXPORT = "no export yet: in F5, e exports; its hold out and combos are what this asks"
NOTHING_HELD_OUT = "nothing held out: in F5, o, set hold out or combos, then e; or w in F6"


class EvalScreen(SectionScreen):
    """Evaluate the tuned model against its base on held-out prompts."""

    MODE = "eval"
    CSS_PATH = "evaluate.tcss"
    HELP_TITLE = "Eval"
    HELP = ("The tuned model and its base answer every held-out prompt (values and combinations the export kept "
            "out of training: F5's hold out and combos; and values you add with w in the F6 playground). "
            "r runs (only what is not stored "
            "is asked), c stops; the table says which model is better where the intervals do not overlap. "
            "S trains on half and on all of the latest export and evaluates both against the base (the base "
            "field; empty: the backend's model): the gain per doubling, metric by metric, against the recipe's "
            "'more data helps about linearly per doubling'; c stops following, S resumes; v switches tables.")
    BINDINGS = [
        Binding("r", "run", "run eval", id="eval.run"),
        Binding("c", "stop", "stop", id="eval.stop"),
        Binding("bracketright", "next_sample", "next sample", key_display="]", id="eval.next_sample"),
        Binding("S", "scaling", "scaling", tooltip="train on half and all, evaluate both: the gain per doubling",
                show=False, id="eval.scaling"),
        Binding("v", "switch_table", "eval/scaling", tooltip="switch between the eval and the scaling table",
                show=False, id="eval.switch_table"),
    ]

    running: reactive[str | None] = reactive(None)
    sample: reactive[int] = reactive(0)
    show_scaling: reactive[bool] = reactive(False)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.state = EvalState()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._scaling_stop = threading.Event()
        self._scaling_on = False
        self.live: dict[str, Any] | None = None  # the run under way: model, against, setup, samples
        self.live_answers: dict[str, dict[tuple[int, int], evs.EvalAnswer]] = {}

    def compose_body(self) -> ComposeResult:
        yield Static("", id="eval-title")
        with Horizontal(classes="form-row"):
            yield Label("tuned", classes="field-label")
            yield Input(id="eval-model", placeholder="the tuned model", compact=True)
            yield Label("base", classes="field-label")
            yield Input(id="eval-against", placeholder="its base model", compact=True)
            yield Label("n", classes="field-label")
            yield Input("3", id="eval-samples", classes="short", restrict=r"\d*", max_length=3, compact=True)
        yield Static("", id="eval-table")
        with Horizontal(id="eval-body"):
            yield OptionList(id="eval-cases")
            with VerticalScroll(id="eval-a", classes="eval-pane"):
                yield Static("", id="eval-a-text")
            with VerticalScroll(id="eval-b", classes="eval-pane"):
                yield Static("", id="eval-b-text")

    def on_mount(self) -> None:
        cases = self.query_one("#eval-cases")
        cases.border_title = "held-out prompts"
        cases.focus()  # letters are keys here; the model fields take focus by tab
        self.load()

    def refresh_from_project(self, what: frozenset[str]) -> None:
        self.load()

    # -- loading ------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="eval-load", exit_on_error=False)
    def load(self) -> None:
        state = load_state(self.ctx.store)
        self.app.call_from_thread(self._loaded, state)

    def _loaded(self, state: EvalState) -> None:
        self.state = state
        for selector, value in (("#eval-model", state.tuned), ("#eval-against", state.base)):
            field_ = self.query_one(selector, Input)
            if not field_.value and value:
                field_.value = value
        cases = self.query_one("#eval-cases", OptionList)
        keep = cases.highlighted
        cases.clear_options()
        cases.add_options([Option(self._case_label(c), id=str(c.id)) for c in state.cases])
        if state.cases:
            cases.highlighted = min(keep or 0, len(state.cases) - 1)
        self._show_table()
        self._show_title()
        self._show_answers()

    @staticmethod
    def _case_label(case: evs.EvalCase) -> str:
        mark = "" if case.source == "held-out" else "+ "
        return mark + " · ".join(render_value(v) for v in case.values.values())

    # -- showing --------------------------------------------------------------------------
    def _show_title(self) -> None:
        s = self.state
        if self.running:
            again = "S" if self._scaling_on else "r"
            text = Text.assemble(("running ", "bold"), self.running, f"  c stops; {again} resumes later")
        elif self.show_scaling and s.scaling is not None:
            run = s.scaling
            what = {"finished": ("", ""), "failed": (f" failed: {run.error or ''}", "red")}.get(
                run.state, (f" {run.state}: S continues", "yellow"))
            text = Text.assemble(("scaling ", "bold"), f"{run.n_half}/{run.n_all} examples", what,
                                 ("  v: eval table", "dim"))
        elif not s.has_export:
            text = Text(NO_EXPORT)
        elif not s.cases:
            text = Text(NOTHING_HELD_OUT)
        elif not s.latest:
            text = Text(f"{len(s.cases)} held-out prompt(s); r asks both models")
        else:
            result = s.latest["result"]
            verdict = ("tuned is WORSE on stop rate or consistency", "red") if result["tuned_is_worse"] else (
                "tuned is not worse than its base", "green")
            text = Text.assemble(f"{result['cases']} prompts × {result['samples']} · ", verdict)
        self.query_one("#eval-title", Static).update(text)

    def _show_table(self) -> None:
        latest = self.state.latest
        widget = self.query_one("#eval-table", Static)
        if self.show_scaling:
            self._show_scaling(widget)
            return
        if not latest:
            widget.update("")
            return
        table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
        for name, justify in (("metric", "left"), ("tuned", "right"), ("base", "right"), ("diff", "right"),
                              ("better", "left")):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for metric, tuned, base, diff, better in ev.table_rows(latest["result"]):
            style = {"tuned": "green", "base": "red"}.get(better, "")
            table.add_row(metric, tuned, base, diff, Text(better, style))
        widget.update(table)

    def _show_scaling(self, widget: Static) -> None:
        run = self.state.scaling
        result = run.result if run is not None else None
        if not result or not result.get("rows"):
            widget.update(Text("no scaling comparison yet: S trains on half and on all of the latest export",
                               "dim") if run is None or run.state != "failed" else "")
            return
        table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
        for name, justify in zip(sc.table_header(result), ("left", "right", "right", "right", "left"), strict=True):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for *cells, expected in sc.table_rows(result):
            style = "green" if expected == "yes" else "red" if expected == "NO" else ""
            table.add_row(*cells, Text(expected, style))
        linearity = result.get("linearity", {})
        verdict = linearity.get("verdict", "") if linearity.get("tested") else "two points: a slope, not a line"
        widget.update(Group(table, Text(f"{sc.RECIPE}? {verdict}"[:78], "dim")))

    def _show_answers(self) -> None:
        s = self.state
        cases = self.query_one("#eval-cases", OptionList)
        a, b = self.query_one("#eval-a-text", Static), self.query_one("#eval-b-text", Static)
        index = cases.highlighted
        if index is None or index >= len(s.cases) or not (s.latest or self.live):
            a.update("")
            b.update("")
            return
        case = s.cases[index]
        # A run under way shows its answers as they are stored; else the latest run's.
        live = self.live
        run = live or {"model": s.latest["model"], "against": s.latest["against"],
                       "samples": s.latest["result"]["samples"]}
        stored = self.live_answers if live else s.answers
        samples = run["samples"]
        k = self.sample % max(1, samples)
        for pane, widget, model, first in (("a", a, run["model"], 0),
                                           ("b", b, run["against"],
                                            samples if run["against"] == run["model"] else 0)):
            answer = stored.get(model, {}).get((case.id, first + k))
            self.query_one(f"#eval-{pane}").border_title = f"{'tuned' if pane == 'a' else 'base'} · {k + 1}/{samples}"
            if answer is None:
                widget.update(Text("not asked yet", "dim"))
            elif not answer.ok:
                widget.update(Text(answer.error or "failed", "red"))
            else:
                end = "" if answer.finish_reason in ("stop", None) else f"\n[ran to max tokens: {answer.finish_reason}]"
                widget.update(Text(answer.text or "") + Text(end, "yellow"))

    @on(OptionList.OptionHighlighted, "#eval-cases")
    def _case_moved(self) -> None:
        self._show_answers()

    def watch_sample(self) -> None:
        if self.is_mounted:
            self._show_answers()

    def watch_running(self) -> None:
        if self.is_mounted:
            self._show_title()
            self.refresh_bindings()

    def watch_show_scaling(self) -> None:
        if self.is_mounted:
            self._show_table()
            self._show_title()

    # -- actions ----------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("run", "scaling"):
            return self.running is None
        if action == "stop":
            return self.running is not None
        return True

    def action_next_sample(self) -> None:
        self.sample += 1

    def action_run(self) -> None:
        model = self.query_one("#eval-model", Input).value.strip()
        against = self.query_one("#eval-against", Input).value.strip() or None
        samples = self.query_one("#eval-samples", Input).value.strip() or "3"
        if not model:
            self.show_error("name the tuned model first (F5 f fine-tunes one)", title="Eval")
            return
        # Said in this app's keys; the pipeline's refusal would name command-line flags.
        if not self.state.has_export or not self.state.cases:
            self.show_error(NO_EXPORT if not self.state.has_export else NOTHING_HELD_OUT, title="Eval")
            return
        options = ev.EvalOptions(model=model, against=against, samples=int(samples))
        try:
            options.check()
        except ev.EvalError as exc:
            self.show_error(str(exc), title="Eval")
            return
        self.running = "…"
        self._run(options)

    def action_switch_table(self) -> None:
        self.show_scaling = not self.show_scaling

    def action_scaling(self) -> None:
        if not self.state.has_export or not self.state.cases:  # in this app's keys, not the CLI's flags
            self.show_error(NO_EXPORT if not self.state.has_export else NOTHING_HELD_OUT, title="Eval")
            return
        last = self.state.scaling  # its settings: S after a CLI run follows the same jobs
        kept = last.settings if last is not None else {}
        base = self.query_one("#eval-against", Input).value.strip() or (last.base_model if last else None)
        samples = int(self.query_one("#eval-samples", Input).value.strip() or ev.DEFAULT_SAMPLES)
        options = sc.ScalingOptions(base=base, samples=max(1, samples), epochs=kept.get("epochs"),
                                    seed=kept.get("seed", sc.DEFAULT_SEED), suffix=kept.get("suffix"))
        self._scaling_stop.clear()
        self._scaling_on = self.show_scaling = True
        self.running = "scaling…"
        self._scale(options)

    def action_stop(self) -> None:
        self._scaling_stop.set()
        with self._lock:
            if self._stop is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
        self.running = "stopping…"

    @work(thread=True, exclusive=True, group="eval-run", exit_on_error=False)
    def _run(self, options: ev.EvalOptions) -> None:
        shown = [0.0]

        def progress(done: int, total: int) -> None:
            self.app.call_from_thread(setattr, self, "running", f"{done}/{total} answers")
            if time.monotonic() - shown[0] > LIVE_EVERY_S or done == total:
                shown[0] = time.monotonic()
                self.app.call_from_thread(self.load_live)

        def started(info: dict[str, Any]) -> None:
            self.app.call_from_thread(self._live_started, info)

        async def go() -> ev.EvalReport:
            with self._lock:
                self._stop, self._loop = asyncio.Event(), asyncio.get_running_loop()
            return await ev.run_eval(self.ctx.path, options, on_progress=progress, on_start=started,
                                     stop_event=self._stop)

        error: str | None = None
        try:
            asyncio.run(go())
        except Exception as exc:  # noqa: BLE001 - one line on the screen, never a crash
            error = one_line(exc)
        finally:
            with self._lock:
                self._stop = self._loop = None
        self.app.call_from_thread(self._ran, error)

    @work(thread=True, exclusive=True, group="eval-scaling", exit_on_error=False)
    def _scale(self, options: sc.ScalingOptions) -> None:
        def say(message: str) -> None:
            self.app.call_from_thread(setattr, self, "running", f"scaling: {message}"[:44])

        error: str | None = None
        try:
            sc.run_scaling(self.ctx.path, options, on_message=say, should_stop=self._scaling_stop.is_set)
        except sc.ScalingStopped:
            pass
        except Exception as exc:  # noqa: BLE001 - one line on the screen, never a crash
            error = one_line(exc)
        self.app.call_from_thread(self._ran, error)

    def _live_started(self, info: dict[str, Any]) -> None:
        self.live, self.live_answers = info, {}
        self.load_live()

    @work(thread=True, exclusive=True, group="eval-live", exit_on_error=False)
    def load_live(self) -> None:
        live = self.live
        if live is None:
            return
        answers = {model: evs.answers(self.ctx.store, model, live["setup"])
                   for model in {live["model"], live["against"]}}
        self.app.call_from_thread(self._live_loaded, live, answers)

    def _live_loaded(self, live: dict[str, Any], answers: dict[str, Any]) -> None:
        if self.live is live:  # not a run that has ended since
            self.live_answers = answers
            self._show_answers()

    def _ran(self, error: str | None) -> None:
        self._scaling_on = False
        self.live = None
        self.running = None
        if error:
            self.show_error(error, title="Eval")
        self.changed("external")  # answers and a run were written: every screen re-reads
