"""The process the server runs per fine-tuning job.

    python -m gridtune.server.train_worker JOB_DIR [--resume]

Reads ``JOB_DIR/job.json``, trains (see train.py), and keeps ``JOB_DIR/status.json`` up to
date: {"status": "running"|"succeeded"|"failed"|"cancelled"|"interrupted", "error", "trained_tokens",
"result_dir", "pid", "updated_at"}. Exit codes: 0 succeeded, 1 failed, 2 bad usage,
3 stopped, at the next step or micro-batch boundary: SIGTERM cancels the job, SIGINT
interrupts it (the server is stopping; it resumes from its last checkpoint later).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gridtune.core.errors import one_line
from gridtune.core.files import write_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3


def write_status(job_dir: Path, status: str, **fields: Any) -> None:
    data = {"status": status, "error": None, "trained_tokens": None, "result_dir": None,
            "pid": os.getpid(), "updated_at": int(time.time())}
    data.update(fields)
    write_json(job_dir / "status.json", data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridtune.server.train_worker")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    job_dir: Path = args.job_dir
    if not (job_dir / "job.json").is_file():
        print(f"train_worker: {job_dir}/job.json not found", file=sys.stderr)
        return EXIT_USAGE

    stop = {"requested": False, "signal": None}

    def request_stop(signum: int, _frame: Any) -> None:
        stop["requested"] = True
        stop["signal"] = stop["signal"] or signum

    # Installed before the heavy imports so an early SIGTERM is not lost either.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    from gridtune.server.train import DataError, EventLog, JobSpec, TrainingCancelled, run_job

    events = EventLog(job_dir / "events.jsonl")
    write_status(job_dir, "running")
    try:
        spec = JobSpec.from_dict(json.loads((job_dir / "job.json").read_text()))
        if stop["requested"]:
            raise TrainingCancelled()
        result = run_job(spec, job_dir, resume=args.resume, should_stop=lambda: stop["requested"], events=events)
    except TrainingCancelled:
        if stop["signal"] == signal.SIGINT:
            events.emit("Training interrupted: the server is stopping; the job resumes from its last "
                        "checkpoint when it starts again", level="warn")
            write_status(job_dir, "interrupted", error="interrupted", trained_tokens=_trained_tokens(job_dir))
            return EXIT_CANCELLED
        events.emit("Fine-tuning job cancelled")
        write_status(job_dir, "cancelled", trained_tokens=_trained_tokens(job_dir))
        return EXIT_CANCELLED
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a status, one line
        reason = _reason(exc)
        if not isinstance(exc, DataError):
            traceback.print_exc(file=sys.stderr)  # the server keeps stderr as the job's log
        try:
            events.emit(f"Fine-tuning job failed: {reason}", level="error")
        finally:
            write_status(job_dir, "failed", error=reason, trained_tokens=_trained_tokens(job_dir))
        return EXIT_FAILED
    events.emit("The job has successfully completed", data={"trained_tokens": result.trained_tokens})
    write_status(job_dir, "succeeded", trained_tokens=result.trained_tokens, result_dir=str(result.result_dir))
    return EXIT_OK


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return "out of memory: try a smaller batch_size or a smaller model"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    from gridtune.server.train import DataError

    try:
        from gridtune.server.model import ModelError
    except ImportError:  # pragma: no cover
        ModelError = DataError  # type: ignore[misc,assignment]
    if isinstance(exc, (DataError, ModelError)):
        return one_line(exc, whole=True)
    return one_line(exc, with_type=True, whole=True)


def _trained_tokens(job_dir: Path) -> int | None:
    from gridtune.server.train import last_checkpoint

    found = last_checkpoint(job_dir)
    return found[1].get("trained_tokens") if found else None


if __name__ == "__main__":
    sys.exit(main())
