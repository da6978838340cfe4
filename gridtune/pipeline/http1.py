"""A lean HTTP/1.1 keep-alive client for the runner's plain (non-streamed) requests.

Why: at a hundred requests in flight, the openai client's own path (request
options copied and transformed, httpx's models, httpcore's pool scanning every
connection for every request) costs ~1.5 ms of client CPU per request; this costs
a fraction of that (bench/generate.py measures both). It sends exactly what
``client.post(path, body=...)`` sends (the client's own default headers: auth,
organisation, user agent) and raises the openai package's own exception types
(APIStatusError subclasses with the real httpx.Response, APITimeoutError,
APIConnectionError), so retries, Retry-After and error messages work unchanged.

It is used only where it is a plain HTTP(S) request and nothing else: a plain
``openai.AsyncOpenAI`` client (not Azure), no proxy in the environment, no
custom query. Anything else goes through the openai client (``for_client`` then
returns None). The timeout bounds the whole request (connect, send, the reply).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
    404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}
MAX_HEADER_BYTES = 64 * 1024


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


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class Http1Client:
    """POST JSON to one server over pooled keep-alive connections."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout_s: float):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.base_url = base_url.rstrip("/")
        self.host = url.hostname
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        self.timeout_s = timeout_s
        self._ssl = _ssl_context() if self.tls else None
        host_header = self.host if url.port is None else f"{self.host}:{url.port}"
        if ":" in self.host and url.port is not None:  # an IPv6 literal
            host_header = f"[{self.host}]:{url.port}"
        lines = [f"Host: {host_header}", "Accept: application/json", "Content-Type: application/json",
                 "Connection: keep-alive"]
        skip = {"host", "accept", "content-type", "content-length", "connection", "transfer-encoding"}
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in skip and v is not None]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: list[_Conn] = []
        self._closed = False

    @classmethod
    def for_client(cls, client: Any, timeout_s: float) -> Http1Client | None:
        """A lean client sending what ``client`` would, or None where it would differ."""
        if type(client) is not openai.AsyncOpenAI or any(os.environ.get(v) for v in _PROXY_VARS):
            return None
        try:
            both = {**client.default_headers, **client.auth_headers}  # the key stays in memory, as in the client
            headers = {k: v for k, v in both.items() if isinstance(v, str)}
            if getattr(client, "_custom_query", None):
                return None
            return cls(str(client.base_url), headers, timeout_s)
        except (ValueError, AttributeError):
            return None

    async def post(self, path: str, body: Any) -> tuple[dict[str, str], bytes]:
        """The reply's headers (lower-case names) and body; an openai exception for an
        error status, a timeout or a broken connection."""
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        request = (b"POST " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self._head
                   + str(len(data)).encode() + b"\r\n\r\n" + data)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, headers, content = await self._exchange(request)
        except TimeoutError:
            raise openai.APITimeoutError(request=self._request(path)) from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise openai.APIConnectionError(message=f"Connection error: {exc or type(exc).__name__}",
                                            request=self._request(path)) from exc
        if status >= 400:
            raise self._status_error(path, status, headers, content)
        return headers, content

    async def _exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        while self._idle:  # a kept-alive connection the server has not closed meanwhile
            conn = self._idle.pop()
            if conn.usable():
                try:
                    return await self._on(conn, request)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                        raise
                    continue  # closed by the server while idle, before it read this: try another
            conn.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl,
                                                       server_hostname=self.host if self.tls else None,
                                                       limit=MAX_HEADER_BYTES)
        return await self._on(_Conn(reader, writer), request)

    async def _on(self, conn: _Conn, request: bytes) -> tuple[int, dict[str, str], bytes]:
        keep = False
        try:
            conn.writer.write(request)
            head = await conn.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            version, code, *_ = lines[0].split(" ", 2)
            status = int(code)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                content = await conn.reader.readexactly(int(headers["content-length"]))
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                content = await self._chunked(conn.reader)
            else:  # delimited by the end of the connection
                content = await conn.reader.read()
                headers["connection"] = "close"
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            return status, headers, content
        finally:
            if keep and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def _request(self, path: str) -> httpx.Request:
        return httpx.Request("POST", self.base_url + path)

    def _status_error(self, path: str, status: int, headers: dict[str, str], content: bytes) -> Exception:
        """The exception the openai client raises for this status, with the same body."""
        response = httpx.Response(status, headers=headers, content=content, request=self._request(path))
        try:
            body: Any = json.loads(content)
        except ValueError:
            body = content.decode(errors="replace") or None
        message = f"Error code: {status} - {body}"
        inner = body.get("error", body) if isinstance(body, dict) else body
        cls = _STATUS_ERRORS.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
        return cls(message, response=response, body=inner)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
