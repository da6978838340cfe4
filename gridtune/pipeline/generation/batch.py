"""Generation through a provider's Batch API (/v1/files + /v1/batches): half the price
of live requests, results within the provider's 24-hour window.

    result = await run_batch("p.gridtune", BatchOptions(GenerateOptions(model="gpt-4o-mini")))
    run_id = start_detached_batch("p.gridtune", options)     # the same, in the background

``run_batch`` writes the pending cells as batch input files (custom_id = the
completion id; body = the chat request the live runner sends, not streamed), split to
the provider's limits (``max_requests`` lines or ``max_bytes`` per file), uploads
them, creates the batches, and follows them to the end: as a batch ends, each line of
its output file is written into its cell exactly once, and each line of its error
file is recorded on its cell; the cells that failed (a transient error, or no line
at all) go into a new batch, up to ``max_attempts`` batches each.

Following is a generation *run* (the runs table: one at a time, detachable, stopped
by ``gridtune stop``, followed by ``status --watch`` and the TUI). The batches
themselves live in the project (store/batches.py) from before anything is uploaded,
so a follower killed at any point loses nothing: running it again picks up the
batches in progress instead of creating new ones (one created at the provider just
before the kill is found there by the tag in its metadata). ``--once`` (what
``gridtune status`` does) takes one look at the open batches and writes what has
arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import openai

from ...store import Store, WorkItem, batches as stored
from ...store.batches import BatchRecord
from ...store.runlock import is_alive
from ..client.backend import Backend
from ..client.replies import PERMANENT_STATUS, MalformedResponse, describe, parse_reply
from ..client.resolve import resolve_backend
from ..spec.grid import GridSpec
from ..spec.options import GENERATION
from .estimate import mean_prompt_tokens, work_to_do
from .generate import (
    GenerateError,
    GenerateOptions,
    NothingToDo,
    Plan,
    RunResult,
    cell_params,
    chat_request,
    nothing_to_generate,
    plan_run,
    run_params,
    select_work,
)
from .progress import Finished, Progress
from .runs import launch_detached

log = logging.getLogger(__name__)

MAX_REQUESTS = 50_000  # OpenAI's limits per batch input file
MAX_BYTES = 200 * 1024 * 1024
BATCH_PRICE = 0.5  # of the live price
ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
TAG_KEY = "gridtune_batch"  # the batch's metadata key holding its row's tag
POLL_S = {"local": 1.0, "compatible": 10.0, "openai": 30.0}  # how often a batch's status is asked for
BEAT_S = 0.5  # heartbeat (and stop check) interval while waiting
INGEST_CHUNK = 500  # results written per transaction
FIND_SCAN = 500  # batches listed at most when looking for one created before a crash

ProgressCallback = Callable[[Progress], Any]


@dataclass
class BatchOptions:
    """How to run a generation through the Batch API; ``generate`` holds the request's
    settings (model, temperature, max_tokens, limit, timeout) as for a live run."""

    generate: GenerateOptions = field(default_factory=GenerateOptions)
    max_requests: int = MAX_REQUESTS  # per input file
    max_bytes: int = MAX_BYTES  # per input file
    max_attempts: int = 3  # batches a cell's request goes into during one follow
    poll_s: float | None = None  # None: POLL_S of the backend
    once: bool = False  # one look at the open batches, nothing new created

    def check(self) -> None:
        self.generate.check()
        g = self.generate
        if g.redo or g.top_up is not None:
            raise GenerateError("--batch generates pending cells only; run a redo or a top-up without --batch")
        if self.max_requests < 1 or self.max_bytes < 1024:
            raise GenerateError("a batch file must allow at least 1 request and 1 KiB")
        GENERATION["max_attempts"].check(self.max_attempts, "--max-attempts", GenerateError)
        if self.poll_s is not None and self.poll_s <= 0:
            raise GenerateError("the poll interval must be positive")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BatchOptions:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["generate"] = GenerateOptions.from_json(json.dumps(values.get("generate") or {}))
        return cls(**values)


# -- the input file ----------------------------------------------------------------


def input_line(spec: GridSpec, model: str, params: dict[str, Any], item: WorkItem) -> bytes:
    """One line of a batch input file: custom_id = the completion id, body = the chat
    request the live runner sends (not streamed)."""
    body, _ = chat_request(spec, model, params, item)
    line = {"custom_id": str(item.completion_id), "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def split_lines(lines: list[bytes], max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES) -> list[range]:
    """Consecutive runs of ``lines`` that each fit one input file (the provider's limits)."""
    if any(len(line) > max_bytes for line in lines):
        raise GenerateError(f"one request is larger than a batch file may be ({max_bytes:,} bytes)")
    parts: list[range] = []
    start, size = 0, 0
    for i, line in enumerate(lines):
        if i > start and (i - start >= max_requests or size + len(line) > max_bytes):
            parts.append(range(start, i))
            start, size = i, 0
        size += len(line)
    if start < len(lines):
        parts.append(range(start, len(lines)))
    return parts


# -- the estimate --------------------------------------------------------------------


def batch_cost(model: str | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD for these tokens through the Batch API (half the live price); None if unknown."""
    from ..format.cost import generation_cost

    live = generation_cost(model, prompt_tokens, completion_tokens)
    return None if live is None else live * BATCH_PRICE


def estimate_text(store: Store, plan: Plan, options: BatchOptions) -> str:
    """What a batch run will send and cost, in one line (before it starts)."""
    requests = len(select_work(store, options.generate))
    max_tokens = plan.params["max_tokens"]
    mean = work_to_do(store)[1]
    completion = min(mean, max_tokens) if mean else max_tokens
    prompt = mean_prompt_tokens(plan.spec)
    files = max(1, -(-requests // options.max_requests))
    text = f"batch of {requests:,} request{'s' if requests != 1 else ''} to {plan.model}"
    text += f" in {files} file{'s' if files != 1 else ''}" if files > 1 else ""
    cost = batch_cost(plan.model, round(requests * prompt), round(requests * completion))
    if cost is None:
        return text + f" (no price known for {plan.model}); results within {WINDOW}"
    return (text + f"; about ${cost:.4f} at the batch price (half of ${cost / BATCH_PRICE:.4f} live), "
            f"results within {WINDOW}")


# -- following ---------------------------------------------------------------------


class _Follower:
    def __init__(self, store: Store, plan: Plan, options: BatchOptions, run_id: int, stop: asyncio.Event,
                 on_progress: ProgressCallback | None):
        self.store, self.plan, self.options, self.run_id = store, plan, options, run_id
        self.stop, self.on_progress = stop, on_progress
        self.client = plan.backend.async_client(timeout=options.generate.timeout_s, max_retries=4)
        self.poll_s = options.poll_s or POLL_S.get(plan.backend.kind, 30.0)
        self.failures: dict[int, int] = {}  # completion id -> batches it failed in, this follow
        self.permanent: set[int] = set()  # refused for good (400, 401, ...): not sent again
        self.total = self.done = self.failed = 0
        self.cost: float | None = None
        self.recent: list[Finished] = []
        self.phase: str | None = None
        self.started = time.monotonic()
        self.stop_requested = False
        self.counted: set[int] = set()  # batch rows whose requests are in total

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> str:
        if not self.options.once and not stored.open_batches(self.store):
            self.submit(select_work(self.store, self.options.generate))
        next_poll = 0.0
        while True:
            if self.beat():
                return "stopped"
            open_ = stored.open_batches(self.store)
            for b in open_:
                if b.id not in self.counted:
                    self.counted.add(b.id)
                    self.total += len(stored.sent_items(self.store, b.id)) if b.batch_id else b.requests
            if not open_:
                if self.options.once:
                    return "finished"
                retry = [w for w in self.store.pending_work() if w.completion_id in self.failures
                         and self.failures[w.completion_id] < self.options.max_attempts
                         and w.completion_id not in self.permanent]
                if not retry:
                    return "finished"
                self.submit(retry)
                continue
            if time.monotonic() >= next_poll:
                for b in open_:
                    if self.stop.is_set():
                        break
                    await self.advance(b)
                if self.options.once:
                    return "finished"
                next_poll = time.monotonic() + self.poll_s
                continue
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=min(BEAT_S, max(0.01, next_poll - time.monotonic())))
            except TimeoutError:
                pass

    def beat(self) -> bool:
        """Save progress in the run row, pass it on; True when a stop is asked for."""
        snapshot = self.snapshot()
        if self.store.heartbeat(self.run_id, snapshot.to_dict()):
            self.stop_requested = True
            self.stop.set()
        self.emit(snapshot)
        return self.stop.is_set()

    def snapshot(self, state: str | None = None) -> Progress:
        if state is None:
            state = "stopping" if self.stop.is_set() else "running"
        open_ = stored.open_batches(self.store)
        waiting = sum(stored.item_counts(self.store, b.id)["sent"] for b in open_)
        return Progress(run_id=self.run_id, state=state, total=max(self.total, self.done + self.failed + waiting),
                        done=self.done, failed=self.failed, in_flight=waiting, phase=self.phase,
                        cost_usd=self.cost, elapsed_s=time.monotonic() - self.started, model=self.plan.model,
                        recent=self.recent[-5:])

    def emit(self, snapshot: Progress) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(snapshot)
            except Exception:  # noqa: BLE001 - a display's bug must not stop the follow
                log.exception("batch run #%s: on_progress failed", self.run_id)

    # -- creating ---------------------------------------------------------------------
    def submit(self, work: list[WorkItem]) -> None:
        """Record the batches for ``work`` (split to the limits); advance() sends them."""
        if not work:
            return
        plan = self.plan
        lines = [input_line(plan.spec, plan.model, plan.params, item) for item in work]
        for part in split_lines(lines, self.options.max_requests, self.options.max_bytes):
            stored.record_batch(self.store, tag=secrets.token_hex(8), base_url=plan.backend.public_url,
                                model=plan.model, params=plan.params,
                                completion_ids=[work[i].completion_id for i in part])
        self.phase = f"{len(work):,} requests recorded for the batch API"

    async def advance(self, b: BatchRecord) -> None:
        """One step for one open batch: send it, or ask its status, or read its results."""
        try:
            if b.batch_id is None:
                await self.send(b)
                return
            remote = await self.client.batches.retrieve(b.batch_id)
        except openai.APIStatusError as exc:
            if exc.status_code not in PERMANENT_STATUS:
                self.phase = f"batch #{b.id}: {self.plan.backend.redact(describe(exc))} (asking again)"
                return
            error: str | None = self.plan.backend.redact(describe(exc))
            if b.batch_id is None:  # refused before it existed: the run cannot go on
                stored.forget_batch(self.store, b.id)
                raise GenerateError(f"the batch API refused the batch: {error}") from None
            stored.update_batch(self.store, b.id, status="failed", error=error)
            await self.ingest(stored.get_batch(self.store, b.id) or b, None, None)
            return
        except openai.APIConnectionError as exc:
            self.phase = f"batch #{b.id}: {describe(exc)} (asking again)"
            return
        counts = remote.request_counts.model_dump() if remote.request_counts else {}
        error = None
        if remote.errors and remote.errors.data:
            error = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "")
                              for e in remote.errors.data[:3])
        if remote.status != b.status or counts != b.counts or error != b.error:
            stored.update_batch(self.store, b.id, status=remote.status, counts=counts, error=error,
                                output_file_id=remote.output_file_id, error_file_id=remote.error_file_id)
        self.phase = (f"batch {remote.id} {remote.status} {counts.get('completed', 0) + counts.get('failed', 0):,}"
                      f"/{counts.get('total') or b.requests:,}")
        if remote.status in stored.ENDED:
            await self.ingest(b, remote.output_file_id, remote.error_file_id)

    async def send(self, b: BatchRecord) -> None:
        """Upload the batch's input file and create it at the provider, recording each id
        as it is known. A batch created before a crash is found by its tag, not made twice."""
        input_file_id = b.input_file_id
        if input_file_id is None:
            items = stored.sent_items(self.store, b.id)
            data = b"".join(input_line(self.plan.spec, b.model, b.params, item) for item in items.values())
            self.phase = f"uploading batch #{b.id} ({len(items):,} requests, {len(data):,} bytes)"
            uploaded = await self.client.files.create(file=(f"gridtune-{b.tag}.jsonl", data), purpose="batch")
            input_file_id = uploaded.id
            stored.update_batch(self.store, b.id, input_file_id=input_file_id)
        else:
            remote = await self.find(b)
            if remote is not None:
                stored.update_batch(self.store, b.id, batch_id=remote.id, status=remote.status)
                return
        created = await self.client.batches.create(input_file_id=input_file_id, endpoint=ENDPOINT,
                                                   completion_window=WINDOW, metadata={TAG_KEY: b.tag})
        stored.update_batch(self.store, b.id, batch_id=created.id, status=created.status)
        self.phase = f"batch {created.id} created ({b.requests:,} requests)"

    async def find(self, b: BatchRecord) -> Any:
        """The provider's batch carrying ``b``'s tag, if it was created before a crash."""
        seen = 0
        async for remote in self.client.batches.list(limit=100):
            if (remote.metadata or {}).get(TAG_KEY) == b.tag:
                return remote
            seen += 1
            if seen >= FIND_SCAN or remote.created_at < b.created_at - 3600:
                break
        return None

    # -- reading the results ---------------------------------------------------------------
    async def ingest(self, b: BatchRecord, output_file_id: str | None, error_file_id: str | None) -> None:
        """Write an ended batch's results into its cells, then close it. Each item is
        written once (a crash in between leaves the rest 'sent'; reading again skips
        what was written); an item with no line at all is recorded as failed."""
        sent = stored.sent_items(self.store, b.id)
        for file_id in (output_file_id, error_file_id):
            if not file_id or not sent:
                continue
            content = await self.client.files.content(file_id)
            lines = content.content.splitlines()
            for start in range(0, len(lines), INGEST_CHUNK):
                with self.store.transaction():
                    for raw in lines[start:start + INGEST_CHUNK]:
                        self.take(b, raw, sent)
        final = stored.get_batch(self.store, b.id) or b
        why = f"batch {b.batch_id or '#' + str(b.id)} ended {final.status} without a result for it"
        if final.error:
            why += f" ({final.error})"
        with self.store.transaction():
            for cid, item in list(sent.items()):
                if stored.save_item_failed(self.store, b.id, cid, state="missing", run_id=self.run_id,
                                           error=why[:500], error_kind="transient", attempts=item.attempts + 1,
                                           model=b.model, params=cell_params(b.params, item)):
                    self.note_failure(cid, why, permanent=False)
            stored.close_batch(self.store, b.id)
        self.phase = f"batch {b.batch_id} {final.status}: results written"

    def take(self, b: BatchRecord, raw: bytes, sent: dict[int, WorkItem]) -> None:
        try:
            line = json.loads(raw)
            cid = int(line["custom_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("batch %s: a result line without a usable custom_id: %.100r", b.batch_id, raw)
            return
        item = sent.pop(cid, None)
        if item is None:  # not this batch's, or written already
            return
        params = cell_params(b.params, item)
        response = line.get("response") if isinstance(line.get("response"), dict) else {}
        status = response.get("status_code")
        body = response.get("body")
        if status == 200:
            try:
                reply = parse_reply(json.dumps(body))
            except MalformedResponse as exc:
                self.fail(b, item, params, f"malformed response: {exc}", permanent=False)
                return
            if stored.save_item_done(self.store, b.id, cid, run_id=self.run_id, text=reply.text,
                                     model=reply.model or b.model, params=params,
                                     prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                                     latency_s=None, finish_reason=reply.finish_reason,
                                     attempts=item.attempts + 1):
                self.done += 1
                if reply.prompt_tokens is not None and reply.completion_tokens is not None:
                    cost = batch_cost(reply.model or b.model, reply.prompt_tokens, reply.completion_tokens)
                    if cost is not None:
                        self.cost = (self.cost or 0.0) + cost
                self.recent.append(Finished(cid, "done", " ".join(reply.text.split())[:80]))
            return
        error = line.get("error") if isinstance(line.get("error"), dict) else None
        if error is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
        message = " ".join(str((error or {}).get("message") or "no message").split())[:300]
        code = f" [{error['code']}]" if error and error.get("code") else ""
        what = f"HTTP {status}{code}: {message}" if status else f"{(error or {}).get('code') or 'error'}: {message}"
        self.fail(b, item, params, f"batch {b.batch_id}: {self.plan.backend.redact(what)}",
                  permanent=isinstance(status, int) and status in PERMANENT_STATUS)

    def fail(self, b: BatchRecord, item: WorkItem, params: dict[str, Any], error: str, *, permanent: bool) -> None:
        if stored.save_item_failed(self.store, b.id, item.completion_id, run_id=self.run_id, error=error,
                                   error_kind="permanent" if permanent else "transient",
                                   attempts=item.attempts + 1, model=b.model, params=params):
            self.note_failure(item.completion_id, error, permanent=permanent)

    def note_failure(self, cid: int, error: str, *, permanent: bool) -> None:
        self.failures[cid] = self.failures.get(cid, 0) + 1
        if permanent:
            self.permanent.add(cid)
        retried = not permanent and self.failures[cid] < self.options.max_attempts and not self.options.once
        if not retried:
            self.failed += 1
        self.recent.append(Finished(cid, "failed", ("retrying: " if retried else "") + error[:80]))


# -- the run -------------------------------------------------------------------------------


def open_batch_note(store: Store) -> str | None:
    """Why a live run should not start now: a batch is generating cells (None: none is)."""
    open_ = stored.open_batches(store)
    if not open_:
        return None
    waiting = len(stored.in_open_batches(store))
    ids = ", ".join(b.batch_id or f"#{b.id}" for b in open_[:3])
    return (f"batch {ids} is in progress for {waiting:,} completion(s); follow it with "
            f"`gridtune generate {store.path} --batch` (a live run would pay for them twice)")


async def run_batch(
    store_path: str | os.PathLike[str],
    options: BatchOptions | None = None,
    on_progress: ProgressCallback | None = None,
    stop_event: asyncio.Event | None = None,
    *,
    run_id: int | None = None,
    backend: Backend | None = None,
) -> RunResult:
    """Generate the pending cells of a project through the Batch API, or follow the
    batches already in progress, until every batch has ended and its results are in
    the cells. A run like ``generate.run_generation``: same errors before it starts
    (NothingToDo, RunConflict, ...), same RunResult."""
    options = options or BatchOptions()
    options.check()
    stop_event = stop_event or asyncio.Event()
    with Store.open(Path(store_path)) as store:
        in_progress = bool(stored.open_batches(store))
        if options.once and not in_progress:
            raise NothingToDo("no batch in progress")
        if run_id is None and not in_progress and (nothing := nothing_to_generate(store, options.generate)):
            raise NothingToDo(nothing)
        plan = plan_run(store, options.generate, backend)
        params = {**run_params(plan, options.generate), "batch": True}
        host, pid = socket.gethostname(), os.getpid()
        if run_id is None:
            run_id = store.start_run(pid=pid, host=host, model=plan.model, params=params, is_alive=is_alive)
        elif not store.adopt_run(run_id, pid=pid, host=host):
            raise GenerateError(f"run #{run_id} is not waiting to start (it ended or was never recorded)")
        follower = _Follower(store, plan, options, run_id, stop_event, on_progress)
        try:
            state = await follower.run()
        except BaseException as exc:
            cancelled = isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt))
            state, error = ("stopped", None) if cancelled else ("failed", plan.backend.redact(describe(exc))[:500])
            store.finish_run(run_id, state, error=error, progress=follower.snapshot(state).to_dict())
            raise
        finally:
            await follower.client.close()
        final = follower.snapshot(state)
        store.finish_run(run_id, state, progress=final.to_dict())
        follower.emit(final)
        return RunResult(run_id, state, final, stop_requested=follower.stop_requested)


def start_detached_batch(project: str | os.PathLike[str], options: BatchOptions) -> int:
    """``run_batch`` in its own session (immune to the terminal closing), as
    ``runs.start_detached`` does for a live run; returns the run id once adopted."""

    options.check()
    project = Path(project).resolve()
    with Store.open(project) as store:
        if not stored.open_batches(store) and (nothing := nothing_to_generate(store, options.generate)):
            raise NothingToDo(nothing)
        plan = plan_run(store, options.generate)
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model=plan.model,
                                 params={**run_params(plan, options.generate), "batch": True},
                                 is_alive=is_alive, state="starting")
        return launch_detached(store, project, run_id, ["_batch", "--options", options.to_json()], what="batch run")


def sync_open_batches(store_path: str | os.PathLike[str]) -> str | None:
    """What `gridtune status` does for a batch nobody follows: one look at the open
    batches, their finished results written. Returns a note when it could not look
    (the backend is not reachable, another process follows them); None otherwise."""
    from ...store import RunConflict
    from ..client.backend import BackendError

    with Store.open(Path(store_path)) as store:
        if not stored.open_batches(store):
            return None
    try:
        backend = resolve_backend(start_local=False)
    except BackendError as exc:
        return f"batches not checked: {exc}"
    try:
        asyncio.run(run_batch(store_path, BatchOptions(once=True), backend=backend))
    except RunConflict:
        return None  # a follower (or a live run) is at it
    except (GenerateError, openai.OpenAIError) as exc:
        return f"batches not checked: {backend.redact(str(exc))}"
    return None
