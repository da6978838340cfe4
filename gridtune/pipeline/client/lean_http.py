"""A lean keep-alive HTTP client (aiohttp) for the runner's plain (non-streamed) requests.

Why: at a hundred requests in flight, the openai client's own path (request
options copied and transformed, httpx's models, httpcore's pool scanning every
connection for every request) costs ~1.5 ms of client CPU per request; an
aiohttp session posting pre-serialised JSON costs a fraction of that
(bench/generate.py measures both). It sends what ``client.post(path, body=...)``
sends (the client's own default headers: auth, organisation, user agent) and
raises the openai package's own exception types (APIStatusError subclasses with
a real httpx.Response, APITimeoutError, APIConnectionError), so retries,
Retry-After and error messages work unchanged.

It is used only where it is a plain HTTP(S) request and nothing else: a plain
``openai.AsyncOpenAI`` client (not Azure), no proxy in the environment, no
custom query. Anything else goes through the openai client (``for_client`` then
returns None). The timeout bounds the whole request (connect, send, the reply).

Replies are bounded (``max_bytes``; ``reply_limit_bytes`` sizes it from the
request's max_tokens): a bigger one is refused with ReplyTooLarge before it is read
whole, here and through the openai client (``BoundedAsyncClient``), streamed or not.
"""

from __future__ import annotations

import importlib
import json
import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import openai
from yarl import URL

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
    404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}
MAX_HEADER_BYTES = 64 * 1024
DNS_CACHE_S = 300
REPLY_CAP_BYTES = 32 * 2**20  # no reply is read past this, whatever max_tokens says
REPLY_BASE_BYTES = 256 * 1024  # envelope, usage, error bodies, a server's extra fields
# A token is a few bytes of text, at most ~16 of UTF-8; JSON may escape each character
# into a 6-byte \uXXXX; a streamed token comes in a chunk of a few hundred bytes of JSON
# (id, model, choices, sometimes padding). Generous on purpose: only replies no
# max_tokens can explain are refused.
REPLY_BYTES_PER_TOKEN = 128
STREAM_BYTES_PER_TOKEN = 2048


class ReplyTooLarge(openai.OpenAIError):
    """A reply larger than its request can explain, refused before it was read whole
    (the openai client passes its own error types through unchanged)."""


def reply_limit_bytes(max_tokens: int | None, n: int = 1, *, stream: bool = False) -> int:
    """The most bytes a reply to a request for ``max_tokens`` tokens (``n`` choices) is
    read to, plain or streamed (see REPLY_BYTES_PER_TOKEN); never over REPLY_CAP_BYTES."""
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        return REPLY_CAP_BYTES
    per_token = STREAM_BYTES_PER_TOKEN if stream else REPLY_BYTES_PER_TOKEN
    return min(REPLY_CAP_BYTES, REPLY_BASE_BYTES + max_tokens * max(1, n) * per_token)


def request_limit_bytes(body: bytes) -> int:
    """reply_limit_bytes for a request's JSON body (its max_tokens, n and stream)."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        return REPLY_CAP_BYTES
    n = data["n"] if isinstance(data.get("n"), int) else 1
    tokens = data.get("max_tokens", data.get("max_completion_tokens"))
    return reply_limit_bytes(tokens if isinstance(tokens, int) else None, n, stream=data.get("stream") is True)


def _too_large(limit: int, declared: int | None = None) -> ReplyTooLarge:
    said = f" (it announced {declared:,})" if declared is not None else ""
    return ReplyTooLarge(f"the reply is larger than {limit:,} bytes{said}, more than its max_tokens can explain; "
                         "not read further")


def _declared_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _ssl_context() -> ssl.SSLContext:
    """Verified TLS with the CA bundle httpx would use (SSL_CERT_FILE/DIR, else certifi's)."""
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if not cafile and not capath:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            pass
    return ssl.create_default_context(cafile=cafile, capath=capath)


class LeanHttpClient:
    """POST JSON to one server over pooled keep-alive connections (one aiohttp session,
    opened on the first request inside the running loop, closed by ``close``)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout_s: float, connections: int = 100,
                 max_bytes: int = REPLY_CAP_BYTES):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connections = max(1, connections)
        self.max_bytes = max_bytes
        self._ssl: ssl.SSLContext | bool = _ssl_context() if url.scheme == "https" else True
        skip = {"host", "accept", "content-type", "content-length", "connection", "transfer-encoding"}
        self._headers = {"Accept": "application/json", "Content-Type": "application/json",
                         **{k: v for k, v in headers.items() if k.lower() not in skip and v is not None}}
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def for_client(cls, client: Any, timeout_s: float, connections: int = 100,
                   max_bytes: int = REPLY_CAP_BYTES) -> LeanHttpClient | None:
        """A lean client sending what ``client`` would, or None where it would differ."""
        if type(client) is not openai.AsyncOpenAI or any(os.environ.get(v) for v in _PROXY_VARS):
            return None
        try:
            both = {**client.default_headers, **client.auth_headers}  # the key stays in memory, as in the client
            headers = {k: v for k, v in both.items() if isinstance(v, str)}
            if getattr(client, "_custom_query", None):
                return None
            return cls(str(client.base_url), headers, timeout_s, connections, max_bytes)
        except (ValueError, AttributeError):
            return None

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the lean HTTP client is closed")
        connector = aiohttp.TCPConnector(limit=self.connections, ttl_dns_cache=DNS_CACHE_S, ssl=self._ssl)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            skip_auto_headers=("Accept-Encoding",),  # as before: replies come uncompressed
            cookie_jar=aiohttp.DummyCookieJar(), max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES)
        return self._session

    async def post(self, path: str, body: Any) -> tuple[dict[str, str], bytes]:
        """The reply's headers (lower-case names) and body; an openai exception for an
        error status, a timeout or a broken connection."""
        session = self._session or self._open()
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            async with session.post(url, data=data, allow_redirects=False) as response:
                content = await self._read(response)
                status = response.status
                headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError:  # aiohttp's timeouts are TimeoutError subclasses too
            raise openai.APITimeoutError(request=self._request(path)) from None  # type: ignore[arg-type]
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise openai.APIConnectionError(message=f"Connection error: {exc or type(exc).__name__}",
                                            request=self._request(path)) from exc  # type: ignore[arg-type]
        if status >= 400:
            raise self._status_error(path, status, headers, content)
        return headers, content

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, unless it is (or announces) more than max_bytes: then ReplyTooLarge,
        with the rest left unread (the connection is dropped, not drained)."""
        limit = self.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise _too_large(limit, declared)
        parts, total = [], 0
        async for chunk in response.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    def _request(self, path: str) -> httpx.Request:
        return httpx.Request("POST", self.base_url + path)

    def _status_error(self, path: str, status: int, headers: dict[str, str], content: bytes) -> Exception:
        """The exception the openai client raises for this status, with the same body."""
        decoded = {k: v for k, v in headers.items() if k != "content-encoding"}  # aiohttp decompressed it
        response = httpx.Response(status, headers=decoded, content=content, request=self._request(path))
        try:
            body: Any = json.loads(content)
        except ValueError:
            body = content.decode(errors="replace") or None
        message = f"Error code: {status} - {body}"
        inner = body.get("error", body) if isinstance(body, dict) else body
        cls = _STATUS_ERRORS.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
        # openai types these against the HTTP package it bundles (httpx, or httpx2 in openai 3);
        # it reads only status, headers and content, which httpx's objects have too.
        return cls(message, response=response, body=inner)  # type: ignore[arg-type]

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# -- the same bound for the openai client (streamed requests, and plain ones when the
# lean client does not apply) -------------------------------------------------------

# openai's HTTP package: httpx, or its fork httpx2 in recent releases.
_HTTP = importlib.import_module(
    next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient").__module__.split(".")[0])


class _CappedStream(_HTTP.AsyncByteStream):  # type: ignore[name-defined]
    """A response body that raises ReplyTooLarge past ``limit`` bytes."""

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner, self._limit = inner, limit

    async def __aiter__(self) -> Any:
        total = 0
        async for chunk in self._inner:
            total += len(chunk)
            if total > self._limit:
                raise _too_large(self._limit)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedAsyncClient(openai.DefaultAsyncHttpxClient):
    """The openai client's HTTP client, with the openai defaults, whose replies stop at
    ``max_bytes``: a streamed body raises ReplyTooLarge as it passes the bound, a plain
    one before it is read whole. Replies are asked uncompressed, so the bytes counted
    are the bytes kept."""

    def __init__(self, max_bytes: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Accept-Encoding": "identity"})
        super().__init__(**kwargs)
        self.max_bytes = max_bytes  # None: each request's own bound (request_limit_bytes)

    async def send(self, request: Any, *, stream: bool = False, **kwargs: Any) -> Any:
        limit = self.max_bytes
        if limit is None:
            try:
                limit = request_limit_bytes(request.content)
            except Exception:  # noqa: BLE001 - a streamed body (an upload): the hard cap
                limit = REPLY_CAP_BYTES
        response = await super().send(request, stream=True, **kwargs)
        try:
            declared = _declared_length(response.headers.get("content-length"))
            if declared is not None and declared > limit:
                raise _too_large(limit, declared)
            response.stream = _CappedStream(response.stream, limit)
            if not stream:
                await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response
