"""A failed call to the backend (a prompt, a file, a fine-tuning job) as one line:
the server's own message, without the credentials some servers echo back."""

from __future__ import annotations

import openai

from ...core.errors import GridtuneError
from .backend import Backend


class CallError(GridtuneError):
    """A call to the backend failed; the message is one line."""

    exit_code = 1


def message(exc: openai.APIError, backend: Backend | None = None) -> str:
    """The server's own message of a failed call, without credentials (``backend``'s
    key and URL, and whatever the request carried)."""
    body = getattr(exc, "body", None)
    text = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
    text = _scrub(exc, text or str(getattr(exc, "message", None) or exc))
    # openai >= 3 hands errors a copy of the request without its Authorization header:
    # the backend that made the call is what still knows the key.
    return backend.redact(text) if backend is not None else text


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


def wrap(what: str, exc: Exception, backend: Backend | None = None) -> CallError:
    if isinstance(exc, openai.APIConnectionError):
        return CallError(f"{what}: cannot reach the backend ({exc.__class__.__name__})")
    if isinstance(exc, openai.APIStatusError):
        return CallError(f"{what}: {exc.status_code} {message(exc, backend)}")
    return CallError(f"{what}: {exc}")
