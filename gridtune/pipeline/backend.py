"""Which OpenAI-compatible endpoint to talk to: configuration, never code.

| env                          | backend                                   |
|------------------------------|-------------------------------------------|
| OPENAI_BASE_URL (+ key)      | any compatible server (vLLM, Ollama, ...) |
| OPENAI_API_KEY               | OpenAI                                    |
| neither                      | the embedded local server                 |

Every model call goes through the official ``openai`` client built here, so the
app has one code path for all of them. The key lives only in this object and the
client; it is never written to the project, a log or an export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

OPENAI_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"


class BackendError(Exception):
    """The backend cannot be used; a one-line message says what to do."""


@dataclass(frozen=True)
class Backend:
    kind: str  # "openai" | "compatible" | "local"
    base_url: str
    api_key: str = field(repr=False)
    default_model: str | None = None

    @property
    def label(self) -> str:
        return {"openai": "OpenAI", "compatible": f"{self.base_url}", "local": f"local server {self.base_url}"}[self.kind]

    @property
    def public_url(self) -> str:
        """The base URL without credentials or query (user:pass@host, ?api-key=...): what
        may be written to the project file to say which backend ran a job."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def redact(self, text: str) -> str:
        """``text`` without the API key: some servers echo the key in their error
        messages, and errors are saved in the project and printed to run logs."""
        key = self.api_key
        if len(key) < 8:  # a placeholder such as "x", not a secret worth mangling messages for
            return text
        return text.replace(key, f"{key[:3]}...{key[-2:]}")

    def async_client(self, **kwargs):
        from openai import AsyncOpenAI

        kwargs.setdefault("max_retries", 0)  # retries are ours: the runner honours Retry-After itself
        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)


def resolve_backend(*, start_local: bool = True) -> Backend:
    """The backend the environment selects (see the table above)."""
    base_url = os.environ.get("OPENAI_BASE_URL", "").strip()
    api_key = os.environ.get("OPENAI_API_KEY", "").strip()
    if base_url:
        return Backend("compatible", base_url.rstrip("/"), api_key or "not-needed")
    if api_key:
        return Backend("openai", OPENAI_URL, api_key, OPENAI_DEFAULT_MODEL)
    return local_backend(start=start_local)


def local_backend(*, start: bool = True) -> Backend:
    """The user's embedded local server, started on demand."""
    from . import local_service

    return local_service.ensure_backend(start=start)
