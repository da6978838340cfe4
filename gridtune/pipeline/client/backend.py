"""Which OpenAI-compatible endpoint to talk to: configuration, never code.

| env                          | backend                                   |
|------------------------------|-------------------------------------------|
| OPENAI_BASE_URL (+ key)      | any compatible server (vLLM, Ollama, ...) |
| OPENAI_API_KEY               | OpenAI                                    |
| neither                      | the embedded local server                 |

Which one the environment selects is ``resolve.resolve_backend``. Every model call
goes through the official ``openai`` client built here, so the
app has one code path for all of them. The key lives only in this object and the
client; it is never written to the project, a log or an export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ...core.errors import GridtuneError

OPENAI_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"


class BackendError(GridtuneError):
    """The backend cannot be used; a one-line message says what to do."""


def public_url(url: str) -> str:
    """``url`` without credentials or query (user:pass@host, ?api-key=...): what may
    be shown to a person, logged, or written to the project file."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:  # a malformed port: show none rather than the raw netloc
        port = None
    if port:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def url_secrets(url: str) -> list[str]:
    """The parts of ``url`` that may be secret: its user info (user:password), the
    password, and every query value, as written and percent-decoded; longest first."""
    parts = urlsplit(url)
    found: set[str] = set()
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    candidates = [userinfo, parts.password or ""] + [v for _k, v in parse_qsl(parts.query, keep_blank_values=True)]
    candidates += [v for v in parts.query.split("&")]  # raw k=v pairs, in case a value did not parse
    for value in candidates:
        for form in (value, unquote(value)):
            if len(form) >= 4:  # shorter strings are no secret worth mangling messages for
                found.add(form)
    return sorted(found, key=len, reverse=True)


@dataclass(frozen=True)
class Backend:
    kind: str  # "openai" | "compatible" | "local"
    base_url: str = field(repr=False)  # may carry credentials: shown only as public_url
    api_key: str = field(repr=False)
    default_model: str | None = None

    def __repr__(self) -> str:
        return f"Backend(kind={self.kind!r}, url={self.public_url!r}, default_model={self.default_model!r})"

    @property
    def label(self) -> str:
        """Which backend, for a person: never with credentials."""
        labels = {"openai": "OpenAI", "compatible": self.public_url, "local": f"local server {self.public_url}"}
        return labels[self.kind]

    @property
    def public_url(self) -> str:
        """The base URL without credentials or query (user:pass@host, ?api-key=...): what
        may be written to the project file to say which backend ran a job."""
        return public_url(self.base_url)

    def redact(self, text: str) -> str:
        """``text`` without the API key or the base URL's credentials: some servers
        echo the key or the URL they were called with in their error messages, and
        errors are saved in the project, shown and printed to run logs."""
        if self.public_url != self.base_url:
            text = text.replace(self.base_url, self.public_url)
            for secret in url_secrets(self.base_url):
                text = text.replace(secret + "@", "").replace(secret, "***")
        key = self.api_key
        if len(key) < 8:  # a placeholder such as "x", not a secret worth mangling messages for
            return text
        return text.replace(key, f"{key[:3]}...{key[-2:]}")

    def async_client(self, *, reply_limit: int | None = None, bounded: bool = False, **kwargs):
        """The openai client. ``reply_limit``: replies past that many bytes are refused
        (lean_http.ReplyTooLarge) before they are read whole, streamed or not;
        ``bounded`` alone: each reply past what its request's max_tokens can explain."""
        from openai import AsyncOpenAI

        kwargs.setdefault("max_retries", 0)  # retries are ours: the runner honours Retry-After itself
        if reply_limit is not None or bounded:
            from .lean_http import BoundedAsyncClient

            kwargs.setdefault("http_client", BoundedAsyncClient(reply_limit))
        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)
