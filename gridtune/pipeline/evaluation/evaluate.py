"""Did fine-tuning work? `gridtune eval`: the tuned model and its base on prompts held
out of training, scored by ``eval_metrics``, side by side.

The prompts are the evaluation cases: the cells an export held out (whole values,
whole combinations) and values a person added. Each is asked the way the tuned model
saw its training examples — the latest export's format, separator and stop — ``samples``
times per model at one temperature. Every answer is stored the moment it arrives under
a *setup* digest (format, separator, stop, temperature, max tokens), so an interrupted
evaluation resumes and a finished one is not paid for twice. The training side of the
comparison is the export's own training file: what the tuned model was taught.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import GridtuneError
from ...store import Store, evaluation as ev
from ...store.records import ExportRecord
from ..client.backend import Backend
from ..client.replies import Reply
from ..client.request_pool import Pool, PoolOptions, Request
from ..client.resolve import resolve_backend
from ..spec.grid import GridSpec, cell_key, coerce_values
from ..spec.options import EVALUATION, GENERATION
from ..spec.project import open_with_spec
from ..training.export import answers_in
from ..training.holdout import HoldOutError
from .eval_metrics import Answer, Comparison, ModelScores, Reference, compare, score, tuned_is_worse
from .playground import build_prompt

DEFAULT_SAMPLES = EVALUATION["samples"].default
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 64, 1024


class EvalError(GridtuneError, ValueError):
    """The evaluation cannot start; the message says what to do."""


@dataclass
class EvalOptions:
    model: str
    against: str | None = None  # None: the base model of the job that made ``model``
    samples: int = DEFAULT_SAMPLES
    temperature: float | None = None  # None: the grid's generation temperature
    max_tokens: int | None = None  # None: twice the longest training completion, bounded
    pool: PoolOptions = field(default_factory=PoolOptions)

    def check(self) -> None:
        if not self.model.strip():
            raise EvalError("--model must name the tuned model")
        EVALUATION["samples"].check(self.samples, EVALUATION["samples"].flag, EvalError)
        for name in ("temperature", "max_tokens"):
            if getattr(self, name) is not None:
                GENERATION[name].check(getattr(self, name), GENERATION[name].flag, EvalError)


# -- cases -----------------------------------------------------------------------------------
def parse_case(spec: GridSpec, text: str) -> dict[str, Any]:
    """'place=Bergen year=2045' (or comma-separated) as a full set of values; every
    variable must be given. Values need not be in the grid: that is the point."""
    values: dict[str, str] = {}
    for item in text.replace(",", " ").split():
        name, sep, raw = item.partition("=")
        if not sep or not name or not raw:
            raise HoldOutError(f"--case wants VAR=VALUE pairs, not {item!r}")
        if name not in spec.variables:
            raise HoldOutError(f"--case {text!r}: no variable {name!r} (variables: {', '.join(spec.variables)})")
        values[name] = raw
    missing = [n for n in spec.variables if n not in values]
    if missing:
        raise HoldOutError(f"--case {text!r} gives no value for {', '.join(missing)}")
    return coerce_values(spec, values)


def add_person_cases(store: Store, spec: GridSpec, texts: list[str], note: str | None = None) -> int:
    cases = [parse_case(spec, t) for t in texts]  # all checked before any is written
    return ev.add_cases(store, [(cell_key(v), v, "person", note) for v in cases])


# -- the setup the models are asked under -----------------------------------------------------
def training_texts(export: ExportRecord) -> list[str]:
    """The completions the tuned model was taught, read back from the export's file."""
    path = Path(export.path)
    if not path.exists():
        raise EvalError(f"the export's training file {path} is gone: export again")
    return answers_in(path, export.stop)


def auto_max_tokens(texts: list[str]) -> int:
    """Room for twice the longest training answer (about 4 characters a token): a model
    that does not stop shows it by running to the limit, not by being cut early."""
    longest = max((len(t) for t in texts), default=0)
    return max(MIN_MAX_TOKENS, min(MAX_MAX_TOKENS, math.ceil(longest / 2)))


@dataclass(frozen=True)
class Setup:
    format: str
    separator: str | None
    stop: str | None
    temperature: float
    max_tokens: int

    @property
    def digest(self) -> str:
        raw = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def request(self, spec: GridSpec, model: str, values: dict[str, Any]) -> Request:
        prompt = build_prompt(spec, values, self.format, self.separator)
        body: dict[str, Any] = {"model": model, "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.stop:
            body["stop"] = [self.stop]
        if self.format == "completion":
            body["prompt"] = prompt.text
            path = "/completions"
        else:
            body["messages"] = prompt.messages
            path = "/chat/completions"
        # Never under the provider's count: a token is rarely under 3 characters.
        return Request(path, body, len(prompt.text) // 3 + 16 + self.max_tokens)


# -- the report -------------------------------------------------------------------------------
@dataclass
class EvalReport:
    model: str
    against: str
    setup: Setup
    cases: int
    samples: int
    reference: Reference
    tuned: ModelScores
    base: ModelScores
    rows: list[Comparison]
    asked: int = 0  # requests sent in this pass (0: everything was stored already)
    failed: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def worse(self) -> bool:
        return tuned_is_worse(self.rows)

    @property
    def exit_code(self) -> int:
        """1 when the tuned model is worse than its base on stop rate or consistency,
        or when answers are missing (the work ran but something failed)."""
        return 1 if self.worse or self.stopped or any(self.failed.values()) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "against": self.against, "setup": self.setup.__dict__ | {"digest": self.setup.digest},
            "cases": self.cases, "samples": self.samples, "asked": self.asked, "failed": self.failed,
            "stopped": self.stopped, "seconds": round(self.seconds, 2),
            "reference": {"length_mean": _finite(self.reference.length_mean),
                          "length_cv": _finite(self.reference.length_cv), "n": self.reference.profile.n},
            "tuned": self.tuned.to_dict(), "base": self.base.to_dict(),
            "comparison": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in r.__dict__.items()}
                           for r in self.rows],
            "tuned_is_worse": self.worse,
        }

    def table(self) -> list[tuple[str, str, str, str, str]]:
        return table_rows(self.to_dict())

    def summary(self) -> str:
        head = (f"eval: {self.model} vs {self.against} on {self.cases} held-out prompt(s) × {self.samples} "
                f"({self.setup.format}, stop {self.setup.stop!r}, temperature {self.setup.temperature:g})")
        rows = [("metric", self.model[:18], self.against[:18], "difference", "better"), *self.table()]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        if any(self.failed.values()):
            lines.append("failed answers: " + ", ".join(f"{m} {n}" for m, n in self.failed.items() if n))
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        lines.append("verdict: " + ("the tuned model is WORSE than its base on stop rate or consistency"
                                    if self.worse else "the tuned model is not worse than its base"))
        return "\n".join(lines)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


LABELS = {"stop_rate": "stop rate", "format_match": "format match", "repetition": "repetition loops",
          "faithfulness": "mentions its values"}


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, tuned, base, difference, better) as a person reads them, from a report's
    ``to_dict()`` (also as stored in the project: the TUI shows the latest one)."""
    t, b = result["tuned"], result["base"]
    out = []
    for row in result["comparison"]:
        metric, better = row["metric"], row["better"] or "—"
        if metric == "length_cv":
            data = result["reference"]["length_cv"]
            out.append((f"length spread (data {_fmt(data, '.2f')})", _fmt(row["tuned"], ".2f"),
                        _fmt(row["base"], ".2f"), _fmt(row["difference"], "+.2f"), better))
        else:
            diff = row["difference"]
            out.append((LABELS[metric], _pct(t[metric]), _pct(b[metric]),
                        "—" if diff is None else f"{diff * 100:+.0f} pts", better))
    tm, bm = t["length_mean"]["value"], b["length_mean"]["value"]
    out.insert(1, ("mean length (chars)", _num(tm), _num(bm), "—" if tm is None or bm is None else f"{tm - bm:+.0f}",
                   "—"))
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def _pct(est: dict[str, Any]) -> str:
    if not est["n"] or est["value"] is None:
        return "—"
    return f"{est['value'] * 100:.0f}% ({est['low'] * 100:.0f}–{est['high'] * 100:.0f})"


# -- running ------------------------------------------------------------------------------------
def base_of(store: Store, model: str) -> str | None:
    """The base model of the job that produced ``model``, if the project ran it."""
    for job in reversed(store.jobs()):
        if job.fine_tuned_model == model:
            return job.model
    return None


async def run_eval(store_path: str | Path, options: EvalOptions, *, backend: Backend | None = None,
                   on_progress: Callable[[int, int], Any] | None = None,
                   on_start: Callable[[dict[str, Any]], Any] | None = None,
                   stop_event: asyncio.Event | None = None) -> EvalReport:
    """Ask both models every case ``samples`` times (only what is not stored yet) and
    compare. ``on_start({model, against, setup, samples})`` once it knows where the answers
    are stored (a screen shows them as they come); ``on_progress(answered, to_ask)`` after
    each answer."""
    options.check()
    started = time.monotonic()
    with open_with_spec(store_path, EvalError) as (store, spec):
        export = store.latest_export()
        if export is None:
            raise EvalError("no export yet: export with --hold-out VAR=VALUE or --hold-out-combos N first")
        cases = ev.cases(store)
        if not cases:
            raise EvalError("no held-out prompts: export with --hold-out VAR=VALUE or --hold-out-combos N, "
                            "or add some with --case 'VAR=VALUE ...'")
        against = options.against or base_of(store, options.model)
        if not against:
            raise EvalError(f"which base model is {options.model} compared with? give --against BASE")
        texts = training_texts(export)
        setup = Setup(export.format, export.separator, export.stop,
                      options.temperature if options.temperature is not None else spec.settings.temperature,
                      options.max_tokens or auto_max_tokens(texts))
        # (model, first sample): a model compared with itself answers twice, independently,
        # so "no difference" is measured, not assumed.
        sides = [(options.model, 0), (against, options.samples if against == options.model else 0)]
        todo: list[tuple[str, ev.EvalCase, int]] = []
        for model, first in sides:
            have = ev.answers(store, model, setup.digest)
            todo += [(model, case, k) for case in cases for k in range(first, first + options.samples)
                     if not (have.get((case.id, k)) and have[(case.id, k)].ok)]
        if on_start is not None:
            on_start({"model": options.model, "against": against, "setup": setup.digest,
                      "samples": options.samples})
        # A local server started now loads the tuned model's base (a Hub id or a path).
        backend = backend or (resolve_backend(model=options.model) if todo else None)
        answered = 0

        async def record(item: tuple[str, ev.EvalCase, int], reply: Reply | None, error: str | None,
                         latency: float) -> None:
            nonlocal answered
            model, case, k = item
            await asyncio.to_thread(
                ev.save_answer, store, case_id=case.id, model=model, setup=setup.digest, sample=k,
                text=None if reply is None else reply.text,
                finish_reason=None if reply is None else reply.finish_reason,
                completion_tokens=None if reply is None else reply.completion_tokens, latency_s=latency, error=error)
            answered += 1
            if on_progress is not None:
                on_progress(answered, len(todo))

        stopped = None
        if todo and backend is not None:
            pool: Pool[tuple[str, ev.EvalCase, int]] = Pool(backend, options.pool)
            await pool.run(todo, lambda item: setup.request(spec, item[0], item[1].values), record, stop_event)
            stopped = pool.stopped
        reference = Reference.of(texts)
        failed: dict[str, int] = {}
        values = {case.id: case.values for case in cases}
        # What each case asked, so that "mentions its values" gives no credit for an echo.
        prompts = {case.id: build_prompt(spec, case.values, setup.format, setup.separator).text for case in cases}
        side_scores: list[ModelScores] = []
        for model, first in sides:
            stored = [a for a in ev.answers(store, model, setup.digest).values()
                      if a.case_id in values and first <= a.sample < first + options.samples]
            ok = [a for a in stored if a.ok]
            failed[model] = failed.get(model, 0) + len(cases) * options.samples - len(ok)
            side_scores.append(score([Answer(a.text or "", a.finish_reason, values[a.case_id], prompts[a.case_id])
                                      for a in ok], reference))
        report = EvalReport(options.model, against, setup, len(cases), options.samples, reference, side_scores[0],
                            side_scores[1], compare(side_scores[0], side_scores[1], reference), asked=len(todo),
                            failed=failed, stopped=stopped, seconds=time.monotonic() - started)
        ev.record_run(store, export_id=export.id, model=options.model, against=against, setup=setup.digest,
                      result=report.to_dict())
        return report


def evaluate(store_path: str | Path, options: EvalOptions, **kwargs: Any) -> EvalReport:
    """``run_eval`` for a caller without an event loop (the CLI)."""
    return asyncio.run(run_eval(store_path, options, **kwargs))
