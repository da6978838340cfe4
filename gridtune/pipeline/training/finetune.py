"""Fine-tune job control and prompting, for any backend with OpenAI's endpoints.

Everything goes through the official ``openai`` client of a
:class:`~gridtune.pipeline.client.backend.Backend`: the embedded local server, OpenAI, or
any compatible server. A job the backend refuses (OpenAI's answer to most
organisations now) raises :class:`FinetuneRefused` with one clear line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import openai
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from ..client.backend import Backend
from ..client.calls import CallError, message as _message, wrap as _wrap

# A failed fine-tuning call is a failed backend call; the name says which step it was.
FinetuneError = CallError

TERMINAL = ("succeeded", "failed", "cancelled")


class FinetuneRefused(FinetuneError):
    """The backend refused to create the job (e.g. OpenAI no longer accepts jobs from this organisation)."""


# -- files and jobs ---------------------------------------------------------------

def upload_file(backend: Backend, path: str | Path, purpose: str = "fine-tune") -> FileObject:
    path = Path(path)
    try:
        with backend.client() as client, open(path, "rb") as fh:
            return client.files.create(file=(path.name, fh), purpose=purpose)
    except OSError as exc:
        raise FinetuneError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except openai.OpenAIError as exc:
        raise _wrap(f"uploading {path.name}", exc, backend) from None


def create_job(backend: Backend, training_file_id: str, model: str, *, validation_file_id: str | None = None,
               epochs: int | None = None, suffix: str | None = None, seed: int | None = None,
               batch_size: int | None = None, learning_rate_multiplier: float | None = None) -> FineTuningJob:
    """Create a supervised fine-tuning job; FinetuneRefused when the backend says no."""
    hyper: dict[str, Any] = {}
    if epochs is not None:
        hyper["n_epochs"] = epochs
    if batch_size is not None:
        hyper["batch_size"] = batch_size
    if learning_rate_multiplier is not None:
        hyper["learning_rate_multiplier"] = learning_rate_multiplier
    kwargs: dict[str, Any] = {"model": model, "training_file": training_file_id,
                              "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}
    if validation_file_id:
        kwargs["validation_file"] = validation_file_id
    if suffix:
        kwargs["suffix"] = suffix
    if seed is not None:
        kwargs["seed"] = seed
    try:
        with backend.client() as client:
            return client.fine_tuning.jobs.create(**kwargs)
    except openai.APIStatusError as exc:
        if 400 <= exc.status_code < 500:
            raise FinetuneRefused(f"{backend.label} refused the fine-tuning job: {_message(exc, backend)}") from None
        raise _wrap("creating the job", exc, backend) from None
    except openai.OpenAIError as exc:
        raise _wrap("creating the job", exc, backend) from None


def get_job(backend: Backend, job_id: str) -> FineTuningJob:
    try:
        with backend.client() as client:
            return client.fine_tuning.jobs.retrieve(job_id)
    except openai.OpenAIError as exc:
        raise _wrap(f"job {job_id}", exc, backend) from None


def cancel_job(backend: Backend, job_id: str) -> FineTuningJob:
    try:
        with backend.client() as client:
            return client.fine_tuning.jobs.cancel(job_id)
    except openai.OpenAIError as exc:
        raise _wrap(f"cancelling {job_id}", exc, backend) from None


def list_jobs(backend: Backend, *, limit: int = 20) -> list[FineTuningJob]:
    try:
        with backend.client() as client:
            return list(client.fine_tuning.jobs.list(limit=limit).data)
    except openai.OpenAIError as exc:
        raise _wrap("listing jobs", exc, backend) from None


def pending_job_for(backend: Backend, model: str) -> FineTuningJob | None:
    """The unfinished job that will make ``model``, if the backend has one: a model id
    ending with the job's id (the local server's ``ft:BASE:local:SUFFIX:JOB``), the job
    id itself, or the job's model once it is named. A 404 for such a model means "not
    yet", not "no such model"."""
    try:
        jobs = list_jobs(backend, limit=50)
    except CallError:
        return None
    last = model.rsplit(":", 1)[-1]
    for job in jobs:
        if job.status not in TERMINAL and (last == job.id or model == job.fine_tuned_model):
            return job
    return None


def list_events(backend: Backend, job_id: str, *, limit: int = 100) -> list[FineTuningJobEvent]:
    """The newest ``limit`` events, oldest first."""
    try:
        with backend.client() as client:
            page = client.fine_tuning.jobs.list_events(job_id, limit=limit)
            return list(reversed(page.data))
    except openai.OpenAIError as exc:
        raise _wrap(f"events of {job_id}", exc, backend) from None


def list_models(backend: Backend) -> list[str]:
    try:
        with backend.client() as client:
            return [m.id for m in client.models.list()]
    except openai.OpenAIError as exc:
        raise _wrap("listing models", exc, backend) from None


def follow_job(backend: Backend, job_id: str, on_event: Callable[[FineTuningJobEvent], None] | None = None, *,
               poll_s: float = 1.0, timeout_s: float | None = None,
               on_job: Callable[[FineTuningJob], None] | None = None) -> FineTuningJob:
    """Poll the job until it ends, handing each new event (in order) to ``on_event``.

    Events come newest first from the API; each poll takes the newest page and
    passes on, oldest first, the ones not seen yet. Returns the final job.
    """
    seen: set[str] = set()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with backend.client() as client:
        while True:
            try:
                job = client.fine_tuning.jobs.retrieve(job_id)
                page = client.fine_tuning.jobs.list_events(job_id, limit=100)
            except openai.OpenAIError as exc:
                raise _wrap(f"following {job_id}", exc, backend) from None
            for event in reversed(page.data):
                if event.id not in seen:
                    seen.add(event.id)
                    if on_event:
                        on_event(event)
            if on_job:
                on_job(job)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise FinetuneError(f"job {job_id} still {job.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)


# -- following a job: one fold of its events, for the TUI and the CLI alike ---------------

EVENTS_KEPT = 20  # the latest event messages a JobState keeps


@dataclass(frozen=True)
class JobState:
    """A fine-tuning job as a person following it sees it: folded by a JobTracker
    from the job's polls and its events. Immutable: safe to hand to another thread."""

    id: str | None = None
    status: str = ""
    model: str | None = None
    fine_tuned_model: str | None = None
    error: str | None = None
    events: tuple[str, ...] = ()  # the latest EVENTS_KEPT event messages, oldest first
    steps: tuple[float, ...] = ()
    losses: tuple[float, ...] = ()
    valid_steps: tuple[float, ...] = ()
    valid_losses: tuple[float, ...] = ()
    total_steps: int | None = None
    step_times: tuple[float, ...] = ()  # when each of ``steps`` was logged (unix seconds)
    created_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def eta_s(self) -> float | None:
        """Time left, measured from the job's own steps (None before two steps are
        logged, or without a total): the estimate before the job, from the server's
        speed on generation, was twice the actual in issue 21's run; this one is not a guess."""
        if self.finished or not self.total_steps or len(self.steps) < 2 or len(self.step_times) != len(self.steps):
            return None
        done, spent = self.steps[-1] - self.steps[0], self.step_times[-1] - self.step_times[0]
        if done <= 0 or spent <= 0:
            return None
        return max(self.total_steps - self.steps[-1], 0) * spent / done

    @property
    def took_s(self) -> float | None:
        """How long the job took, from its creation to its end (finished jobs only)."""
        if not self.finished or self.created_at is None or self.finished_at is None:
            return None
        return max(self.finished_at - self.created_at, 0.0)

    @property
    def message(self) -> str | None:
        """The latest event's message."""
        return self.events[-1] if self.events else None

    @classmethod
    def from_record(cls, record: Any) -> JobState:
        """The state a project's job record (store.jobs()) holds: no events, no losses."""
        return cls(id=record.id, status=record.status, model=record.model,
                   fine_tuned_model=record.fine_tuned_model, error=record.error)


def _first_line(text: Any) -> str | None:
    lines = str(text).strip().splitlines() if text else []
    return lines[0].strip() if lines else None


class JobTracker:
    """Folds a job's events and polls into a JobState, and records each change of
    its status (or tuned model, or error) in the project when given a store.

    ``on_event`` and ``on_job`` take the openai objects ``follow_job`` hands out;
    ``state`` is the fold so far. ``on_job`` says whether it recorded a change, so
    a caller knows when to tell others that the project's jobs changed.
    """

    def __init__(self, job_id: str, *, model: str | None = None, status: str = "", store: Any = None) -> None:
        self.store = store
        self._state = JobState(id=job_id, status=status, model=model)
        self._events: list[str] = []
        self._curves: dict[str, list[float]] = {"steps": [], "losses": [], "valid_steps": [], "valid_losses": [],
                                                "step_times": []}
        self._recorded: tuple[str, str | None, str | None] | None = None

    @property
    def state(self) -> JobState:
        return self._state

    def on_event(self, event: FineTuningJobEvent) -> None:
        message = _first_line(event.message)
        if message:
            self._events = (self._events + [message])[-EVENTS_KEPT:]
        data = event.data if isinstance(event.data, dict) else {}
        step, total = data.get("step"), data.get("total_steps")
        curves = self._curves
        if event.type == "metrics" and step is not None:
            if data.get("train_loss") is not None:
                curves["steps"].append(float(step))
                curves["losses"].append(float(data["train_loss"]))
                curves["step_times"].append(float(getattr(event, "created_at", 0) or 0))
            if data.get("valid_loss") is not None:
                curves["valid_steps"].append(float(step))
                curves["valid_losses"].append(float(data["valid_loss"]))
        self._state = replace(
            self._state, events=tuple(self._events),
            total_steps=int(total) if isinstance(total, (int, float)) else self._state.total_steps,
            steps=tuple(curves["steps"]), losses=tuple(curves["losses"]), step_times=tuple(curves["step_times"]),
            valid_steps=tuple(curves["valid_steps"]), valid_losses=tuple(curves["valid_losses"]))

    def on_job(self, job: FineTuningJob) -> bool:
        error = _first_line(job.error.message) if job.error is not None and job.error.message else None
        self._state = replace(self._state, status=job.status, model=job.model or self._state.model,
                              fine_tuned_model=job.fine_tuned_model or self._state.fine_tuned_model,
                              error=error or self._state.error,
                              created_at=getattr(job, "created_at", None) or self._state.created_at,
                              finished_at=getattr(job, "finished_at", None) or self._state.finished_at)
        return self._record()

    def _record(self) -> bool:
        s = self._state
        now = (s.status, s.fine_tuned_model, s.error)
        if self.store is None or now == self._recorded or s.id is None:
            return False
        self._recorded = now
        record_job_status(self.store, s.id, status=s.status, fine_tuned_model=s.fine_tuned_model, error=s.error)
        return True

    def follow(self, backend: Backend, *, poll_s: float = 1.0, timeout_s: float | None = None,
               on_event: Callable[[FineTuningJobEvent], None] | None = None,
               on_update: Callable[[JobState, bool], None] | None = None) -> FineTuningJob:
        """Follow the job to its end (``follow_job``), folding as it goes: ``on_event``
        after each event is folded, ``on_update(state, recorded)`` after each poll."""

        def event(e: FineTuningJobEvent) -> None:
            self.on_event(e)
            if on_event:
                on_event(e)

        def job(j: FineTuningJob) -> None:
            recorded = self.on_job(j)
            if on_update:
                on_update(self._state, recorded)

        assert self._state.id is not None
        return follow_job(backend, self._state.id, event, poll_s=poll_s, timeout_s=timeout_s, on_job=job)


def record_job_status(store: Any, job_id: str, *, status: str, fine_tuned_model: str | None = None,
                      error: str | None = None) -> None:
    """Record a job's status (and tuned model, or error) in the project."""
    store.update_job(job_id, status=status, fine_tuned_model=fine_tuned_model, error=error)


# -- the whole step, as the CLI and the TUI run it -------------------------------------

def default_export_path(project_path: str | Path) -> Path:
    """Where a project's export goes unless told otherwise: ``<project stem>.jsonl``
    beside the project file (its validation split beside that)."""
    return Path(project_path).with_suffix(".jsonl")


def export_for_finetune(store: Any, validation: Path | None = None) -> tuple[Path, Path | None, int | None]:
    """Export a project's kept examples for training: (train path, validation path, export id).

    With an earlier export, its choices are repeated — format, min grade, separator,
    stop, validation fraction, cut-off choice and above all its held-out values and
    combinations, which must never reach training behind the evaluation's back."""
    from ...store import evaluation
    from .export import ExportError, export_project
    from .holdout import HoldOut

    out = default_export_path(store.path)
    kwargs: dict[str, Any] = {}
    latest = store.latest_export()
    if latest is not None:
        kwargs = dict(format=latest.format, min_grade=latest.min_grade, separator=latest.separator, stop=latest.stop,
                      validation_fraction=latest.validation_fraction,
                      include_cut_off=bool((latest.report or {}).get("include_cut_off")))
        held = evaluation.holdout_of(store, latest.id)
        if held:
            kwargs["hold_out"] = HoldOut(values=held.get("values") or {}, combos=int(held.get("combos") or 0),
                                         seed=int(held.get("seed") or 0))
    try:
        result = export_project(store, out, **kwargs)
    except ExportError as exc:
        raise FinetuneError(str(exc)) from None
    if not result.report.ok:
        raise FinetuneError(f"the exported file {out} has validation errors; see `gridtune validate {out}`")
    return result.path, validation or result.valid_path, result.export_id


def start_finetune(backend: Backend, train_path: str | Path, model: str, *, validation_path: str | Path | None = None,
                   epochs: int | None = None, suffix: str | None = None, seed: int | None = None,
                   store: Any = None, export_id: int | None = None,
                   on_message: Callable[[str], None] | None = None, today: date | None = None) -> FineTuningJob:
    """Validate, upload and create the job; record it in ``store`` (a project) when given.

    On OpenAI from 2027-01-06 (``today``: see sunset.today), or when OpenAI refuses the job
    because its fine-tuning is closed, FinetuneRefused says so with the local command."""
    from ..format.validate import ValidationInputError, validate_file
    from . import sunset

    say = on_message or (lambda _m: None)
    for path in [train_path] + ([validation_path] if validation_path else []):
        try:
            report = validate_file(path)
        except ValidationInputError as exc:
            raise FinetuneError(str(exc)) from None
        if not report.ok:
            kinds = ", ".join(f"{k} ({n})" for k, n in sorted(report.errors.items()))
            raise FinetuneError(f"{path}: {sum(report.errors.values())} validation error(s): {kinds}; "
                                f"see `gridtune validate {path}`")
    local = sunset.local_command(train_path, validation_path=validation_path, epochs=epochs, suffix=suffix,
                                 seed=seed)
    closed = sunset.closed_message(backend, local, on=today)
    if closed:
        raise FinetuneRefused(closed)  # before any upload: the file would only sit there
    say(f"uploading {Path(train_path).name} to {backend.label}")
    train = upload_file(backend, train_path)
    valid = upload_file(backend, validation_path) if validation_path else None
    try:
        job = create_job(backend, train.id, model, validation_file_id=valid.id if valid else None, epochs=epochs,
                         suffix=suffix, seed=seed)
    except FinetuneRefused as exc:
        raise FinetuneRefused(sunset.refusal_message(backend, str(exc), local) or str(exc)) from None
    if store is not None:
        store.record_job(id=job.id, base_url=backend.public_url, model=model, training_file=train.id,
                         validation_file=valid.id if valid else None, export_id=export_id, status=job.status)
    return job


EXPORT_TARGETS = ("hf", "gguf", "ollama", "vllm")


@dataclass
class ModelExport:
    """What an export wrote (``files`` relative to ``output_dir``) and the commands that run it."""

    target: str
    output_dir: Path
    files: list[str]
    commands: list[str]
    notes: list[str]


def export_model(backend: Backend, model_id: str, out_dir: str | Path, *, to: str = "hf",
                 quant: str | None = None) -> ModelExport:
    """Write a local fine-tuned model for another engine (the local server does it): a merged
    Hugging Face directory (hf), a GGUF for llama.cpp (gguf), a GGUF with an Ollama Modelfile
    (ollama) or a LoRA adapter for vLLM (vllm); ``quant`` (gguf/ollama) e.g. q8_0."""
    if backend.kind != "local":
        raise FinetuneError("export-model works on models of the local server; OpenAI's tuned models stay there")
    if to not in EXPORT_TARGETS:
        raise FinetuneError(f"unknown export target {to!r}; choose one of {', '.join(EXPORT_TARGETS)}")
    out = Path(out_dir).expanduser().resolve()
    body: dict[str, Any] = {"model": model_id, "output_dir": str(out), "to": to}
    if quant:
        body["quant"] = quant
    try:
        with backend.client(timeout=3600) as client:
            resp = client.post("/gridtune/export_model", cast_to=object, body=body)
    except openai.OpenAIError as exc:
        raise _wrap(f"exporting {model_id}", exc, backend) from None
    resp = resp if isinstance(resp, dict) else {}
    return ModelExport(target=str(resp.get("target", to)), output_dir=Path(resp.get("output_dir") or out),
                       files=list(resp.get("files") or []), commands=list(resp.get("commands") or []),
                       notes=list(resp.get("notes") or []))


# -- prompting ----------------------------------------------------------------------------

