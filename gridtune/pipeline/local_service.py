"""Finding (and, once the embedded server exists, starting) the user's local server."""

from __future__ import annotations

from .backend import Backend, BackendError


def ensure_backend(*, start: bool = True) -> Backend:
    raise BackendError(
        "no backend configured: set OPENAI_API_KEY for OpenAI, or OPENAI_BASE_URL "
        "(e.g. http://127.0.0.1:8000/v1) for a compatible server"
    )
