"""The Batch API (/v1/batches) of the local server: a batch's requests run through the
server's own engine in the background, and its results become an output file and an
error file in /v1/files, in OpenAI's shapes.

Each batch lives in DATA/batches/:

* ``<id>.json``       the OpenAI batch object (status, request_counts, file ids, ...),
* ``<id>.out.jsonl``  the results of the requests answered 200, appended as each ends,
* ``<id>.err.jsonl``  the others (a refused request, or one a cancel left unrun).

A line of either file is ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``. On finalizing, the two become files (purpose
"batch_output") and the batch is completed. A server that stops mid-batch resumes it
at its next start: requests whose line is already written are not run again.

Statuses: validating -> in_progress -> finalizing -> completed; failed (the input file
is not a valid batch); cancelling -> cancelled (the results so far are kept).

How one request runs is the app's business (``run_request``: the same checks, queue
and engine as /v1/chat/completions); here only the batch's bookkeeping. At most
``concurrency()`` requests of all batches run at once, so live requests keep a place.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gridtune.core.files import private_dir, write_json

from .errors import APIError, invalid, not_found
from .files import FileStore

log = logging.getLogger("gridtune.server")

ENDPOINTS = ("/v1/chat/completions",)
WINDOWS = ("24h",)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_REQUESTS = 50_000  # per batch, as OpenAI
MAX_METADATA = 16

RunRequest = Callable[[dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]
"""One request body -> (HTTP status, response body): what the app runs for a line."""

Fault = Callable[[str], "tuple[int, dict[str, Any]] | None"]
"""A test hook: custom_id -> a response to give instead of running it (None: run it)."""


def _now() -> int:
    return int(time.time())


def _line_error(line_no: int, message: str, code: str = "invalid_request") -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line_no}


def parse_input(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The requests of a batch input file and the problems that make it invalid
    (each with its 1-based line), as OpenAI's validation reports them."""
    requests: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(_line_error(n, "this line is not valid JSON", "invalid_json_line"))
            continue
        if not isinstance(line, dict):
            errors.append(_line_error(n, "each line must be a JSON object", "invalid_json_line"))
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(_line_error(n, "custom_id must be a non-empty string", "missing_required_parameter"))
        elif custom_id in seen:
            errors.append(_line_error(n, f"the custom_id {custom_id!r} is used more than once",
                                      "duplicate_custom_id"))
        if line.get("method") != "POST":
            errors.append(_line_error(n, "method must be POST", "invalid_method"))
        if line.get("url") not in ENDPOINTS:
            errors.append(_line_error(n, f"url must be one of {', '.join(ENDPOINTS)}", "invalid_url"))
        if not isinstance(line.get("body"), dict):
            errors.append(_line_error(n, "body must be an object", "missing_required_parameter"))
        if isinstance(custom_id, str):
            seen.add(custom_id)
        requests.append(line)
        if len(errors) >= 100:
            break
    if not requests and not errors:
        errors.append(_line_error(1, "the input file has no requests", "empty_file"))
    if len(requests) > MAX_REQUESTS:
        errors.append(_line_error(MAX_REQUESTS + 1, f"a batch may hold at most {MAX_REQUESTS:,} requests",
                                  "too_many_requests"))
    return requests, errors


class BatchManager:
    def __init__(self, data_dir: Path, files: FileStore, run_request: RunRequest, *,
                 concurrency: Callable[[], int]):
        self.root = Path(data_dir) / "batches"
        self.files = files
        self.run_request = run_request
        self.concurrency = concurrency
        self.fault: Fault | None = None  # tests only: make chosen requests fail
        self._batches: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots: asyncio.Semaphore | None = None

    # -- persistence ------------------------------------------------------------
    def _path(self, batch_id: str, suffix: str) -> Path:
        return self.root / f"{batch_id}{suffix}"

    def _save(self, batch: dict[str, Any]) -> None:
        write_json(self._path(batch["id"], ".json"), batch)

    def load(self) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.glob("batch_*.json"):
            try:
                batch = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("skipping unreadable batch record %s", path)
                continue
            self._batches[batch["id"]] = batch

    async def start(self) -> None:
        self.load()
        self._slots = asyncio.Semaphore(max(1, self.concurrency()))
        for batch in self._batches.values():
            if batch["status"] in ACTIVE:  # the server stopped under it: go on where it was
                log.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self._spawn(batch)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def active(self) -> bool:
        return any(b["status"] in ACTIVE for b in self._batches.values())

    def file_refs(self) -> dict[str, bool]:
        """Files batches name: True while the batch runs (never deleted to make room)."""
        refs: dict[str, bool] = {}
        for b in self._batches.values():
            for key in ("input_file_id", "output_file_id", "error_file_id"):
                if b.get(key):
                    refs[b[key]] = refs.get(b[key], False) or b["status"] in ACTIVE
        return refs

    # -- the API ---------------------------------------------------------------------
    @staticmethod
    def public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k != "local"}

    def get(self, batch_id: str) -> dict[str, Any]:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise not_found(f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def list(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        ordered = sorted(self._batches.values(), key=lambda b: (b["created_at"], b["local"]["created_ns"]),
                         reverse=True)
        if after:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        return [self.public(b) for b in ordered[:limit]], len(ordered) > limit

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise invalid("you must provide an input_file_id", param="input_file_id")
        meta = self.files.get(input_file_id)
        if meta.get("purpose") != "batch":
            raise invalid(f"the file {input_file_id} has purpose {meta.get('purpose')!r}; a batch's input file "
                          "must be uploaded with purpose 'batch'", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)} on this server", param="endpoint")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise invalid("completion_window must be '24h'", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > MAX_METADATA or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            raise invalid(f"metadata must be at most {MAX_METADATA} string pairs (keys up to 64 characters, "
                          "values up to 512)", param="metadata")
        private_dir(self.root)
        now = _now()
        batch = {
            "id": "batch_" + secrets.token_hex(12), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
            "local": {"created_ns": time.monotonic_ns()},
        }
        self._batches[batch["id"]] = batch
        self._save(batch)
        self._spawn(batch)
        return self.public(batch)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.get(batch_id)
        if batch["status"] in TERMINAL or batch["status"] == "cancelling":
            if batch["status"] not in ("cancelled", "cancelling"):
                raise APIError(409, f"Cannot cancel a batch with status '{batch['status']}'.", param="batch_id")
            return self.public(batch)
        batch["status"] = "cancelling"
        batch["cancelling_at"] = _now()
        self._save(batch)
        task = self._tasks.get(batch_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if batch["status"] == "cancelling":  # no task was running it (or it ended first): finish here
            await self._finalize(batch, "cancelled")
        return self.public(batch)

    # -- running -------------------------------------------------------------------
    def _spawn(self, batch: dict[str, Any]) -> None:
        task = asyncio.create_task(self._run(batch))
        self._tasks[batch["id"]] = task
        task.add_done_callback(lambda _t, bid=batch["id"]: self._tasks.pop(bid, None))

    def _written(self, batch_id: str) -> dict[str, int]:
        """custom_id -> status code of the lines already written (a resumed batch skips them)."""
        out: dict[str, int] = {}
        for suffix in (".out.jsonl", ".err.jsonl"):
            path = self._path(batch_id, suffix)
            if not path.is_file():
                continue
            for raw in path.read_bytes().splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:  # a line cut off by a crash: its request runs again
                    continue
                response = line.get("response") or {}
                out[line["custom_id"]] = int(response.get("status_code") or 0)
        return out

    def _append(self, batch_id: str, suffix: str, line: dict[str, Any]) -> None:
        fd = os.open(self._path(batch_id, suffix), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    async def _run(self, batch: dict[str, Any]) -> None:
        batch_id = batch["id"]
        try:
            if batch["status"] == "cancelling":
                await self._finalize(batch, "cancelled")
                return
            data = await asyncio.to_thread(self.files.path(batch["input_file_id"]).read_bytes)
            requests, errors = parse_input(data)
            if errors:
                batch.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
                self._save(batch)
                return
            written = self._written(batch_id)
            counts = batch["request_counts"]
            counts["total"] = len(requests)
            counts["completed"] = sum(1 for code in written.values() if code == 200)
            counts["failed"] = len(written) - counts["completed"]
            if batch["status"] == "validating":
                batch.update(status="in_progress", in_progress_at=_now())
            self._save(batch)
            todo = [r for r in requests if r["custom_id"] not in written]
            if todo:
                await asyncio.gather(*(self._one(batch, r) for r in todo))
            await self._finalize(batch, "completed")
        except asyncio.CancelledError:
            if batch["status"] == "cancelling":
                await self._finalize(batch, "cancelled")
            raise  # a server shutting down: the batch stays in progress and resumes at the next start
        except Exception as exc:  # noqa: BLE001 - a batch fails, the server goes on
            log.exception("batch %s failed", batch_id)
            batch.update(status="failed", failed_at=_now(), errors={"object": "list", "data": [
                {"code": "server_error", "message": f"{type(exc).__name__}: {exc}", "param": None, "line": None}]})
            self._save(batch)

    async def _one(self, batch: dict[str, Any], request: dict[str, Any]) -> None:
        assert self._slots is not None
        custom_id = request["custom_id"]
        async with self._slots:
            injected = self.fault(custom_id) if self.fault else None
            try:
                status, body = injected if injected is not None else await self.run_request(request["body"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad request is one error line
                status, body = 500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                               "param": None, "code": None}}
        line = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
                "response": {"status_code": status, "request_id": "req_" + secrets.token_hex(12), "body": body},
                "error": None}
        self._append(batch["id"], ".out.jsonl" if status == 200 else ".err.jsonl", line)
        batch["request_counts"]["completed" if status == 200 else "failed"] += 1
        self._save(batch)

    async def _finalize(self, batch: dict[str, Any], status: str) -> None:
        """Turn the written lines into the batch's files, and end it with ``status``. A
        cancelled batch's unrun requests get an error line each (batch_cancelled)."""
        batch_id = batch["id"]
        batch.update(status="finalizing" if status == "completed" else batch["status"], finalizing_at=_now())
        self._save(batch)
        if status == "cancelled":
            try:
                requests, _errors = parse_input(self.files.path(batch["input_file_id"]).read_bytes())
            except APIError:
                requests = []
            written = self._written(batch_id)
            for r in requests:
                cid = r.get("custom_id")
                if isinstance(cid, str) and cid not in written:
                    self._append(batch_id, ".err.jsonl", {
                        "id": "batch_req_" + secrets.token_hex(12), "custom_id": cid, "response": None,
                        "error": {"code": "batch_cancelled", "message": "the batch was cancelled before this "
                                  "request ran"}})
        for suffix, key in ((".out.jsonl", "output_file_id"), (".err.jsonl", "error_file_id")):
            path = self._path(batch_id, suffix)
            if path.is_file() and path.stat().st_size and not batch.get(key):
                meta = await asyncio.to_thread(self.files.create, io.BytesIO(path.read_bytes()),
                                               filename=f"{batch_id}_{key.split('_')[0]}.jsonl",
                                               purpose="batch_output", output=True)
                batch[key] = meta["id"]
        batch.update(status=status, **{f"{status}_at": _now()})
        self._save(batch)
