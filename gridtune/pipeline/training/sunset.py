"""OpenAI's fine-tuning wind-down, said plainly.

OpenAI takes no new fine-tuning jobs from anyone from 2027-01-06 (most organisations were
refused long before), and its last fine-tunable snapshots shut down on 2027-01-14. A job
sent there after the first date, or refused because fine-tuning is closed to the
organisation, ends with one line naming the local command that runs the same file.

The date is injectable (``today``, or ``GRIDTUNE_TODAY=YYYY-MM-DD``) so the behaviour on
either side of it is testable on any day.
"""

from __future__ import annotations

import os
import re
import shlex
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

from ..client.backend import Backend

JOBS_CLOSE = date(2027, 1, 6)  # no new fine-tuning jobs on OpenAI from this day
SNAPSHOTS_SHUT_DOWN = date(2027, 1, 14)  # gpt-4o(-mini), gpt-4.1(-mini) snapshots and their tunes stop
TODAY_ENV = "GRIDTUNE_TODAY"

# What OpenAI says when fine-tuning is closed to an organisation: the wording varies, the
# subject and the refusal do not.
_CLOSED = re.compile(
    r"fine[- ]?tun\w*.{0,80}?(no longer|not (?:be )?(?:available|allowed|permitted|supported|enabled)|unavailable|"
    r"closed|disabled|discontinu\w*|deprecat\w*|retire\w*|shut ?down|sunset\w*|wind(?:ing)? down)"
    r"|(no longer|not available|unavailable|do(?:es)? not have access|not (?:allowed|permitted|eligible))"
    r".{0,80}?fine[- ]?tun",
    re.I)


def today(explicit: date | None = None) -> date:
    """``explicit``, else GRIDTUNE_TODAY, else the calendar's date."""
    if explicit is not None:
        return explicit
    raw = os.environ.get(TODAY_ENV, "").strip()
    if raw:
        try:
            return date.fromisoformat(raw)
        except ValueError:
            pass  # a malformed override is ignored: the real date is the safe answer
    return date.today()


def is_openai(backend: Backend) -> bool:
    return backend.kind == "openai" or (urlsplit(backend.base_url).hostname or "") == "api.openai.com"


def local_command(train_path: str | Path, *, validation_path: str | Path | None = None,
                  epochs: int | None = None, suffix: str | None = None, seed: int | None = None) -> str:
    """The command that runs the same training file on gridtune's local backend (the
    environment without OpenAI's settings selects it; its own model is the base)."""
    parts = ["env", "-u", "OPENAI_API_KEY", "-u", "OPENAI_BASE_URL", "gridtune", "finetune", str(train_path)]
    if validation_path:
        parts += ["--validation-file", str(validation_path)]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    if suffix:
        parts += ["--suffix", suffix]
    if seed is not None:
        parts += ["--seed", str(seed)]
    parts.append("--wait")
    return shlex.join(parts)


def closed_message(backend: Backend, command: str, *, on: date | None = None) -> str | None:
    """One line when ``backend`` is OpenAI and its fine-tuning is closed by date; else None."""
    if not is_openai(backend) or today(on) < JOBS_CLOSE:
        return None
    return (f"OpenAI takes no new fine-tuning jobs since {JOBS_CLOSE.isoformat()}; run the same file on the "
            f"local backend: {command}")


def refusal_message(backend: Backend, refusal: str, command: str) -> str | None:
    """One line when OpenAI refused a job because fine-tuning is closed to the organisation; else None."""
    if not is_openai(backend) or not _CLOSED.search(refusal):
        return None
    return f"{refusal.rstrip('. ')}. OpenAI's fine-tuning is closed to this organisation; run the same file on " \
           f"the local backend: {command}"
