"""Fine-tuning jobs: a persistent queue, one training worker process at a time.

Each job lives in DATA/jobs/<id>/:

* ``job.json``    what the worker reads (the train_worker contract),
* ``state.json``  the OpenAI-shaped job object plus this server's private notes,
* ``events.jsonl`` events, appended by the worker while it runs and by the server
  before and after (never both at once),
* ``checkpoints/epoch-N/``, ``result/``, ``status.json``, ``worker.log`` from the worker.

Statuses: validating_files -> queued -> running -> succeeded | failed | cancelled.
The worker is ``python -m gridtune.server.train_worker JOB_DIR [--resume]``; cancel is
SIGTERM; a server that stops interrupts its worker with SIGINT (no "cancelled" event).
On start-up a job that was running when the server died is resumed from its
last checkpoint, or restarted when it had none; it is never left "running".
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridtune.core.files import private_dir, write_json
from gridtune.core.hyperparams import default_epochs

from .errors import APIError, invalid, not_found
from .files import FileStore

CHECKPOINT_STATE = "state.json"  # train.py's name for a checkpoint's state file

log = logging.getLogger("gridtune.server")

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
DEFAULT_LR_MULTIPLIER = 1.0
CANCEL_GRACE_S = 20.0


def _now() -> int:
    return int(time.time())


def _order(job: dict[str, Any]) -> tuple:
    """Creation order: created_at has whole seconds, so break ties by the creation clock."""
    return job["created_at"], job.get("local", {}).get("created_ns", 0), job["id"]


def fine_tuned_model_id(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:local:{suffix or ''}:{job_id}"


def _resolve_hparams(raw: dict[str, Any], n_examples: int) -> dict[str, Any]:
    """Concrete values for "auto" (or missing) hyperparameters: the trainer's own rules."""
    from .train import default_batch_size

    epochs = raw.get("n_epochs", "auto")
    batch = raw.get("batch_size", "auto")
    lr = raw.get("learning_rate_multiplier", "auto")
    return {
        "n_epochs": default_epochs(n_examples) if epochs in (None, "auto") else int(epochs),
        "batch_size": (default_batch_size(n_examples) if batch in (None, "auto")
                       else min(int(batch), max(1, n_examples))),
        "learning_rate_multiplier": DEFAULT_LR_MULTIPLIER if lr in (None, "auto") else float(lr),
    }


def _check_hparams(h: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(h, dict):
        raise invalid(f"{where} must be an object", param=where)
    out: dict[str, Any] = {}
    for key, kind, low, high in (("n_epochs", int, 1, 50), ("batch_size", int, 1, 256),
                                 ("learning_rate_multiplier", float, 1e-6, 100.0)):
        value = h.get(key, "auto")
        if value in (None, "auto"):
            out[key] = "auto"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise invalid(f"{where}.{key} must be 'auto' or a {'whole ' if kind is int else ''}number",
                          param=f"{where}.{key}")
        if not low <= value <= high:
            raise invalid(f"{where}.{key} must be between {low:g} and {high:g}", param=f"{where}.{key}")
        out[key] = kind(value)
    unknown = set(h) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise invalid(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}", param=where)
    return out


class JobManager:
    def __init__(self, data_dir: Path, files: FileStore, *, base_model_id: str, base_model_source: str | None,
                 on_model: Callable[[str, Path], None], worker_cmd: list[str] | None = None):
        self.root = Path(data_dir) / "jobs"
        self.files = files
        self.base_model_id = base_model_id
        self.base_model_source = base_model_source
        self.on_model = on_model
        self.worker_cmd = worker_cmd or [sys.executable, "-m", "gridtune.server.train_worker"]
        self._jobs: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._running_id: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- persistence ------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: dict[str, Any]) -> None:
        write_json(self._dir(job["id"]) / "state.json", job)

    def _event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
               data: Any = None) -> None:
        event = {"id": "ftevent-" + secrets.token_hex(12), "object": "fine_tuning.job.event",
                 "created_at": _now(), "level": level, "message": message, "type": type, "data": data}
        fd = os.open(self._dir(job_id) / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def _set(self, job: dict[str, Any], status: str, *, message: str | None = None, level: str = "info",
             error: dict[str, Any] | None = None) -> None:
        job["status"] = status
        if status in TERMINAL:
            job["finished_at"] = _now()
        if error is not None:
            job["error"] = error
        self._save(job)
        if message:
            self._event(job["id"], message, level=level)

    def _fail(self, job: dict[str, Any], message: str, code: str = "job_failed", *, event: bool = True) -> None:
        self._set(job, "failed", message=f"Fine-tuning job failed: {message}" if event else None, level="error",
                  error={"code": code, "message": message, "param": None})

    def load(self) -> None:
        """Read every job back from disk; a job caught mid-run is queued to resume."""
        if not self.root.is_dir():
            return
        for state in sorted(self.root.glob("*/state.json")):
            try:
                job = json.loads(state.read_text())
            except (OSError, ValueError):
                log.warning("skipping unreadable job state %s", state)
                continue
            self._jobs[job["id"]] = job
            local = job.setdefault("local", {})
            if job["status"] == "running":
                self._stop_orphan(job)
                ckpts = self._checkpoint_dirs(job["id"])
                local["resume"] = True  # the worker starts over when there is no checkpoint
                job["status"] = "queued"
                self._save(job)
                then = f"resume from checkpoint {ckpts[-1].name}" if ckpts else "start again (no checkpoint yet)"
                self._event(job["id"], f"The server restarted while the job was running; it will {then}",
                            level="warn")
            elif job["status"] == "succeeded":
                self._register(job)

    def _stop_orphan(self, job: dict[str, Any]) -> None:
        """A worker left behind by a server that was killed: stop it before resuming."""
        pid = job.get("local", {}).get("worker_pid")
        if not pid:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return
        if "train_worker" not in cmdline or job["id"] not in cmdline:
            return
        try:
            os.kill(pid, signal.SIGINT)
            for _ in range(int(CANCEL_GRACE_S * 10)):
                time.sleep(0.1)
                if not Path(f"/proc/{pid}").exists():
                    break
                try:  # a zombie is gone for our purposes
                    if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                        break
                except (OSError, IndexError):
                    break
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _register(self, job: dict[str, Any]) -> None:
        result = job.get("local", {}).get("result_dir")
        if job.get("fine_tuned_model") and result and Path(result).exists() \
                and job["local"].get("base_model_id") == self.base_model_id:
            try:
                self.on_model(job["fine_tuned_model"], Path(result))
            except Exception as exc:  # noqa: BLE001 - one bad result must not stop the server
                log.warning("cannot serve %s: %s", job["fine_tuned_model"], exc)

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        self.load()
        for job in self._jobs.values():
            if job["status"] == "validating_files":
                self._spawn(self._validate(job))
        self._runner = asyncio.create_task(self._run_queue())
        self._wake.set()

    async def close(self) -> None:
        """Stop the runner; a running worker is stopped and its job resumes at the next start."""
        self._closing = True
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.send_signal(signal.SIGINT)  # an interruption: the job resumes at the next start
                await asyncio.wait_for(self._proc.wait(), CANCEL_GRACE_S)
            except (TimeoutError, ProcessLookupError):
                try:
                    self._proc.kill()
                except ProcessLookupError:
                    pass
        for task in [self._runner, *self._tasks]:
            if task is not None:
                task.cancel()

    @property
    def active(self) -> bool:
        return any(j["status"] in ACTIVE for j in self._jobs.values())

    def file_refs(self) -> dict[str, bool]:
        """Every file id a job names -> whether a job that is not finished needs it."""
        refs: dict[str, bool] = {}
        for job in list(self._jobs.values()):
            for key in ("training_file", "validation_file"):
                file_id = job.get(key)
                if file_id:
                    refs[file_id] = refs.get(file_id, False) or job["status"] in ACTIVE
        return refs

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- API ----------------------------------------------------------------------
    def public(self, job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k != "local"}

    def get(self, job_id: str) -> dict[str, Any]:
        job = self._jobs.get(job_id)
        if job is None:
            raise not_found(f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id")
        return job

    def job_for_model(self, model_id: str) -> dict[str, Any]:
        for job in self._jobs.values():
            if job.get("fine_tuned_model") == model_id and job["status"] == "succeeded":
                return job
        raise not_found(f"no fine-tuned model {model_id} on this server", param="model", code="model_not_found")

    def list(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        jobs = sorted(self._jobs.values(), key=_order, reverse=True)
        if after:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return [self.public(j) for j in jobs[:limit]], len(jobs) > limit

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("you must provide a model parameter", param="model")
        if model != self.base_model_id:
            raise invalid(f"model {model!r} cannot be fine-tuned on this server; it serves {self.base_model_id!r} "
                          f"(to tune {model}, stop it and run `gridtune serve --model {model}`, or set "
                          f"GRIDTUNE_LOCAL_MODEL={model} for the server gridtune starts)",
                          param="model", code="model_not_available")
        training = body.get("training_file")
        if not isinstance(training, str) or not training:
            raise invalid("you must provide a training_file parameter", param="training_file")
        self._check_file(training, "training_file")
        validation = body.get("validation_file")
        if validation is not None:
            if not isinstance(validation, str):
                raise invalid("validation_file must be a file id", param="validation_file")
            self._check_file(validation, "validation_file")
        suffix = body.get("suffix")
        if suffix is not None:
            if not isinstance(suffix, str) or len(suffix) > 64 or any(c in suffix for c in ":/ \t\n"):
                raise invalid("suffix must be a string of at most 64 characters without ':', '/' or spaces",
                              param="suffix")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise invalid("seed must be an integer", param="seed")
        method_in = body.get("method")
        method_type = "supervised"
        variant = "lora"
        if method_in is not None:
            if not isinstance(method_in, dict):
                raise invalid("method must be an object", param="method")
            method_type = method_in.get("type", "supervised")
            if method_type != "supervised":
                raise invalid(f"method type {method_type!r} is not supported here; use 'supervised'",
                              param="method.type")
            sup = method_in.get("supervised") or {}
            hparams = _check_hparams(sup.get("hyperparameters") or {}, "method.supervised.hyperparameters")
            variant = (sup.get("local") or {}).get("variant", "lora") if isinstance(sup.get("local"), dict) else "lora"
        else:
            hparams = _check_hparams(body.get("hyperparameters") or {}, "hyperparameters")
        if variant not in ("lora", "full"):
            raise invalid("method.supervised.local.variant must be 'lora' or 'full'", param="method")
        job_id = "ftjob-" + secrets.token_hex(12)
        job = {
            "id": job_id, "object": "fine_tuning.job", "created_at": _now(), "error": None,
            "fine_tuned_model": None, "finished_at": None, "hyperparameters": hparams,
            "model": model, "organization_id": "local", "result_files": [], "seed": seed,
            "status": "validating_files", "trained_tokens": None, "training_file": training,
            "validation_file": validation, "estimated_finish": None, "integrations": [],
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": dict(hparams)}},
            "user_provided_suffix": suffix,
            "local": {"variant": variant, "base_model_id": self.base_model_id, "suffix": suffix,
                      "created_ns": time.time_ns()},
        }
        private_dir(self._dir(job_id))
        self._jobs[job_id] = job
        self._save(job)
        self._event(job_id, f"Created fine-tuning job: {job_id}")
        self._spawn(self._validate(job))
        return self.public(job)

    def _check_file(self, file_id: str, param: str) -> None:
        try:
            meta = self.files.get(file_id)
        except APIError:
            raise invalid(f"invalid {param}: no such file {file_id}", param=param, code="invalid_file_id") from None
        if meta.get("purpose") != "fine-tune":
            raise invalid(f"invalid {param}: file {file_id} has purpose {meta.get('purpose')!r}, not 'fine-tune'",
                          param=param)

    async def _validate(self, job: dict[str, Any]) -> None:
        from gridtune.pipeline.format.validate import ValidationInputError, validate_file

        job_dir = self._dir(job["id"])
        self._event(job["id"], "Validating training file: " + job["training_file"])
        n_examples = 0
        for key in ("training_file", "validation_file"):
            file_id = job.get(key)
            if not file_id:
                continue
            try:
                path = self.files.path(file_id)
                report = await asyncio.to_thread(validate_file, path)
            except (APIError, ValidationInputError) as exc:
                self._fail(job, f"{key} {file_id}: {exc}", "invalid_" + key)
                return
            if job["status"] == "cancelled":
                return
            if not report.ok:
                parts = []
                for kind, count in sorted(report.errors.items()):
                    lines = report.error_lines.get(kind) or []
                    where = f" (line {', '.join(map(str, lines[:5]))})" if lines else ""
                    parts.append(f"{kind}: {count}{where}")
                self._fail(job, f"{key} {file_id} has {sum(report.errors.values())} error(s): " + "; ".join(parts),
                           "invalid_" + key)
                return
            if key == "training_file":
                n_examples = report.n_examples
                job["local"]["data"] = await asyncio.to_thread(training_profile, path)
        if job["status"] == "cancelled":
            return
        hparams = _resolve_hparams(job["hyperparameters"], n_examples)
        job["hyperparameters"] = hparams
        job["method"]["supervised"]["hyperparameters"] = dict(hparams)
        local = job["local"]
        worker_job = {
            "id": job["id"], "base_model": self.base_model_source,
            "training_file": str(self.files.path(job["training_file"])),
            "validation_file": str(self.files.path(job["validation_file"])) if job.get("validation_file") else None,
            "method": local["variant"], "hyperparameters": hparams, "seed": job["seed"],
            "suffix": local.get("suffix"),
        }
        write_json(job_dir / "job.json", worker_job)
        self._set(job, "queued", message=f"Files validated ({n_examples} training examples); job queued")
        self._wake.set()

    def profile(self, job: dict[str, Any]) -> dict[str, Any]:
        """How the job's model was trained to be prompted (see training_profile); read from the
        training file when the job predates the record, chat when that file is gone."""
        if job["local"].get("data"):
            return job["local"]["data"]
        try:
            return training_profile(self.files.path(job["training_file"]))
        except (APIError, OSError):
            return {"format": "chat"}

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, like OpenAI; ``after`` is the last id of the previous page (older ones follow)."""
        self.get(job_id)
        path = self._dir(job_id) / "events.jsonl"
        events: list[dict[str, Any]] = []
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue  # a line still being written
                    event.setdefault("object", "fine_tuning.job.event")
                    event.setdefault("level", "info")
                    event.setdefault("type", "message")
                    event.setdefault("data", None)
                    events.append(event)
        events.reverse()
        if after:
            ids = [e["id"] for e in events]
            events = events[ids.index(after) + 1:] if after in ids else []
        return events[:limit], len(events) > limit

    def _checkpoint_dirs(self, job_id: str) -> list[Path]:
        root = self._dir(job_id) / "checkpoints"
        if not root.is_dir():
            return []

        def epoch(p: Path) -> int:
            try:
                return int(p.name.split("-")[-1])
            except ValueError:
                return -1

        return sorted((p for p in root.iterdir() if p.is_dir() and epoch(p) >= 0), key=epoch)

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        job = self.get(job_id)
        out = []
        for ckpt in self._checkpoint_dirs(job_id):
            metrics: dict[str, Any] = {}
            step = 0
            meta = ckpt / CHECKPOINT_STATE
            if meta.is_file():
                try:
                    metrics = json.loads(meta.read_text())
                    step = int(metrics.get("step", 0))
                except (OSError, ValueError):
                    metrics = {}
            out.append({
                "id": f"ftckpt-{job_id[6:]}-{ckpt.name}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(ckpt.stat().st_mtime),
                "fine_tuned_model_checkpoint": fine_tuned_model_id(self.base_model_id, job["local"].get("suffix"),
                                                                   job_id) + f":ckpt-{ckpt.name}",
                "fine_tuning_job_id": job_id,
                "metrics": {k: metrics.get(k) for k in ("step", "train_loss", "valid_loss", "full_valid_loss",
                                                         "train_mean_token_accuracy", "valid_mean_token_accuracy",
                                                         "full_valid_mean_token_accuracy")},
                "step_number": step,
            })
        out.reverse()
        if after:
            ids = [c["id"] for c in out]
            out = out[ids.index(after) + 1:] if after in ids else []
        return out[:limit], len(out) > limit

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise invalid(f"Job {job_id} has already {job['status']}; it cannot be cancelled",
                          param="fine_tuning_job_id", code="job_not_cancellable")
        job["local"]["cancel_requested"] = True
        if job["status"] == "running" and self._running_id == job_id and self._proc is not None:
            self._save(job)
            try:
                self._proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:  # answer once it has stopped (within seconds), so the caller sees "cancelled"
                await asyncio.wait_for(asyncio.shield(self._finished(job_id)), CANCEL_GRACE_S + 5)
            except TimeoutError:
                pass
        else:
            self._set(job, "cancelled", message="Fine-tuning job cancelled")
        return self.public(job)

    async def _finished(self, job_id: str) -> None:
        while self._jobs[job_id]["status"] not in TERMINAL:
            await asyncio.sleep(0.1)

    # -- the worker ---------------------------------------------------------------
    async def _run_queue(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while not self._closing:
                queued = sorted((j for j in self._jobs.values() if j["status"] == "queued"), key=_order)
                if not queued:
                    break
                try:
                    await self._train(queued[0])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - never leave a job running
                    log.exception("job %s", queued[0]["id"])
                    if queued[0]["status"] not in TERMINAL:
                        self._fail(queued[0], f"the server could not run the job: {exc}")

    async def _train(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        job_dir = self._dir(job_id)
        local = job["local"]
        resume = bool(local.pop("resume", False))
        cmd = [*self.worker_cmd, str(job_dir)] + (["--resume"] if resume else [])
        env = dict(os.environ)
        env.pop("OPENAI_API_KEY", None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        log_fd = os.open(job_dir / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as logf:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, env=env)
        self._running_id = job_id
        local["worker_pid"] = self._proc.pid
        job["status"] = "running"
        self._save(job)
        rc = await self._proc.wait()
        self._proc, self._running_id = None, None
        if self._closing and not local.get("cancel_requested"):
            return  # the server is stopping: state stays "running", the next start resumes it
        local.pop("worker_pid", None)
        status: dict[str, Any] = {}
        try:
            status = json.loads((job_dir / "status.json").read_text())
        except (OSError, ValueError):
            pass
        job["trained_tokens"] = status.get("trained_tokens") or job.get("trained_tokens")
        reported = status.get("status") in ("cancelled", "failed", "succeeded")  # the worker wrote its event
        if status.get("status") == "interrupted" and not local.get("cancel_requested"):
            local["resume"] = True  # SIGINT (e.g. Ctrl-C on a foreground server): resume, never fail
            job["status"] = "queued"
            self._save(job)
        elif local.get("cancel_requested"):
            self._set(job, "cancelled", message=None if status.get("status") == "cancelled"
                      else "Fine-tuning job cancelled")
        elif rc == 0 and status.get("status") == "succeeded":
            result = Path(status.get("result_dir") or job_dir / "result")
            if not result.is_absolute():
                result = job_dir / result
            local["result_dir"] = str(result)
            job["fine_tuned_model"] = fine_tuned_model_id(self.base_model_id, local.get("suffix"), job_id)
            self._register(job)
            self._set(job, "succeeded")
        else:
            reason = status.get("error") or _killed(rc) or self._log_tail(job_dir) \
                or f"the training worker exited with code {rc}"
            self._fail(job, reason, event=not (reported and status.get("status") == "failed"))

    @staticmethod
    def _log_tail(job_dir: Path) -> str | None:
        """The last exception line of the worker's log (a crash before it could write its status)."""
        try:
            lines = [ln.strip() for ln in (job_dir / "worker.log").read_text(errors="replace").splitlines()]
        except OSError:
            return None
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
        return errors[-1][:500] if errors else None


def training_profile(path: Path) -> dict[str, Any]:
    """The training file's format, with its separator and stop (completion format, trimmed to
    the validator's usual markers) or the system message every example shares (chat)."""
    from gridtune.pipeline.format.validate import SEPARATOR_FALLBACK, SEPARATOR_OPTIONS, STOP_FALLBACK, STOP_OPTIONS

    from .exits import data_profile

    return data_profile(path, separators=(*SEPARATOR_OPTIONS, SEPARATOR_FALLBACK),
                        stops=(*STOP_OPTIONS, STOP_FALLBACK))


def _killed(rc: int | None) -> str | None:
    """Why a worker that died of a signal stopped (no status of its own to tell)."""
    if rc is None or rc >= 0:
        return None
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (out of memory? try a smaller batch_size)" if -rc == signal.SIGKILL else ""
    return f"the training worker was killed by {name}{hint}"
