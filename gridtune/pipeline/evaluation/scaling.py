"""How much would more data buy? `gridtune finetune PROJECT --scaling`.

The recipe's advice is that more data helps about linearly per doubling. This measures
it on the project's own data: from the latest export's training file (which already
leaves the held-out cells out) a deterministic, stratified half is written beside it
(``<stem>.half.jsonl``); two jobs train from the same base with the same seed and
settings, one on the half and one on all of it; both are evaluated against the base on
the held-out prompts (``evaluate.run_eval``: the base's answers are stored once and
shared, and a rerun pays for nothing already answered); and each metric's gain per
doubling (all − half, per log2 of the size ratio) is set against the direction the
advice expects, with its noise. Two points give a slope, not a test of linearity:
when earlier scaling runs of the same base and settings measured other sizes, a third
point tests it.

Resumable: the run and each job id are recorded in the project the moment they exist
(``store.scaling``), so a killed run follows its jobs on the next call instead of
creating new ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import GridtuneError
from ...store import Store, evaluation as evs, scaling as scs
from ...store.records import ExportRecord
from ..client.backend import Backend
from ..client.request_pool import PoolOptions
from ..client.resolve import resolve_backend
from ..spec.grid import GridSpec, render_value
from ..spec.options import EVALUATION, FINETUNE
from ..spec.project import load_project_spec
from ..training import finetune as ft
from .evaluate import DEFAULT_SAMPLES, EvalError, EvalOptions, EvalReport, run_eval

DEFAULT_SEED = 0  # both jobs must share a seed: without one the backend picks one per job
FAILED_JOB = ("failed", "cancelled")
RECIPE = "more data helps about linearly per doubling"


class ScalingError(GridtuneError, ValueError):
    """The scaling run cannot start; the message says what to do (exit 2)."""


class ScalingStopped(Exception):
    """Asked to stop; the jobs go on in the backend and the next run follows them."""


@dataclass
class ScalingOptions:
    base: str | None = None  # None: the backend's default model
    epochs: int | None = None
    seed: int = DEFAULT_SEED
    suffix: str | None = None
    validation_path: str | None = None  # None: the export's validation file, if any
    samples: int = DEFAULT_SAMPLES
    temperature: float | None = None  # None: the grid's
    max_tokens: int | None = None  # None: evaluate's automatic room
    poll_s: float = 1.0
    pool: PoolOptions = field(default_factory=PoolOptions)

    def settings(self) -> dict[str, Any]:
        """What two runs must share for a rerun to continue one (with the export and base)."""
        return {"epochs": self.epochs, "seed": self.seed, "suffix": self.suffix}


# -- the half ---------------------------------------------------------------------------------
def _rank(text: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).digest()


def half_split(examples: Sequence[tuple[str, Mapping[str, Any]]], seed: int = 0) -> list[int]:
    """The indices (ascending) of a deterministic half of ``examples`` — (text, values)
    pairs — ``len // 2`` of them, chosen by a stable hash of each text and stratified:

    1. coverage: every variable value among the examples gets at least one (while room lasts);
    2. balance: then no value takes more than half of its own examples;
    3. fill: then the hash order alone, up to the half.
    """
    n = len(examples)
    target = n // 2
    strata = [frozenset((name, render_value(v)) for name, v in values.items()) for _, values in examples]
    count = Counter(s for ss in strata for s in ss)
    order = sorted(range(n), key=lambda i: (_rank(examples[i][0], seed), i))
    have: Counter[tuple[str, str]] = Counter()
    chosen: set[int] = set()

    def take(i: int) -> None:
        chosen.add(i)
        have.update(strata[i])

    passes: tuple[Callable[[int], bool], ...] = (
        lambda i: any(have[s] == 0 for s in strata[i]),
        lambda i: all(have[s] < count[s] // 2 for s in strata[i]),
        lambda i: True,
    )
    for wanted in passes:
        for i in order:
            if len(chosen) >= target:
                return sorted(chosen)
            if i not in chosen and wanted(i):
                take(i)
    return sorted(chosen)


def half_path_for(train_path: str | Path) -> Path:
    """``<stem>.half.jsonl`` beside the training file."""
    path = Path(train_path)
    return path.with_name(f"{path.stem}.half.jsonl")


def _example_prompt(example: dict[str, Any], separator: str | None) -> str | None:
    if "messages" in example:
        users = [m.get("content") for m in example["messages"] if m.get("role") == "user"]
        return users[-1] if users else None
    prompt = example.get("prompt")
    if not isinstance(prompt, str):
        return None
    return prompt[: -len(separator)] if separator and prompt.endswith(separator) else prompt


def _values_by_prompt(spec: GridSpec, cells: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each training prompt's variable values; when a training template leaves a variable
    out, only the values its cells share (the prompt cannot say the others)."""
    out: dict[str, dict[str, Any]] = {}
    for values in cells:
        text = spec.render(values).training
        if text in out:
            out[text] = {k: v for k, v in out[text].items() if values.get(k) == v}
        else:
            out[text] = dict(values)
    return out


def read_examples(export: ExportRecord, spec: GridSpec, cells: Sequence[dict[str, Any]]) -> list[tuple[str, dict]]:
    """The export's training lines (as written) with the values each one was made from."""
    path = Path(export.path)
    if not path.exists():
        raise ScalingError(f"the export's training file {path} is gone: export again with --hold-out")
    by_prompt = _values_by_prompt(spec, cells)
    examples: list[tuple[str, dict]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError:
                raise ScalingError(f"{path}: a line is not JSON (not what the export wrote): export again") from None
            prompt = _example_prompt(example, export.separator) if isinstance(example, dict) else None
            examples.append((line.rstrip("\n"), by_prompt.get(prompt or "", {})))
    if len(examples) != export.n_train:
        raise ScalingError(f"{path} has {len(examples)} example(s) but the export wrote {export.n_train}: "
                           "it changed since; export again")
    if len(examples) < 2:
        raise ScalingError(f"{path} has {len(examples)} example(s): halving needs at least 2")
    return examples


def write_half(export: ExportRecord, examples: Sequence[tuple[str, dict]], seed: int) -> tuple[Path, int]:
    """Write the half beside the training file (atomically; left alone when already the same)."""
    chosen = half_split(examples, seed)
    text = "".join(examples[i][0] + "\n" for i in chosen)
    out = half_path_for(export.path)
    try:
        if out.exists() and out.read_text(encoding="utf-8") == text:
            return out, len(chosen)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        raise ScalingError(f"{out}: cannot write: {exc.strerror or exc}") from None
    return out, len(chosen)


# -- the comparison -------------------------------------------------------------------------
# (key in ModelScores.to_dict(), label, what "better" means)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("stop_rate", "stop rate", "higher"),
    ("length_mean", "mean length", "nearer"),  # nearer: nearer the training data's
    ("length_cv", "length spread", "nearer"),
    ("format_match", "format match", "higher"),
    ("repetition", "repetition loops", "lower"),
    ("faithfulness", "mentions its values", "higher"),
)
PERCENT = {"stop_rate", "format_match", "repetition", "faithfulness"}


def _estimate(scores: dict[str, Any], metric: str) -> tuple[float | None, float | None, float | None]:
    if metric == "length_cv":
        iv = scores.get("length_cv_interval") or {}
        return scores.get("length_cv"), iv.get("low"), iv.get("high")
    est = scores.get(metric) or {}
    return est.get("value"), est.get("low"), est.get("high")


def _verdict(helps: bool | None, beyond_noise: bool) -> str:
    if helps is None:
        return "flat"
    if helps:
        return "yes" if beyond_noise else "yes (noise)"
    return "NO" if beyond_noise else "no (noise)"


def compare_points(half: dict[str, Any], all_: dict[str, Any], reference: dict[str, Any], n_half: int,
                   n_all: int) -> list[dict[str, Any]]:
    """Per metric: the half and all figures, the gain per doubling, whether it goes the
    way the recipe expects and whether it stands out of the intervals."""
    doublings = math.log2(n_all / n_half) if n_half and n_all > n_half else 1.0
    targets = {"length_mean": reference.get("length_mean"), "length_cv": reference.get("length_cv")}
    rows = []
    for metric, label, better in METRICS:
        h, h_lo, h_hi = _estimate(half, metric)
        a, a_lo, a_hi = _estimate(all_, metric)
        row: dict[str, Any] = {"metric": metric, "label": label, "better": better, "half": h, "all": a,
                               "half_interval": [h_lo, h_hi], "all_interval": [a_lo, a_hi],
                               "gain_per_doubling": None, "helps": None, "beyond_noise": False,
                               "expected": "—", "next_doubling": None}
        target = targets.get(metric)
        if h is None or a is None or (better == "nearer" and target is None):
            rows.append(row)
            continue
        gain = (a - h) / doublings
        if better == "nearer":
            assert target is not None
            row["target"] = target
            moved = abs(h - target) - abs(a - target)  # > 0: nearer the data with more of it
        else:
            moved = gain if better == "higher" else -gain
        helps = None if abs(moved) < 1e-12 else moved > 0
        beyond = None not in (h_lo, h_hi, a_lo, a_hi) and not (h_lo <= a_hi and a_lo <= h_hi)  # type: ignore[operator]
        nxt = a + gain
        if metric in PERCENT:
            nxt = min(1.0, max(0.0, nxt))
        row.update(gain_per_doubling=gain, helps=helps, beyond_noise=beyond, expected=_verdict(helps, beyond),
                   next_doubling=nxt)
        rows.append(row)
    return rows


def linearity(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether the metrics lie on a line in log2(examples): with two sizes, only a slope;
    with three or more, each metric's least-squares line and whether every point sits
    within its own interval of it."""
    sizes = sorted({p["n"] for p in points})
    if len(sizes) < 3:
        return {"sizes": sizes, "tested": False,
                "verdict": "two points give a slope, not a test of linearity: a third size "
                           "(another export's --scaling) would test it"}
    per_metric: dict[str, str] = {}
    for metric, _label, _better in METRICS:
        xs, ys, halves = [], [], []
        for p in points:
            v, lo, hi = _estimate(p["scores"], metric)
            if v is None:
                continue
            xs.append(math.log2(p["n"]))
            ys.append(v)
            halves.append((hi - lo) / 2 if lo is not None and hi is not None else 0.0)
        if len(set(xs)) < 3:
            continue
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        fits = all(abs(y - (my + slope * (x - mx))) <= h for x, y, h in zip(xs, ys, halves, strict=True))
        per_metric[metric] = "linear within noise" if fits else "not linear"
    bent = [m for m, v in per_metric.items() if v == "not linear"]
    verdict = (f"{len(sizes)} sizes: " + ("linear within noise on every metric" if not bent
                                          else "not linear on " + ", ".join(bent)))
    return {"sizes": sizes, "tested": True, "per_metric": per_metric, "verdict": verdict}


@dataclass
class ScalingReport:
    run_id: int
    base: str
    export_id: int
    n_half: int
    n_all: int
    jobs: dict[str, dict[str, Any]]  # arm -> {"id", "model", "status", "created": bool}
    result: dict[str, Any]  # what the project stores: see to_dict

    @property
    def exit_code(self) -> int:
        """1 when a job failed or answers are missing (the work ran but something failed)."""
        return 1 if self.result.get("failed") or self.result.get("failed_answers") else 0

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, **self.result}

    def summary(self) -> str:
        return summary(self.result)


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, half, all, gain per doubling, expected?) as a person reads them, from a
    stored result (the TUI shows the latest one)."""
    out = []
    for row in result.get("rows", []):
        metric, label = row["metric"], row["label"]
        if metric == "length_cv" and row.get("target") is not None:
            label = f"length spread (data {row['target']:.2f})"
        elif metric == "length_mean" and row.get("target") is not None:
            label = f"mean length (data {row['target']:.0f})"
        gain = row["gain_per_doubling"]
        if metric in PERCENT:
            cells = (_pct(row["half"]), _pct(row["all"]), "—" if gain is None else f"{gain * 100:+.0f} pts")
        elif metric == "length_cv":
            cells = (_fmt(row["half"], ".2f"), _fmt(row["all"], ".2f"), _fmt(gain, "+.2f"))
        else:
            cells = (_fmt(row["half"], ".0f"), _fmt(row["all"], ".0f"), _fmt(gain, "+.0f"))
        out.append((label, *cells, row["expected"]))
    return out


def table_header(result: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return ("metric", f"half ({result.get('n_half', '?')})", f"all ({result.get('n_all', '?')})", "gain/doubling",
            "expected?")


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.0f}%"


def recipe_line(result: dict[str, Any]) -> str:
    rows = [r for r in result.get("rows", []) if r["expected"] != "—"]
    helped = [r for r in rows if r["helps"]]
    firm = [r for r in helped if r["beyond_noise"]]
    against = [r for r in rows if r["helps"] is False and r["beyond_noise"]]
    line = (f"recipe: {RECIPE}\n"
            f"measured: {len(helped)} of {len(rows)} metrics moved the expected way, {len(firm)} beyond noise")
    if against:
        line += "\nagainst it beyond noise: " + ", ".join(r["label"] for r in against)
    return line


def summary(result: dict[str, Any]) -> str:
    jobs = result.get("jobs", {})
    lines = [f"scaling: {result.get('base')} tuned on {result.get('n_half')} (half) and {result.get('n_all')} (all) "
             f"example(s); evaluated on {result.get('cases')} held-out prompt(s) × {result.get('samples')}"]
    for arm in scs.ARMS:
        job = jobs.get(arm) or {}
        lines.append(f"{arm:<4} job {job.get('id')}  {job.get('model') or job.get('status') or ''}".rstrip())
    if result.get("failed"):
        lines.append(f"failed: {result['failed']}")
        return "\n".join(lines)
    rows = [table_header(result), *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(recipe_line(result))
    lines.append("(noise): the two intervals overlap, so the direction may be chance")
    lines.append(result.get("linearity", {}).get("verdict", ""))
    return "\n".join(line for line in lines if line)


# -- running ----------------------------------------------------------------------------------
def _check_export(store: Store) -> ExportRecord:
    export = store.latest_export()
    hint = "run `gridtune export PROJECT -o FILE.jsonl --hold-out VAR=VALUE` (or --hold-out-combos N) first"
    if export is None:
        raise ScalingError(f"no export yet: {hint}")
    if not evs.holdout_of(store, export.id):
        raise ScalingError(f"the latest export (#{export.id}, {export.path}) held nothing out to evaluate on: {hint}")
    if not evs.cases(store):
        raise ScalingError(f"no held-out prompts to evaluate on: {hint}")
    return export


def _cases_digest(store: Store) -> str:
    keys = sorted(c.key for c in evs.cases(store))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def prepare(store: Store, options: ScalingOptions, backend: Backend) -> tuple[ExportRecord, str, Path, int, int]:
    """Check everything and write the half; nothing is sent. (export, base, half path, n_half, n_all)."""
    if options.epochs is not None:
        FINETUNE["epochs"].check(options.epochs, "--epochs", ScalingError)
    EVALUATION["samples"].check(options.samples, EVALUATION["samples"].flag, ScalingError)
    try:
        spec = load_project_spec(store)
    except ValueError as exc:
        raise ScalingError(str(exc)) from None
    export = _check_export(store)
    base = options.base or backend.default_model
    if not base:
        raise ScalingError("give the base model with --model")
    examples = read_examples(export, spec, [values for _id, values in store.cells()])
    half, n_half = write_half(export, examples, options.seed)
    return export, base, half, n_half, len(examples)


def run_scaling(store_path: str | Path, options: ScalingOptions, *, backend: Backend | None = None,
                on_message: Callable[[str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> ScalingReport:
    """Train half and all (or follow the jobs an earlier call created), evaluate both
    against the base, compare, and store the comparison. Blocking: run it in a thread.

    ScalingError before anything is sent; ScalingStopped when ``should_stop()`` says so
    (the jobs go on; the next call follows them); ft.FinetuneError when the backend fails.
    """
    say = on_message or (lambda _m: None)
    stop = should_stop or (lambda: False)
    with Store.open(Path(store_path)) as store:
        _check_export(store)  # a refusal starts no server
        backend = backend or resolve_backend()
        export, base, half_path, n_half, n_all = prepare(store, options, backend)
        settings = options.settings()
        run = scs.find(store, export.id, base, settings)
        if run is None or run.half_path != str(half_path) or run.n_half != n_half:
            run = scs.create(store, export_id=export.id, base_model=base, settings=settings,
                             half_path=str(half_path), n_half=n_half, n_all=n_all)
        else:
            say(f"continuing scaling run #{run.id} of export #{export.id}")
        paths = {"half": half_path, "all": Path(export.path)}
        validation = options.validation_path or export.valid_path
        jobs: dict[str, dict[str, Any]] = {}
        for arm in scs.ARMS:  # both created before either is followed: a kill loses neither
            job_id = run.job(arm)
            if job_id is not None:
                job = ft.get_job(backend, job_id)
                if job.status not in FAILED_JOB:
                    jobs[arm] = {"id": job_id, "status": job.status, "created": False}
                    say(f"{arm}: following job {job_id} ({job.status})")
                    continue
                say(f"{arm}: job {job_id} {job.status}; starting it again")
            suffix = f"{options.suffix}-{arm}" if options.suffix else arm
            job = ft.start_finetune(backend, paths[arm], base, validation_path=validation, epochs=options.epochs,
                                    suffix=suffix, seed=options.seed, store=store, export_id=export.id,
                                    on_message=say)
            scs.set_job(store, run.id, arm, job.id)
            scs.set_state(store, run.id, "training")
            jobs[arm] = {"id": job.id, "status": job.status, "created": True}
            say(f"{arm}: job {job.id} created ({n_half if arm == 'half' else n_all} examples)")

        def check(_state: ft.JobState, _recorded: bool) -> None:
            if stop():
                raise ScalingStopped("stopped while training; the jobs go on and the next run follows them")

        failed: list[str] = []
        for arm in scs.ARMS:
            tracker = ft.JobTracker(jobs[arm]["id"], model=base, store=store)
            final = tracker.follow(backend, poll_s=options.poll_s, on_update=check)
            jobs[arm].update(status=final.status, model=final.fine_tuned_model)
            if final.status != "succeeded" or not final.fine_tuned_model:
                reason = final.error.message if final.error and final.error.message else final.status
                failed.append(f"{arm} job {final.id} {final.status}: {reason}")
            else:
                say(f"{arm}: {final.fine_tuned_model}")
        base_result: dict[str, Any] = {"base": base, "export_id": export.id, "n_half": n_half, "n_all": n_all,
                                       "jobs": jobs, "settings": settings, "half_path": str(half_path)}
        if failed:
            error = "; ".join(failed)
            result = base_result | {"failed": error}
            scs.set_state(store, run.id, "failed", error=error, result=result)
            return ScalingReport(run.id, base, export.id, n_half, n_all, jobs, result)
        scs.set_state(store, run.id, "evaluating")
        cases_digest = _cases_digest(store)
        reports = asyncio.run(_evaluate(store_path, options, base, [jobs[a]["model"] for a in scs.ARMS], backend,
                                        stop, say))
        broken = [f"evaluating {r.model}: {r.stopped}" for r in reports if r.stopped]
        if broken:
            error = "; ".join(broken)
            result = base_result | {"failed": error}
            scs.set_state(store, run.id, "failed", error=error, result=result)
            return ScalingReport(run.id, base, export.id, n_half, n_all, jobs, result)
        half_r, all_r = (r.to_dict() for r in reports)
        missing = {arm: sum(r.failed.values()) for arm, r in zip(scs.ARMS, reports, strict=True)
                   if any(r.failed.values())}
        points = [{"n": n, "model": r["model"], "scores": r["tuned"], "setup": r["setup"]["digest"],
                   "cases": cases_digest} for n, r in ((n_half, half_r), (n_all, all_r))]
        result = base_result | {
            "cases": half_r["cases"], "samples": half_r["samples"], "setup": half_r["setup"],
            "reference": half_r["reference"], "base_scores": half_r["base"], "points": points,
            "rows": compare_points(half_r["tuned"], all_r["tuned"], half_r["reference"], n_half, n_all),
            "failed_answers": missing,
        }
        result["linearity"] = linearity(points + _earlier_points(store, run.id, base, settings, points[0]))
        scs.set_state(store, run.id, "finished", result=result)
        return ScalingReport(run.id, base, export.id, n_half, n_all, jobs, result)


def _earlier_points(store: Store, run_id: int, base: str, settings: dict[str, Any],
                    like: dict[str, Any]) -> list[dict[str, Any]]:
    """Points of earlier finished runs comparable with this one (same base, settings,
    evaluation setup and held-out prompts): the third size a linearity test needs."""
    out = []
    for other in scs.finished(store, base):
        if other.id == run_id or other.settings != settings or not other.result:
            continue
        out += [p for p in other.result.get("points", [])
                if p.get("setup") == like["setup"] and p.get("cases") == like["cases"]]
    return out


async def _evaluate(store_path: str | Path, options: ScalingOptions, base: str, models: list[str], backend: Backend,
                    stop: Callable[[], bool], say: Callable[[str], None]) -> list[EvalReport]:
    stop_event = asyncio.Event()

    async def watch() -> None:
        while not stop_event.is_set():
            if stop():
                stop_event.set()
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    reports = []
    try:
        for model in models:
            eval_options = EvalOptions(model=model, against=base, samples=options.samples,
                                       temperature=options.temperature, max_tokens=options.max_tokens,
                                       pool=options.pool)
            say(f"evaluating {model} against {base}")
            try:
                report = await run_eval(store_path, eval_options, backend=backend, stop_event=stop_event)
            except EvalError as exc:
                raise ScalingError(str(exc)) from None
            if stop_event.is_set():
                raise ScalingStopped("stopped while evaluating; the answers so far are stored")
            reports.append(report)
            if report.stopped:  # a permanent error (an unknown model, a refused key): no use asking the next
                break
    finally:
        stop_event.set()
        await watcher
    return reports
