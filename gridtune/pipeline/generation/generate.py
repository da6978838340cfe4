"""The resumable generation runner: every pending completion of a project, through
the OpenAI chat-completions API, with bounded concurrency, rpm/tpm limits and
retries, each result committed the moment it arrives.

Public API (the CLI and the TUI use only this and ``runs``):

    options = GenerateOptions(concurrency=8, rpm=500)
    result = await run_generation("p.gridtune", options, on_progress=cb, stop_event=ev)

A run is resumable because nothing but the store holds state: a completion is
'running' while its request is in flight, 'done' once saved (one transaction),
'failed' with a reason, and back to 'pending' if the run stops or dies first.

Curation runs use the same machinery (issue 9):

* ``redo_cut_off`` + ``max_tokens``: regenerate exactly the completions cut off at
  max tokens that were generated with fewer than ``max_tokens``. Each keeps its
  old text until the new one arrives (a failed or interrupted redo loses
  nothing), and the new text withdraws the old text's grades. Running the same
  command again resumes: those already redone with that many tokens are skipped.
* ``redo_ids``: regenerate exactly these completions (the review's "redo this one",
  see ``redo_completion``).
* ``top_up`` N: first add new samples for exactly the cells that the thin values
  and pairs need (coverage.plan_top_up), then generate what is pending. The new
  samples are rows in the project, so a plain ``generate`` (or the same top-up
  again, which then adds nothing) resumes an interrupted top-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx
import openai

from ...core.errors import GridtuneError
from ...store import RunLost, Store, WorkItem, describe_sqlite_error, sqlite_error_kind
from ...store.runlock import is_alive
from ..client.backend import Backend
from ..client.lean_http import LeanHttpClient, ReplyTooLarge, reply_limit_bytes
from ..client.ratelimit import MINUTE, RateLimits
from ..client.replies import (
    RATE_LIMIT_WAIT_S,
    MalformedResponse,
    Reply,
    StreamError,
    describe,
    is_transient,
    parse_reply,
    retry_delay_s,
    retry_kind,
)
from ..client.resolve import resolve_backend
from ..format.cost import budget_text
from ..spec.grid import GridSpec
from ..spec.options import EXPORT, GENERATION
from ..spec.project import load_project_spec
from .estimate import (
    Estimate,
    ServerInfo,
    estimate_run,
    mean_prompt_tokens,
    resolve_concurrency,
    server_info,
    work_to_do,
)
from .progress import Progress, Tracker

ProgressCallback = Callable[[Progress], Any]
log = logging.getLogger(__name__)



class GenerateError(GridtuneError, ValueError):
    """Bad options or a project that cannot be generated; a one-line message."""


@dataclass
class GenerateOptions:
    """How to run a generation. ``None`` overrides mean: use the grid spec's setting."""

    concurrency: int | None = None  # None: what the server batches (GET /v1/models), else 8
    rpm: float | None = None
    tpm: float | None = None
    limit: int | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 120.0
    max_attempts: int = 6  # failed attempts (errors, timeouts, malformed replies); a 429 is not one
    rate_limit_wait_s: float = RATE_LIMIT_WAIT_S  # a request rate-limited (429) this long after its first send fails
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    progress_interval_s: float = 0.5
    rate_period_s: float = MINUTE  # the "minute" of rpm/tpm; only tests shrink it
    stream: bool | None = None  # None: stream from the local and compatible servers (see _use_stream)
    redo_cut_off: bool = False  # regenerate the cut-off completions (needs max_tokens; see the module doc)
    redo_ids: list[int] | None = None  # regenerate exactly these completions
    top_up: int | None = None  # first add samples so every value and pair has this many kept examples
    min_grade: int | None = None  # what "kept" means for top_up (as the export's --min-grade)
    max_cost: float | None = None  # USD: send nothing that could take the run's spending past it (a priced model)

    def check(self) -> None:
        settings = {name: getattr(self, name) for name in ("concurrency", "rpm", "tpm", "limit", "temperature",
                                                           "max_tokens", "max_attempts", "max_cost", "top_up")}
        for name, value in (settings | {"timeout": self.timeout_s}).items():
            if value is not None:
                GENERATION[name].check(value, GENERATION[name].flag, GenerateError)
        if self.min_grade is not None:
            EXPORT["min_grade"].check(self.min_grade, EXPORT["min_grade"].flag, GenerateError)
        if self.rate_period_s <= 0 or self.progress_interval_s <= 0:
            raise GenerateError("rate period and progress interval must be positive")
        modes = [name for name, on in (("--redo-cut-off", self.redo_cut_off), ("a redo of chosen completions",
                 self.redo_ids is not None), ("--top-up", self.top_up is not None)) if on]
        if len(modes) > 1:
            raise GenerateError(f"{' and '.join(modes)} cannot be combined; run them one after the other")
        if self.redo_cut_off and self.max_tokens is None:
            raise GenerateError("--redo-cut-off needs --max-tokens N (more than the cut-off completions had)")
        if self.redo_ids is not None and (not self.redo_ids or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in self.redo_ids)):
            raise GenerateError("completions to redo must be given by their ids (positive integers)")

    @property
    def redo(self) -> bool:
        """Whether this run regenerates finished completions (their text is replaced)."""
        return self.redo_cut_off or self.redo_ids is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GenerateOptions:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunResult:
    run_id: int
    state: str  # finished | stopped | failed
    progress: Progress
    error: str | None = None
    stop_requested: bool = False  # stopped through the store (`gridtune stop`), not stop_event
    budget_reached: bool = False  # stopped before a request could take spending past --max-cost
    spent: float | None = None  # USD spent by this run, as far as the price table knows (with --max-cost)

    @property
    def exit_code(self) -> int:
        """0 all done (or a requested stop), 1 some completions failed."""
        if self.state == "failed" or self.progress.failed:
            return 1
        return 0


@dataclass
class Plan:
    """What a run will do, resolved before anything is recorded (so errors are exit 2)."""

    spec: GridSpec
    backend: Backend
    model: str
    params: dict[str, Any]  # request parameters as stored per completion; never the key
    concurrency: int = 8  # requests in flight at once (see estimate.resolve_concurrency)
    stream: bool = False  # stream each reply (the read timeout is then between chunks)
    server: ServerInfo | None = None  # what the server advertises about its engine, if anything
    notes: tuple[str, ...] = ()  # things to tell the user before the run (a capped concurrency)


def run_params(plan: Plan, options: GenerateOptions) -> dict[str, Any]:
    """What a run is recorded with: the request parameters and its limits, so a
    screen attaching to it later shows what it really runs with (never a key)."""
    return {**plan.params, "concurrency": plan.concurrency, "rpm": options.rpm, "tpm": options.tpm,
            "max_cost": options.max_cost, "stream": plan.stream}


def _use_stream(backend: Backend, options: GenerateOptions) -> bool:
    """Whether to stream replies.

    Streaming is what makes a slow server safe: the read timeout applies between
    chunks, so a reply that takes minutes on a CPU is not a timeout as long as tokens
    keep coming, and the run shows tokens/s before its first completion ends. The
    local server and compatible servers (vLLM, Ollama, llama.cpp) stream with
    ``stream_options.include_usage``, so token accounting stays exact. OpenAI keeps
    the plain request: its replies come in seconds, far inside the timeout, and the
    non-streamed path costs less client CPU per request at hundreds in flight.
    ``--no-stream`` (options.stream False) forces the plain path for a server that
    streams badly; a server that ignores stream=true is read as a plain reply anyway.
    """
    if options.stream is not None:
        return options.stream
    return backend.kind != "openai"


def plan_run(store: Store, options: GenerateOptions, backend: Backend | None = None) -> Plan:
    options.check()
    try:
        spec = load_project_spec(store)
    except ValueError as exc:
        raise GenerateError(str(exc)) from None
    backend = backend or resolve_backend()
    model = options.model or spec.settings.model or backend.default_model
    if not model:
        raise GenerateError(
            f"no model to generate with: pass --model, or set [generation] model in the spec "
            f"({backend.label} has no default model)"
        )
    s = spec.settings
    params: dict[str, Any] = {
        "temperature": s.temperature if options.temperature is None else options.temperature,
        "max_tokens": s.max_tokens if options.max_tokens is None else options.max_tokens,
    }
    if s.top_p is not None:
        params["top_p"] = s.top_p
    if s.seed is not None:
        params["seed"] = s.seed
    if options.max_cost is not None and _coster(model)(None, 1, 1) is None:
        raise GenerateError(f"--max-cost needs a priced model: no price is known for {model}")
    info = server_info(backend, model)
    concurrency, note = resolve_concurrency(options.concurrency, info)
    return Plan(spec, backend, model, params, concurrency=concurrency, stream=_use_stream(backend, options),
                server=info, notes=(note,) if note else ())


def select_work(store: Store, options: GenerateOptions) -> list[WorkItem]:
    """What a run generates, in grid order: the completions to redo, or every
    pending or failed one (after a top-up has added its samples)."""
    if options.redo_cut_off:
        work = store.redo_items(below_max_tokens=options.max_tokens)
    elif options.redo_ids is not None:
        work = store.redo_items(ids=options.redo_ids)
        missing = sorted(set(options.redo_ids) - {w.completion_id for w in work})
        if missing:
            raise GenerateError(f"no completion #{missing[0]} in this project's grid"
                                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    else:
        return store.pending_work(options.limit)
    return work if options.limit is None else work[: options.limit]


class NothingToDo(GenerateError):
    """A run was asked for with nothing to generate; no run is recorded."""


def nothing_to_generate(store: Store, options: GenerateOptions) -> str | None:
    """Why a run with ``options`` would have nothing to do, in one line; None when it
    has work. Every run start asks this first, so a finished project never gets an
    empty run."""
    if requests_to_do(store, options):
        return None
    if options.redo_cut_off:
        return f"nothing to redo: no completion cut off at max tokens had fewer than {options.max_tokens:,}"
    if options.redo_ids is not None:
        return "nothing to redo"
    counts = store.status_counts()
    if options.top_up is not None:
        return (f"nothing to top up: every value and pair has {options.top_up:,} kept examples, "
                f"and no completion is pending")
    return (f"nothing left to generate: all {counts.done:,} completions are done "
            f"(edit the grid or raise samples for more; review grades them)")


def requests_to_do(store: Store, options: GenerateOptions) -> int:
    """How many completions a run with ``options`` would generate now (a top-up
    counts the samples it would add)."""
    if options.redo:
        return len(select_work(store, options))
    todo = work_to_do(store, options.limit)[0]
    if options.top_up is not None:
        from ..curation.coverage import plan_top_up

        todo += plan_top_up(store, options.top_up, min_grade=options.min_grade).total
        todo = todo if options.limit is None else min(todo, options.limit)
    return todo


def estimate_plan(store: Store, plan: Plan, options: GenerateOptions, requests: int | None = None) -> Estimate:
    """How long running ``plan`` on the project now would take (see estimate.py)."""
    _todo, mean = work_to_do(store, options.limit)
    requests = requests_to_do(store, options) if requests is None else requests
    return estimate_run(requests=requests, max_tokens=plan.params["max_tokens"], mean_tokens=mean,
                        prompt_tokens=mean_prompt_tokens(plan.spec), concurrency=plan.concurrency,
                        backend_kind=plan.backend.kind, backend_label=plan.backend.label, info=plan.server,
                        rpm=options.rpm, tpm=options.tpm)


def worst_cost(store: Store, plan: Plan, options: GenerateOptions) -> tuple[float, int, int]:
    """What the work of a run could cost at most in USD (every request's prompt at the
    never-under estimate, max_tokens each; 0 for an unpriced model), with the number
    of requests and the completion tokens each may take."""
    requests = requests_to_do(store, options)
    prompt = 0
    for item in select_work(store, options)[:50] if not options.top_up else []:
        prompt = max(prompt, _token_estimator(plan.model, 0)(plan.spec.render(item.values).generation_messages()))
    prompt = prompt or int(mean_prompt_tokens(plan.spec) * 4 / 3) + 16  # a top-up's cells are not rows yet
    completion = plan.params["max_tokens"] * max(1, plan.params.get("n", 1))
    return (_coster(plan.model)(None, prompt, completion) or 0.0) * requests, requests, completion


def budget_line(store: Store, plan: Plan, options: GenerateOptions) -> str | None:
    """Before a run with --max-cost: the screen's budget line (``budget_text``) with the
    max_tokens it assumes and, when the budget is short, how to go on; None without
    --max-cost or with nothing to do."""
    if options.max_cost is None:
        return None
    most, requests, completion = worst_cost(store, plan, options)
    text = budget_text(options.max_cost, most, requests)
    if text is None:
        return None
    over = most > options.max_cost
    return (f"cost: {text} (at max_tokens {completion:,})"
            + ("; the run stops cleanly there: run it again to resume" if over else ""))


def preview_run(store_path: str | os.PathLike[str], options: GenerateOptions,
                backend: Backend | None = None, *, start_local: bool = True) -> tuple[Plan, Estimate]:
    """The plan and time estimate of a run, before starting it (the CLI prints them,
    the generate screen shows them). ``start_local=False``: never start the local
    server just for this (BackendError when it is not running)."""
    with Store.open(Path(store_path)) as store:
        if backend is None:
            backend = resolve_backend(start_local=start_local)
        plan = plan_run(store, options, backend)
        return plan, estimate_plan(store, plan, options)


# -- the run ---------------------------------------------------------------------


def cell_params(params: dict[str, Any], item: WorkItem) -> dict[str, Any]:
    """One sample's request parameters: a fixed seed moves with the sample, or every
    sample of a cell would be the same text."""
    if "seed" in params and item.sample:
        return {**params, "seed": params["seed"] + item.sample}
    return params


def chat_request(spec: GridSpec, model: str, params: dict[str, Any], item: WorkItem
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chat request for one sample of a cell, live or in a batch, and its parameters."""
    params = cell_params(params, item)
    return {"model": model, "messages": spec.render(item.values).generation_messages(), **params}, params


def _token_estimator(model: str, max_tokens: int, n: int = 1) -> Callable[[list[dict[str, str]]], int]:
    """What a request may be charged by a tpm limit, never under (tokens.request_tokens)."""
    try:
        from ..format.tokens import request_tokens
    except ImportError:  # the tokens module is optional here: the characters-based bound alone
        return lambda messages: (sum(-(-len(m["content"]) // 3) + 4 for m in messages) + 3
                                 + max_tokens * max(1, n))

    return lambda messages: request_tokens(messages, model, max_tokens=max_tokens, n=n)


def _coster(model: str) -> Callable[[str | None, int, int], float | None]:
    try:
        from ..format.cost import generation_cost
    except ImportError:
        return lambda *_: None

    def cost(reported: str | None, prompt: int, completion: int) -> float | None:
        value = generation_cost(reported or model, prompt, completion)
        return value if value is not None or not reported else generation_cost(model, prompt, completion)

    return cost


GROUP_COMMIT_S = 0.01  # see _Writer._loop
WRITE_RETRY_S = 0.5  # how often a write the project refused is tried again
WRITE_SLOW_S = 0.1  # a commit taking longer waits on a lock (or a failing disk): send nothing new meanwhile
WRITE_WAIT_S = 600.0  # how long a run waits for space on a full disk (or, when ending, for a lock)
WRITE_WAIT_ENV = "GRIDTUNE_WRITE_WAIT_S"  # overrides it (tests shorten it)
_MAY_PASS = ("locked", "full")  # refusals that pass by themselves (a lock let go, space freed)


def write_wait_s() -> float:
    try:
        value = float(os.environ.get(WRITE_WAIT_ENV, ""))
    except ValueError:
        return WRITE_WAIT_S
    return value if 0 <= value < 7 * 86400 else WRITE_WAIT_S


@dataclass(eq=False)
class _Write:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: concurrent.futures.Future[Any] | None = None
    answer: bool = False  # a received answer: paid for, never dropped while it can be kept


class _Writer:
    """Store writes on one thread, in submission order, with group commit.

    The event loop only puts a write on a queue (no thread hand-off, no wake-up
    back): a commit is usually ~50 us, but SQLite's WAL checkpoint fsyncs
    (10-30 ms on a busy disk), which on the loop would stall every request in
    flight. The writes that arrive within GROUP_COMMIT_S of each other share one
    transaction, so a burst of replies costs one commit.

    A batch the project refuses for a reason that passes (another process holds
    the write lock, the disk is full) is kept, in order, and tried again every
    WRITE_RETRY_S: ``blocked`` says why meanwhile, and the runner sends no new
    request while it is set, while a commit is slow (``stuck``) or while ``unsaved``
    answers reach its bound, so what is kept stays bounded. A lock is waited out
    (when the run is ending, up to ``wait_s``); a full disk up to ``wait_s``; then
    it gives up (``error``; ``lost`` answers). Any other failure of a write is kept in
    ``error`` at once and the run stops as failed (the completion stays pending,
    never half-written).
    """

    _CLOSE = object()

    def __init__(self, store: Store, wait_s: float | None = None) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.wait_s = write_wait_s() if wait_s is None else wait_s
        self.error: BaseException | None = None
        self.blocked: BaseException | None = None  # why the held writes wait (None: writing works)
        self.lost = 0  # answers given up on (the project refused them past wait_s)
        self.waits = 0  # times the project refused writes for a while
        self._unsaved = 0  # answers queued or held, not yet committed
        self._committing_since: float | None = None
        self._closing_since: float | None = None
        self._count = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="gridtune-store", daemon=True)
        self._thread.start()

    @property
    def unsaved(self) -> int:
        return self._unsaved

    @property
    def stuck(self) -> bool:
        """Whether a commit has been waiting longer than a healthy one takes (a lock,
        most often): known before the busy timeout says so."""
        since = self._committing_since
        return since is not None and time.monotonic() - since > WRITE_SLOW_S

    def _add_unsaved(self, n: int) -> None:
        with self._count:
            self._unsaved += n

    def later(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue a write; it is committed in order, as soon as the writer is free."""
        self._queue.put(_Write(fn, args, kwargs))

    def answer(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue the write of a received answer (counted in ``unsaved`` until committed)."""
        self._add_unsaved(1)
        self._queue.put(_Write(fn, args, kwargs, answer=True))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Queue a write whose result the caller awaits."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Write(fn, args, kwargs, done))
        return asyncio.wrap_future(done)

    async def close(self) -> None:
        """Commit everything queued so far (waiting out a lock or a full disk up to
        wait_s), then end the thread."""
        self._closing_since = time.monotonic()
        self._queue.put(self._CLOSE)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _loop(self) -> None:
        held: list[_Write] = []  # refused for a reason that passes: first in the next try
        closing = False
        while True:
            if held:
                try:
                    batch = [self._queue.get(timeout=WRITE_RETRY_S)]
                except queue.Empty:
                    batch = []
            else:
                batch = [self._queue.get()]
                # Let the replies of the next few ms join this transaction: fewer commits and
                # far fewer GIL hand-offs to the event loop. A reply is still committed within
                # ~10 ms of arriving; a process killed in that window leaves it pending.
                time.sleep(GROUP_COMMIT_S)
            while True:  # group commit: take whatever else is already waiting
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = closing or any(op is self._CLOSE for op in batch)
            ops = held + [op for op in batch if op is not self._CLOSE]
            held = self._commit(ops) if ops else []
            if closing and not held:
                return

    def _commit(self, ops: list[_Write]) -> list[_Write]:
        """Commit ``ops`` in one transaction; returns them when the project refused them
        for a reason that passes (to be tried again), else nothing."""
        results: list[tuple[bool, Any]] = []
        self._committing_since = time.monotonic()
        try:
            with self._store.transaction():
                for op in ops:
                    if op.done is not None and op.done.cancelled():
                        results.append((True, None))  # its awaiter is gone (a heartbeat at the end of a run)
                        continue
                    try:
                        results.append((True, op.fn(*op.args, **op.kwargs)))
                    except sqlite3.Error as exc:
                        if sqlite_error_kind(exc) in _MAY_PASS:
                            raise  # the whole batch waits and is tried again, in order
                        results.append((False, exc))
                    except Exception as exc:  # one bad write must not lose the others
                        results.append((False, exc))
        except Exception as exc:  # the commit itself failed: nothing of this batch was saved
            if sqlite_error_kind(exc) in _MAY_PASS and self._wait(exc):
                return ops
            self._give_up(ops, exc)
            return []
        finally:
            self._committing_since = None
        if self.blocked is not None:
            log.warning("the project takes writes again; every answer held was saved")
            self.blocked = None
        for op, (ok, value) in zip(ops, results, strict=True):
            if op.answer:
                self._add_unsaved(-1)
            if ok:
                if op.done is not None and not op.done.done():
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        op.done.set_result(value)
            else:
                self._failed(value, op.done)
        return []

    def _wait(self, exc: BaseException) -> bool:
        """Whether to keep refused writes for another try. A lock is always let go in the
        end: its writes wait for it while the run goes on, and up to wait_s once the run
        is ending (a stop must end). A full disk may stay full: wait_s from the first
        refusal. What comes after a give-up is not waited for again."""
        if self.error is not None:
            return False
        now = time.monotonic()
        locked = sqlite_error_kind(exc) == "locked"
        if self.blocked is None:
            self._blocked_since = now
            self.waits += 1
            until = "until it can be written" if locked else f"for up to {self.wait_s:g} s"
            log.warning("%s; holding %d answer(s) in memory and retrying, no new requests %s",
                        describe_sqlite_error(exc, self._store.path), self._unsaved, until)
        self.blocked = exc
        if locked:
            return self._closing_since is None or now - self._closing_since < self.wait_s
        return now - self._blocked_since < self.wait_s

    def _give_up(self, ops: list[_Write], exc: BaseException) -> None:
        lost = sum(op.answer for op in ops)
        self.lost += lost
        self._add_unsaved(-lost)
        if self.error is None:
            self.error = exc
        self.blocked = None
        for op in ops:
            if op.done is not None and not op.done.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    op.done.set_exception(exc)

    def _failed(self, exc: BaseException, done: concurrent.futures.Future[Any] | None) -> None:
        if done is not None:
            if not done.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    done.set_exception(exc)
        else:
            log.error("saving to the project failed: %s", exc)
            if self.error is None:
                self.error = exc


class _Runner:
    def __init__(self, store: Store, plan: Plan, options: GenerateOptions, run_id: int,
                 work: list[WorkItem], stop: asyncio.Event, on_progress: ProgressCallback | None):
        self.store, self.plan, self.options, self.run_id = store, plan, options, run_id
        self.writer = _Writer(store)
        self.stop, self.on_progress = stop, on_progress
        try:
            estimate: Estimate | None = estimate_plan(store, plan, options, requests=len(work))
        except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
            log.warning("run #%s: no estimate: %s", run_id, exc)
            estimate = None
        max_tokens = plan.params["max_tokens"]
        mean = work_to_do(store)[1]
        self.tracker = Tracker(len(work), run_id, plan.model, estimate_s=estimate.seconds if estimate else None,
                               estimate=estimate.text if estimate else None,
                               expected_tokens=min(mean, max_tokens) if mean else max_tokens)
        # Ready work, retries first: a request back from waiting out a Retry-After or a
        # backoff goes ahead of fresh work. A waiting request holds no slot: it sits on
        # a timer (self.waiting), not in a worker.
        self.ready: asyncio.PriorityQueue[tuple[int, int, Any]] = asyncio.PriorityQueue()
        for seq, item in enumerate(work):
            self.ready.put_nowait((1, seq, item))
        self._seq = len(work)
        self.left = len(work)  # neither done nor failed yet
        self.active: set[_Job] = set()  # started, not ended: released (back to pending) on a stop
        self.waiting: dict[_Job, asyncio.TimerHandle] = {}
        self.estimate = _token_estimator(plan.model, plan.params["max_tokens"], plan.params.get("n", 1))
        self.limits = RateLimits(options.rpm, options.tpm, 0, options.rate_period_s)
        self.cost = _coster(plan.model)
        # A reply bigger than max_tokens can explain is refused before it is read whole
        # (a malformed reply): a hostile or broken server cannot fill memory or the project.
        n = plan.params.get("n", 1)
        self.client = plan.backend.async_client(timeout=options.timeout_s,
                                                reply_limit=reply_limit_bytes(max_tokens, n, stream=True))
        # Plain requests go through the lean HTTP client where it sends exactly what the
        # openai client would (lean_http.py); GRIDTUNE_LEAN_HTTP=0 turns it off.
        self.http = (LeanHttpClient.for_client(self.client, options.timeout_s, plan.concurrency,
                                               reply_limit_bytes(max_tokens, n))
                     if os.environ.get("GRIDTUNE_LEAN_HTTP", "1") != "0" else None)
        # Answers received but not yet committed: past this, no new request is sent (a
        # slow or locked project must not fill memory with paid answers).
        self.hold_max = max(64, 4 * plan.concurrency)
        self.stop_requested = False
        self.streaming = plan.stream  # False once the server refused a streamed request
        self.lost: RunLost | None = None  # the run was declared dead / taken over by another process
        # --max-cost: what replies cost so far, and the most the requests in flight may still cost.
        self.spent, self.reserved, self.budget_reached = 0.0, 0.0, False
        self._progress_failed = False

    async def run(self) -> str:
        self.workers = min(self.plan.concurrency, self.left)
        workers = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        everything: asyncio.Future[Any] = asyncio.gather(*workers)
        stopping: asyncio.Task[Any] = asyncio.create_task(self.stop.wait())
        beating = asyncio.create_task(self._heartbeat())
        try:
            await asyncio.wait([everything, stopping], return_when=asyncio.FIRST_COMPLETED)
            if everything.done():
                everything.result()  # a worker's unexpected error ends the run as failed
                return "stopped" if self.budget_reached else "finished"
            # Stop: no new requests; in-flight ones are cancelled and go back to pending.
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            return "stopped"
        finally:
            tasks: list[asyncio.Future[Any]] = [stopping, beating, *workers]
            for pending_task in tasks:
                pending_task.cancel()
            await asyncio.gather(stopping, beating, *workers, everything, return_exceptions=True)
            for handle in self.waiting.values():
                handle.cancel()
            for job in self.active:  # in flight or waiting to retry: back to pending, nothing half-written
                self.writer.later(self.store.release_running, job.item.completion_id, self.run_id)
                self.tracker.ended()
            self.active.clear()
            await self.writer.close()
            if self.http is not None:
                await self.http.close()
            await self.client.close()
            if self.writer.error is not None:
                raise GenerateError(self._write_failure())

    def _write_failure(self) -> str:
        """The run's end when the project could not be written, in one line."""
        writer = self.writer
        what = (f"{writer.lost:,} answer(s) received could not be saved (run again to resume)" if writer.lost
                else "every answer received was saved (run again to resume)")
        return f"{describe_sqlite_error(writer.error, self.store.path)}; {what}" if writer.error else what

    async def _heartbeat(self) -> None:
        """Save progress in the run row (other processes follow it there), pass it to
        on_progress, and notice a stop requested through the store."""
        while True:
            if self.writer.error is not None:
                self.stop.set()  # the project cannot be written: stop; run() reports it as failed
            snapshot = self.snapshot()
            try:
                if await self.writer.call(self.store.heartbeat, self.run_id, snapshot.to_dict()):
                    self.stop_requested = True
                    self.stop.set()
            except RunLost as exc:  # no longer our run: stop at once; the store takes no more writes
                log.error("run #%s: %s", self.run_id, exc)
                self.lost = exc
                self.stop.set()
                return
            except sqlite3.Error as exc:  # a busy file must not end the run; try again next beat
                if self.writer.error is None:  # else run() says it, once
                    log.warning("run #%s: could not save progress: %s", self.run_id, exc)
            self.emit(snapshot)
            await asyncio.sleep(self.options.progress_interval_s)

    def snapshot(self, state: str | None = None) -> Progress:
        if state is None:
            state = "stopping" if self.stop.is_set() else "running"
        return self.tracker.snapshot(state)

    def emit(self, snapshot: Progress) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(snapshot)
        except Exception:  # a display's bug must not stop the heartbeat (or the run)
            if not self._progress_failed:
                log.exception("run #%s: on_progress failed; progress is still saved in the project", self.run_id)
            self._progress_failed = True

    async def _worker(self) -> None:
        while not self.stop.is_set():
            _priority, _seq, entry = await self.ready.get()
            if entry is None:  # everything is done or failed
                return
            await self._attempt(entry if isinstance(entry, _Job) else self._job(entry))

    def _job(self, item: WorkItem) -> _Job:
        body, params = chat_request(self.plan.spec, self.plan.model, self.plan.params, item)
        job = _Job(item, body, params)
        self.active.add(job)
        self.writer.later(self.store.mark_running, item.completion_id, self.run_id)
        self.tracker.started()
        return job

    async def _attempt(self, job: _Job) -> None:
        """Send one request of ``job``; the reply is saved, or the job waits for a retry
        (off its worker), or it fails. Nothing is sent while the project cannot take
        the answers (locked, full) or too many wait to be written: they are paid for."""
        writer = self.writer
        while (writer.blocked is not None or writer.error is not None or writer.stuck
               or writer.unsaved >= self.hold_max):
            await asyncio.sleep(0.05)  # a stop cancels this worker; the job goes back to pending
        if self.options.max_cost is not None and not self._reserve(job):
            return self._over_budget()
        tokens = 0
        if self.limits.needs_token_estimate:
            if job.tokens is None:
                job.tokens = self.estimate(job.body["messages"])
            tokens = job.tokens
        job.mark = await self.limits.acquire(tokens)
        started = time.monotonic()
        if job.first_sent is None:
            job.first_sent = started
        job.sends += 1
        try:
            if self.streaming:
                reply = await self._stream_or_plain(job)
            else:
                reply = await self._plain(job)
        except asyncio.CancelledError:
            raise  # run() puts every active job back to pending
        except Exception as exc:  # every failure is retried or recorded, never raised out of the run
            if isinstance(exc, ReplyTooLarge):
                exc = MalformedResponse(str(exc))
            self._settle(job, job.reserved if isinstance(exc, MalformedResponse) else 0.0)  # a 200 may be billed
            self._retry_or_fail(job, exc)
            return
        self._done(job, reply, time.monotonic() - started)

    def _worst_cost(self, job: _Job) -> float:
        """The most one request of ``job`` can cost: its prompt at the never-under
        estimate, and max_tokens for each choice."""
        n = job.params.get("n", 1)
        completion = job.params["max_tokens"] * max(1, n)
        prompt = self.estimate(job.body["messages"]) - completion
        return self.cost(None, prompt, completion) or 0.0

    def _reserve(self, job: _Job) -> bool:
        """Whether the budget allows sending ``job`` now (then its worst cost is held)."""
        worst = self._worst_cost(job)
        assert self.options.max_cost is not None  # only called with a budget
        if self.spent + self.reserved + worst > self.options.max_cost + 1e-12:
            return False
        self.reserved += worst
        job.reserved = worst
        return True

    def _settle(self, job: _Job, cost: float) -> None:
        """A request of ``job`` is over: release what it held, count what it cost."""
        self.reserved -= job.reserved
        job.reserved = 0.0
        self.spent += cost

    def _over_budget(self) -> None:
        """The next request could take spending past --max-cost: send nothing more. The
        requests in flight finish (their cost was held); what is left stays pending."""
        if not self.budget_reached:
            self.budget_reached = True
            log.info("run #%s: stopping before spending more than $%s (spent $%.4f)", self.run_id,
                     self.options.max_cost, self.spent)
            for _ in range(self.workers):
                self._seq += 1
                self.ready.put_nowait((-1, self._seq, None))

    def _retry_or_fail(self, job: _Job, exc: Exception) -> None:
        opts = self.options
        # The openai package's own HTTP types (httpx or, in openai 3, httpx2): read the headers.
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is not None:
            self.limits.observe(headers, job.mark)  # a 429 says what is left, and when it resets
        if not is_transient(exc):
            return self._fail(job, exc, "permanent")
        delay = retry_delay_s(job, exc, opts)
        if delay is None:
            return self._fail(job, exc, "transient")
        self.tracker.retried(retry_kind(exc))
        self.waiting[job] = asyncio.get_running_loop().call_later(delay, self._wake, job)

    def _wake(self, job: _Job) -> None:
        """A job has waited out its Retry-After or backoff: ahead of fresh work."""
        del self.waiting[job]
        self._seq += 1
        self.ready.put_nowait((0, self._seq, job))

    def _ended(self, job: _Job) -> None:
        self.active.discard(job)
        self.left -= 1
        if self.left == 0:  # nothing more will come back: let every worker go
            for _ in range(self.workers):
                self._seq += 1
                self.ready.put_nowait((2, self._seq, None))

    def _fail(self, job: _Job, exc: Exception, kind: str) -> None:
        error = self.plan.backend.redact(describe(exc))
        if kind == "transient":
            n = job.sends
            error += f" (after {n} attempt{'s' if n != 1 else ''})"
        self.tracker.failed(job.item.completion_id, error)
        self.writer.later(self.store.save_failed, job.item.completion_id, error=error, error_kind=kind,
                          attempts=job.item.attempts + job.sends, model=self.plan.model,
                          params=job.params, run_id=self.run_id)
        self._ended(job)

    def _done(self, job: _Job, reply: Reply, latency: float) -> None:
        plan, item = self.plan, job.item
        cost = None
        if reply.prompt_tokens is not None and reply.completion_tokens is not None:
            cost = self.cost(reply.model, reply.prompt_tokens, reply.completion_tokens)
        if self.options.max_cost is not None:
            self._settle(job, job.reserved if cost is None else cost)
        self.tracker.done(item.completion_id, reply.text, reply.completion_tokens or reply.chunks, cost,
                          streamed=job.streamed[0])
        # Queued, not awaited: the writer commits it in order and is drained before
        # the run is finished, so a stop arriving now still lets it commit whole.
        self.writer.answer(
            self.store.save_redone if self.options.redo else self.store.save_done,
            item.completion_id, text=reply.text, model=reply.model or plan.model, params=job.params,
            prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
            latency_s=round(latency, 4), finish_reason=reply.finish_reason,
            attempts=item.attempts + job.sends, run_id=self.run_id,
        )
        self._ended(job)

    async def _stream_or_plain(self, job: _Job) -> Reply:
        """Stream; a server that refuses stream/stream_options with a 400 (older
        compatible servers, old Azure API versions) gets plain requests from then on."""
        try:
            return await self._stream(job)
        except openai.APIStatusError as exc:
            if exc.status_code not in (400, 422) or "stream" not in describe(exc).lower():
                raise
            if self.streaming:  # requests in flight at the same time may all meet it: say it once
                self.streaming = False
                log.warning("run #%s: the server refused a streamed request (%s); sending plain requests",
                            self.run_id, self.plan.backend.redact(describe(exc)))
        return await self._plain(job)

    async def _plain(self, job: _Job) -> Reply:
        """One plain request: the lean client's, else the openai client's documented
        raw-request method (client.post: the same auth, timeout and error types as
        chat.completions.create, without its TypedDict transform of the request and
        pydantic build of the reply). parse_reply checks what we use."""
        if self.http is not None:
            headers, content = await self.http.post("/chat/completions", job.body)
            self.limits.observe(headers, job.mark)
            return parse_reply(content)
        response = await self.client.post("/chat/completions", body=job.body, cast_to=httpx.Response)
        self.limits.observe(response.headers, job.mark)
        return parse_reply(response.content)

    async def _stream(self, job: _Job) -> Reply:
        """One streamed request: the reply gathered from its chunks.

        The client's timeout is then httpx's read timeout *between* chunks (and the
        server's keep-alive pings), never a cap on the whole answer. Chunks are read as
        plain dicts through the client's own SSE reader (AsyncStream[object]): the
        same auth, errors, and in-band error events as create(stream=True), without
        a pydantic model per token. Content pieces count as tokens in the tracker as
        they arrive (``streamed[0]`` keeps the total across attempts).
        """
        streamed = job.streamed
        request = {**job.body, "stream": True, "stream_options": {"include_usage": True}}
        stream = await self.client.post("/chat/completions", body=request, cast_to=object, stream=True,
                                        stream_cls=openai.AsyncStream[object])
        async with stream:
            self.limits.observe(stream.response.headers, job.mark)
            content_type = stream.response.headers.get("content-type", "")
            if "event-stream" not in content_type:  # a server that ignores stream=true: one plain body
                return parse_reply(await stream.response.aread())
            gathered = _Gathered()
            try:
                async for chunk in stream:
                    pieces = gathered.add(chunk)
                    if pieces:
                        self.tracker.streamed(pieces)
                        streamed[0] += pieces
            except openai.APIError as exc:  # an error event inside the stream (after the 200)
                if isinstance(exc, (openai.APIStatusError, openai.APIConnectionError)):
                    raise
                raise StreamError(exc.message) from None
            except ValueError as exc:  # a chunk that is not JSON
                raise MalformedResponse(f"a stream chunk is not JSON ({exc})") from None
        return gathered.reply()


@dataclass(eq=False)
class _Job:
    """One completion on its way: its request, and how its attempts went."""

    item: WorkItem
    body: dict[str, Any]
    params: dict[str, Any]  # as stored with the completion
    tokens: int | None = None  # what a tpm limit may charge it (computed when a limit needs it)
    sends: int = 0  # requests sent (stored as attempts)
    failures: int = 0  # failed attempts (errors, timeouts, malformed); 429s are not
    busy: int = 0  # 429s waited out
    first_sent: float | None = None
    mark: tuple[int, float] | None = None  # what the limiter had sent up to its last request (see observe)
    reserved: float = 0.0  # USD held for its request in flight (--max-cost)
    streamed: list[int] = field(default_factory=lambda: [0])  # tokens already counted in the tracker


class _Gathered:
    """A chat reply put together from its stream chunks (choice 0; usage from the
    final chunk that stream_options.include_usage asks for)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] = {}
        self.chunks = 0  # content pieces: the token count when a server reports no usage
        self.seen = False

    def add(self, chunk: Any) -> int:
        """Take one chunk; returns how many content pieces it carried (0 or 1)."""
        if not isinstance(chunk, dict):
            raise MalformedResponse("a stream chunk is not a JSON object")
        self.seen = True
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        pieces = 0
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                self.parts.append(text)
                pieces += 1
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        self.chunks += pieces
        return pieces

    def reply(self) -> Reply:
        if not self.seen:
            raise MalformedResponse("the stream ended before any chunk")
        if self.finish_reason is None:
            raise MalformedResponse("the stream ended without a finish reason")

        def count(key: str) -> int | None:
            value = self.usage.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return Reply("".join(self.parts), self.finish_reason, self.model, count("prompt_tokens"),
                     count("completion_tokens"), self.chunks)


RESERVE_BYTES = 256 * 1024


def _keep_room(project: Path) -> Path | None:
    """A little room kept beside the project for the run's life: on a disk that fills
    up, freeing it lets the run's end and its cause still be written. None where it
    cannot be made (the disk is full already: the run will say so itself)."""
    reserve = project.with_name(project.name + ".run.reserve")
    try:
        with open(reserve, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
    except OSError:
        reserve.unlink(missing_ok=True)
        return None
    return reserve


async def run_generation(
    store_path: str | os.PathLike[str],
    options: GenerateOptions | None = None,
    on_progress: ProgressCallback | None = None,
    stop_event: asyncio.Event | None = None,
    *,
    run_id: int | None = None,
    backend: Backend | None = None,
) -> RunResult:
    """Generate every pending or failed completion of the project at ``store_path``.

    ``on_progress`` gets a Progress snapshot about every ``progress_interval_s``
    and once at the end; the same snapshot is saved in the run row so other
    processes can follow (``runs.watch``). Setting ``stop_event`` (or
    ``gridtune stop``) stops cleanly: in-flight requests are cancelled and their
    completions stay pending. ``run_id`` adopts a run recorded by
    ``runs.start_detached``. Raises GenerateError / BackendError / StoreError
    (RunConflict when another run is active) before anything runs.
    """
    options = options or GenerateOptions()
    stop_event = stop_event or asyncio.Event()
    with Store.open(Path(store_path)) as store:
        if run_id is None and (nothing := nothing_to_generate(store, options)):
            raise NothingToDo(nothing)
        plan = plan_run(store, options, backend)
        host, pid = socket.gethostname(), os.getpid()
        if run_id is None:
            run_id = store.start_run(pid=pid, host=host, model=plan.model, params=run_params(plan, options),
                                     is_alive=is_alive)
        elif not store.adopt_run(run_id, pid=pid, host=host):
            raise GenerateError(f"run #{run_id} is not waiting to start (it ended or was never recorded)")
        reserve = _keep_room(Path(store_path))
        runner: _Runner | None = None
        try:
            if options.top_up is not None:  # under the run lock: no other run adds samples meanwhile
                from ..curation.coverage import apply_top_up, plan_top_up

                top_up = plan_top_up(store, options.top_up, min_grade=options.min_grade)
                apply_top_up(store, top_up)
                log.info("run #%s: %s", run_id, top_up.summary())
            work = select_work(store, options)
            runner = _Runner(store, plan, options, run_id, work, stop_event, on_progress)
            state = await runner.run()
            if runner.lost is not None:
                raise runner.lost  # finish_run below leaves the run as the other process marked it
        except BaseException as exc:
            # Cancelled (the TUI closing) or interrupted: a stop. Anything else: a failed run.
            cancelled = isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt))
            state, error = ("stopped", None) if cancelled else ("failed", plan.backend.redact(describe(exc))[:500])
            progress = runner.snapshot(state) if runner else Progress(run_id=run_id, state=state)
            try:  # a full disk may refuse this too: the reserve makes room for the cause
                store.finish_run(run_id, state, error=error, progress=progress.to_dict())
            except sqlite3.Error as record_exc:
                if reserve is not None and sqlite_error_kind(record_exc) == "full":
                    reserve.unlink(missing_ok=True)
                    reserve = None
                    with contextlib.suppress(sqlite3.Error):
                        store.finish_run(run_id, state, error=error, progress=progress.to_dict())
                log.debug("run #%s: could not record its end: %s", run_id, record_exc)
            raise
        finally:
            if reserve is not None:
                reserve.unlink(missing_ok=True)
        final = runner.snapshot(state)
        if runner.budget_reached:
            final.stopped_by = f"stopped at max cost ${options.max_cost:g} (spent about ${runner.spent:.4f})"
        store.finish_run(run_id, state, progress=final.to_dict())
        runner.emit(final)
        return RunResult(run_id, state, final, stop_requested=runner.stop_requested,
                         budget_reached=runner.budget_reached,
                         spent=runner.spent if options.max_cost is not None else None)


# -- curation helpers for the review screen (issue 9) --------------------------------


def redo_options(completion_ids: list[int] | None, max_tokens: int | None, **kw: Any) -> GenerateOptions:
    """Options that regenerate ``completion_ids`` (None: every cut-off completion)
    with ``max_tokens``; for ``run_generation`` or ``runs.start_detached``."""
    if completion_ids is None:
        return GenerateOptions(redo_cut_off=True, max_tokens=max_tokens, **kw)
    return GenerateOptions(redo_ids=list(completion_ids), max_tokens=max_tokens, **kw)


async def redo_completion(store_path: str | os.PathLike[str], completion_id: int, *, max_tokens: int | None = None,
                          on_progress: ProgressCallback | None = None, stop_event: asyncio.Event | None = None,
                          backend: Backend | None = None) -> RunResult:
    """Regenerate one completion (any status) in this process, as a run of its own
    (so it is refused while another run is active): its old text stays until the
    new one is saved, and the new text withdraws the old one's grades. ``max_tokens``
    None: the spec's. Raises as ``run_generation`` does."""
    return await run_generation(store_path, redo_options([completion_id], max_tokens), on_progress, stop_event,
                                backend=backend)


def suggested_redo_max_tokens(store: Store) -> int:
    """A max_tokens to offer for a redo: twice the most any cut-off completion had
    (else twice the spec's max_tokens)."""
    most = 0
    for item in store.redo_items():
        record = store.get_completion(item.completion_id)
        used = (record.params or {}).get("max_tokens") if record else None
        if isinstance(used, int):
            most = max(most, used)
    if not most:
        try:
            most = load_project_spec(store).settings.max_tokens
        except ValueError:
            most = 256
    return 2 * most
