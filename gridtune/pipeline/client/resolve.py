"""Which backend the environment selects (the table in backend.py), starting the
embedded local server on demand. Above both backend.py and local_service.py: the
local service builds a Backend, and this module picks it."""

from __future__ import annotations

import os

from . import local_service
from .backend import OPENAI_DEFAULT_MODEL, OPENAI_URL, Backend


def resolve_backend(*, start_local: bool = True, model: str | None = None) -> Backend:
    """The backend the environment selects (see the table above); ``model`` (a Hub id or
    local path) is what a local server started now serves."""
    base_url = os.environ.get("OPENAI_BASE_URL", "").strip()
    api_key = os.environ.get("OPENAI_API_KEY", "").strip()
    if base_url:
        return Backend("compatible", base_url.rstrip("/"), api_key or "not-needed")
    if api_key:
        return Backend("openai", OPENAI_URL, api_key, OPENAI_DEFAULT_MODEL)
    return local_backend(start=start_local, model=model)


def local_backend(*, start: bool = True, model: str | None = None) -> Backend:
    """The user's embedded local server, started on demand (serving ``model`` if given)."""
    return local_service.ensure_backend(start=start, model=model)
