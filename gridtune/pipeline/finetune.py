"""Fine-tune job control and prompting, for any backend with OpenAI's endpoints.

Everything goes through the official ``openai`` client of a
:class:`~gridtune.pipeline.backend.Backend`: the embedded local server, OpenAI, or
any compatible server. A job the backend refuses (OpenAI's answer to most
organisations now) raises :class:`FinetuneRefused` with one clear line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import openai
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from .backend import Backend

TERMINAL = ("succeeded", "failed", "cancelled")


class FinetuneError(Exception):
    """A fine-tuning or prompting call failed; the message is one line."""


class FinetuneRefused(FinetuneError):
    """The backend refused to create the job (e.g. OpenAI no longer accepts jobs from this organisation)."""


def _message(exc: openai.APIError) -> str:
    body = getattr(exc, "body", None)
    text = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
    return _scrub(exc, text or str(getattr(exc, "message", None) or exc))


def _scrub(exc: openai.APIError, text: str) -> str:
    """A server's message without the credentials of the URL it was called at
    (user:password@, ?api-key=) or the key: servers echo them."""
    request = getattr(exc, "request", None)
    if request is None:
        return text
    auth = request.headers.get("authorization", "")
    key = auth.split(" ", 1)[1] if " " in auth else ""
    url = str(request.url)
    return Backend("compatible", url, key).redact(text)


def _wrap(what: str, exc: Exception) -> FinetuneError:
    if isinstance(exc, openai.APIConnectionError):
        return FinetuneError(f"{what}: cannot reach the backend ({exc.__class__.__name__})")
    if isinstance(exc, openai.APIStatusError):
        return FinetuneError(f"{what}: {exc.status_code} {_message(exc)}")
    return FinetuneError(f"{what}: {exc}")


# -- files and jobs ---------------------------------------------------------------

def upload_file(backend: Backend, path: str | Path, purpose: str = "fine-tune") -> FileObject:
    path = Path(path)
    try:
        with backend.client() as client, open(path, "rb") as fh:
            return client.files.create(file=(path.name, fh), purpose=purpose)  # type: ignore[arg-type]
    except OSError as exc:
        raise FinetuneError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except openai.OpenAIError as exc:
        raise _wrap(f"uploading {path.name}", exc) from None


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
            raise FinetuneRefused(f"{backend.label} refused the fine-tuning job: {_message(exc)}") from None
        raise _wrap("creating the job", exc) from None
    except openai.OpenAIError as exc:
        raise _wrap("creating the job", exc) from None


def get_job(backend: Backend, job_id: str) -> FineTuningJob:
    try:
        with backend.client() as client:
            return client.fine_tuning.jobs.retrieve(job_id)
    except openai.OpenAIError as exc:
        raise _wrap(f"job {job_id}", exc) from None


def cancel_job(backend: Backend, job_id: str) -> FineTuningJob:
    try:
        with backend.client() as client:
            return client.fine_tuning.jobs.cancel(job_id)
    except openai.OpenAIError as exc:
        raise _wrap(f"cancelling {job_id}", exc) from None


def list_jobs(backend: Backend, *, limit: int = 20) -> list[FineTuningJob]:
    try:
        with backend.client() as client:
            return list(client.fine_tuning.jobs.list(limit=limit).data)
    except openai.OpenAIError as exc:
        raise _wrap("listing jobs", exc) from None


def list_events(backend: Backend, job_id: str, *, limit: int = 100) -> list[FineTuningJobEvent]:
    """The newest ``limit`` events, oldest first."""
    try:
        with backend.client() as client:
            page = client.fine_tuning.jobs.list_events(job_id, limit=limit)
            return list(reversed(page.data))
    except openai.OpenAIError as exc:
        raise _wrap(f"events of {job_id}", exc) from None


def list_models(backend: Backend) -> list[str]:
    try:
        with backend.client() as client:
            return [m.id for m in client.models.list()]
    except openai.OpenAIError as exc:
        raise _wrap("listing models", exc) from None


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
                raise _wrap(f"following {job_id}", exc) from None
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


# -- the whole step, as the CLI and the TUI run it -------------------------------------

def export_for_finetune(store: Any, validation: Path | None = None) -> tuple[Path, Path | None, int | None]:
    """Export a project's kept examples for training: (train path, validation path, export id)."""
    from .export import ExportError, export_project

    out = Path(store.path).with_suffix(".train.jsonl")
    try:
        result = export_project(store, out)
    except ExportError as exc:
        raise FinetuneError(str(exc)) from None
    if not result.report.ok:
        raise FinetuneError(f"the exported file {out} has validation errors; see `gridtune validate {out}`")
    return result.path, validation or result.valid_path, result.export_id


def start_finetune(backend: Backend, train_path: str | Path, model: str, *, validation_path: str | Path | None = None,
                   epochs: int | None = None, suffix: str | None = None, seed: int | None = None,
                   store: Any = None, export_id: int | None = None,
                   on_message: Callable[[str], None] | None = None) -> FineTuningJob:
    """Validate, upload and create the job; record it in ``store`` (a project) when given."""
    from .validate import ValidationInputError, validate_file

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
    say(f"uploading {Path(train_path).name} to {backend.label}")
    train = upload_file(backend, train_path)
    valid = upload_file(backend, validation_path) if validation_path else None
    job = create_job(backend, train.id, model, validation_file_id=valid.id if valid else None, epochs=epochs,
                     suffix=suffix, seed=seed)
    if store is not None:
        store.record_job(id=job.id, base_url=backend.public_url, model=model, training_file=train.id,
                         validation_file=valid.id if valid else None, export_id=export_id, status=job.status)
    return job


def export_model(backend: Backend, model_id: str, out_dir: str | Path) -> Path:
    """Merge a local fine-tuned model into a Hugging Face directory (the local server does it)."""
    if backend.kind != "local":
        raise FinetuneError("export-model works on models of the local server; OpenAI's tuned models stay there")
    out = Path(out_dir).expanduser().resolve()
    try:
        with backend.client(timeout=3600) as client:
            resp = client.post("/gridtune/export_model", cast_to=object,
                               body={"model": model_id, "output_dir": str(out)})
    except openai.OpenAIError as exc:
        raise _wrap(f"exporting {model_id}", exc) from None
    return Path(resp["output_dir"]) if isinstance(resp, dict) else out


# -- prompting ----------------------------------------------------------------------------

