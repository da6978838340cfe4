"""The OpenAI-compatible HTTP app (Starlette): models, chat and legacy completions,
files, batches and fine-tuning jobs. Wire shapes come from the ``openai`` package's types.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai.types import Completion, CompletionUsage, FileObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gridtune.core.files import private_dir
from gridtune.core.net import is_loopback

from .batches import BatchManager
from .engine import Delta, Engine, EngineError, SamplingParams, new_id
from .errors import APIError, invalid
from .files import DEFAULT_MAX_BYTES, DEFAULT_QUOTA_BYTES, FileStore
from .jobs import JobManager

log = logging.getLogger("gridtune.server")

MAX_N = 16
MAX_STOPS = 4
MAX_LOGIT_BIAS = 300  # as OpenAI
MAX_STOP_CHARS = 256
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a JSON request body; uploads have their own limit
# A prompt longer than this many characters per token of context cannot fit (tokenizers
# average 3-5 characters a token); refused before the tokenizer ever sees it.
PROMPT_CHARS_PER_TOKEN = 8
UPLOAD_OVERHEAD = 64 * 1024  # multipart framing and the purpose field around the file
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
REFUSED_FETCH_SITES = ("cross-site", "same-site")
MAX_BATCH_HEADER = "x-gridtune-max-batch"


@dataclass
class ServerState:
    """What the app serves and the rules it serves by.

    ``token`` is the owner token the server generated at start (kept only in its 0600 state
    file); ``api_key`` is a key the user chose (``--api-key``, for listening off loopback).
    A request must carry one of them, unless both are None (an in-process server, tests).
    """

    engine: Engine
    files: FileStore
    jobs: JobManager
    api_key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    allowed_hosts: frozenset[str] = frozenset()  # more host names to accept in Host (with this port)
    allowed_origins: frozenset[str] = frozenset()  # browser origins allowed in (default: none)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = 128  # completions (rows) admitted and unfinished, past which: 429
    export_root: Path | None = None
    started_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    reserved: int = 0  # rows admitted by the app and not finished (>= engine.load)
    reserved_tokens: int = 0  # their token budgets, for the Retry-After estimate
    batches: BatchManager | None = None  # /v1/batches (build_state makes it)

    @property
    def idle_for(self) -> float:
        """Seconds with no request in flight, no job queued or running and no generation
        (counted from the end of the last job, not from the last request before it)."""
        if self.in_flight or self.jobs.active or self.engine.busy or (self.batches and self.batches.active):
            self.last_activity = time.monotonic()
            return 0.0
        return time.monotonic() - self.last_activity


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _split_host(value: str) -> tuple[str, str | None]:
    """("name", "port") of a Host header value: ``name:port``, ``[v6]:port`` or ``name``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value, "") if end < 0 else (value[:end + 1], value[end + 1:])
    else:
        name, sep, port = value.partition(":")
        rest = sep + port
    return name, (rest[1:] if rest.startswith(":") else None)


def _host_allowed(state: ServerState, scope: dict[str, Any], host: str | None) -> bool:
    """Host must name this server: a loopback name or the address the connection came in on
    (or a name the operator allowed), with this server's port. A DNS-rebinding page sends
    its own domain name here, so it is refused."""
    if not host:
        return False
    server = scope.get("server") or ("127.0.0.1", 80)
    local = str(server[0]).lower()
    if ":" in local:
        local = f"[{local}]"
    name, port = _split_host(host)
    if (port or "80") != str(server[1]):
        return False
    return name in {*LOOPBACK_NAMES, local, *(h.lower() for h in state.allowed_hosts)}


def _browser_refusal(state: ServerState, scope: dict[str, Any]) -> str | None:
    """Why a request that a web page sent is refused (None: it is not one, or it is allowed)."""
    origin = _header(scope, b"origin")
    if origin is not None:
        if origin.rstrip("/").lower() in state.allowed_origins:
            return None
        return (f"requests from web pages are refused (Origin: {origin[:100]}); this server serves gridtune and "
                "API clients on this machine")
    site = (_header(scope, b"sec-fetch-site") or "").lower()
    if site in REFUSED_FETCH_SITES:
        return f"requests from web pages are refused (Sec-Fetch-Site: {site})"
    return None


class _Guard:
    """Pure ASGI middleware, in front of every route, in this order:

    1. Host must be this server's own name (DNS rebinding) -> 403;
    2. no browser cross-origin request (Origin / Sec-Fetch-Site), unless allowed -> 403;
    3. the owner token or the API key as ``Authorization: Bearer`` -> 401;
    4. the body is counted while it is read, chunked or not: past the cap -> 413;
    and it tracks activity (for the idle exit) and releases a request's queue places.
    """

    def __init__(self, app: Any, state_ref: dict[str, ServerState]):
        self.app = app
        self.state_ref = state_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state_ref["state"]
        refusal = self._refuse(state, scope)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        cap, too_large = state.max_body_bytes, _too_large(state.max_body_bytes)
        if scope.get("path") == "/v1/files" and scope.get("method") == "POST":
            cap = state.files.max_bytes + UPLOAD_OVERHEAD
            too_large = APIError(413, f"the file is larger than this server's limit of {state.files.max_bytes:,} "
                                      "bytes", param="file", code="file_too_large")
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > cap):
            return await too_large.response()(scope, receive, send)
        held: list[tuple[int, int]] = []
        scope["gridtune.reserved"] = held
        state.in_flight += 1
        state.last_activity = time.monotonic()
        try:
            await self.app(scope, _capped(receive, cap, too_large), send)
        finally:
            for rows, tokens in held:
                state.reserved -= rows
                state.reserved_tokens -= tokens
            held.clear()
            state.in_flight -= 1
            state.last_activity = time.monotonic()

    @staticmethod
    def _refuse(state: ServerState, scope: dict[str, Any]) -> APIError | None:
        host = _header(scope, b"host")
        if not _host_allowed(state, scope, host):
            return APIError(403, f"this server does not answer to the host name {str(host)[:100]!r}; connect "
                                 "to it by its own address (127.0.0.1 or localhost)", code="forbidden_host")
        why = _browser_refusal(state, scope)
        if why is not None:
            return APIError(403, why, code="forbidden_origin")
        keys = [k for k in (state.token, state.api_key) if k]
        if not keys:
            scope["gridtune.auth"] = "open"
            return None
        auth = _header(scope, b"authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        # compare with every key (no early exit), in constant time
        owner = bool(state.token) and hmac.compare_digest(token.encode(), state.token.encode())
        keyed = bool(state.api_key) and hmac.compare_digest(token.encode(), state.api_key.encode())
        if owner or keyed:
            scope["gridtune.auth"] = "owner" if owner else "key"
            return None
        msg = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
               "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). gridtune's own clients read this "
               "server's token from its state file." if not token else "Incorrect API key provided.")
        return APIError(401, msg, code="invalid_api_key")


def _too_large(cap: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {cap:,} bytes",
                    code="request_too_large")


def _capped(receive: Any, cap: int, error: APIError) -> Any:
    """``receive`` that stops a body (chunked, or longer than its Content-Length) past ``cap`` bytes."""
    seen = 0

    async def capped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise error
        return message

    return capped


# -- helpers ---------------------------------------------------------------------

def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _json_body(request: Request) -> dict[str, Any]:
    """The JSON object a request carries; only ``application/json`` is read (a web page can
    send text/plain or a form without asking the browser first; it cannot send JSON)."""
    if _media_type(request) != "application/json":
        raise APIError(415, "send the request body as JSON with the header Content-Type: application/json",
                       code="unsupported_media_type")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise invalid("We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                      "using your HTTP library correctly. The OpenAI API expects a JSON payload.)") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{key} must be a number", param=key, code="invalid_type")
    if not low <= value <= high:
        raise invalid(f"{value} is not a valid {key}: it must be between {low:g} and {high:g}", param=key,
                      code="invalid_value")
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer", param=key, code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise invalid(f"{value} is not a valid {key}: it must be {bounds}", param=key, code="invalid_value")
    return value


def _sampling(body: dict[str, Any]) -> tuple[SamplingParams, int, bool, bool]:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed")
    n = _integer(body, "n", 1, MAX_N) or 1
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise invalid("stop must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop may hold at most {MAX_STOPS} sequences", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"a stop sequence may be at most {MAX_STOP_CHARS} characters", param="stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", param="stream", code="invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise invalid("stream_options must be an object", param="stream_options")
    if opts and not stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = bool(opts.get("include_usage"))
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=[s for s in stops if s], logit_bias=_logit_bias(body))
    return params, n, stream, include_usage


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as strings) to a bias from -100 (bans it) to 100."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid("logit_bias must be an object of token ids to numbers", param="logit_bias",
                      code="invalid_type")
    if len(raw) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    bias: dict[int, float] = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise invalid(f"Invalid key in 'logit_bias': {key!r} is not a token id", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid(f"Invalid value for token {key} in 'logit_bias': it must be a number from -100 to 100",
                          param="logit_bias", code="invalid_value")
        bias[int(key)] = float(value)
    return bias


def _params_for(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index`` of n: with a seed, seed+index, so choices differ yet replay."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", param=f"messages.[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid(f"messages[{i}].role {m.get('role')!r} is not supported here; use system, user or assistant",
                          param=f"messages.[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content: only text parts are supported here",
                                  param=f"messages.[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string", param=f"messages.[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _model(state: ServerState, body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", param="model")
    if not state.engine.has_model(model):
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return model


def _check_prompt(state: ServerState, prompt: list[int], param: str) -> None:
    """The engine's own refusals, raised before a stream starts (a 400, not an in-band error)."""
    if not prompt:
        raise invalid("the prompt is empty", param=param)
    if len(prompt) >= state.engine.context_length:
        raise invalid(f"the prompt is {len(prompt)} tokens; this model's context is "
                      f"{state.engine.context_length} tokens", param=param, code="context_length_exceeded")


def _check_chars(state: ServerState, chars: int, param: str) -> None:
    """A cheap bound before tokenizing: text this long cannot fit the context, so it never
    reaches the tokenizer (an 8 MB prompt once held the server for 30 s and 1 GB)."""
    limit = state.engine.context_length * PROMPT_CHARS_PER_TOKEN
    if chars > limit:
        raise invalid(f"the prompt is {chars:,} characters; this model's context is {state.engine.context_length} "
                      f"tokens, so at most {limit:,} characters are accepted", param=param,
                      code="context_length_exceeded")


def _clamp_tokens(state: ServerState, params: SamplingParams, prompt: list[int]) -> None:
    """max_tokens no larger than the room the prompt leaves in the context."""
    room = state.engine.context_length - len(prompt)
    wanted = params.max_tokens if params.max_tokens is not None else state.engine.default_max_tokens
    params.max_tokens = max(1, min(wanted, room))


def _retry_after(state: ServerState) -> int:
    """Seconds until a place in the queue is likely to free: the rows ahead share the decode
    speed measured by the engine (a cautious guess until it has measured one)."""
    st = state.engine.stats()
    load = max(int(st.get("in_flight") or 0), state.reserved, 1)
    batch = max(1, int(st.get("max_batch") or 1))
    rows = min(load, batch)
    speed = st.get("batch_tokens_per_s") if rows >= batch else None
    if not speed and st.get("stream_tokens_per_s"):
        speed = st["stream_tokens_per_s"] * rows
        if st.get("batch_tokens_per_s"):
            speed = min(speed, st["batch_tokens_per_s"])
    speed = float(speed or 10.0 * rows)
    per_row = state.reserved_tokens / state.reserved if state.reserved else state.engine.default_max_tokens
    # the first of the decoding rows ends after about half a request's tokens at its share of the speed
    return max(1, min(120, math.ceil(0.5 * per_row * rows / speed)))


def _admit(state: ServerState, request: Request, n: int, params: SamplingParams) -> None:
    """Take ``n`` places in the bounded queue for this request, or answer 429 with Retry-After.
    The places are given back when the request ends (the guard does it, whatever happens)."""
    load = max(state.engine.load, state.reserved)
    if load + n > state.max_queue:
        wait = _retry_after(state)
        raise APIError(429, f"the local server is busy: {load} completions are queued or decoding (its limit is "
                            f"{state.max_queue}); retry after {wait} s", code="rate_limit_exceeded",
                       type="rate_limit_error",
                       headers={"Retry-After": str(wait), MAX_BATCH_HEADER: str(state.engine.max_batch)})
    tokens = n * int(params.max_tokens or state.engine.default_max_tokens)
    state.reserved += n
    state.reserved_tokens += tokens
    request.scope["gridtune.reserved"].append((n, tokens))


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _until_disconnect(receive: Any) -> None:
    """Return when the client goes away (the body has been read, so the next ASGI message
    is ``http.disconnect``, sent when the connection drops or the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_abandoned(request: Request, work: Any) -> Any:
    """Await ``work`` while watching the connection; if the client leaves first, cancel the
    work (closing engine.generate marks its rows cancelled; the engine drops them within a
    decode step) and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if task.cancelled():
        raise _ClientGone()
    return task.result()


def _check_n(state: ServerState, n: int) -> None:
    if n > state.max_queue:
        raise invalid(f"{n} is not a valid n: this server queues at most {state.max_queue} completions",
                      param="n", code="invalid_value")


def _engine_error(exc: EngineError) -> APIError:
    return APIError(exc.status, str(exc), param=exc.param, code=exc.code)


async def _collect(engine: Engine, model: str, prompt: list[int], params: SamplingParams) -> tuple[str, str, int]:
    parts, reason, tokens = [], "stop", 0
    async for delta in engine.generate(model, prompt, params):
        parts.append(delta.text)
        if delta.finish_reason:
            reason, tokens = delta.finish_reason, delta.completion_tokens
    return "".join(parts), reason, tokens


async def _admitted_prompt(state: ServerState, request: Request, n: int, params: SamplingParams, chars: int,
                           param: str, build: Callable[[], list[int]]) -> list[int]:
    """Admission (n, size, queue), then the prompt's tokens from ``build`` (run in a thread),
    checked against the context and with max_tokens clamped to fit: every refusal comes
    before a stream starts, not inside it."""
    _check_n(state, n)
    _check_chars(state, chars, param)
    _admit(state, request, n, params)
    try:
        prompt = await asyncio.to_thread(build)
    except EngineError as exc:
        raise _engine_error(exc) from None
    _check_prompt(state, prompt, param)
    _clamp_tokens(state, params, prompt)
    return prompt


async def _results_unless_abandoned(request: Request, state: ServerState, model: str, prompt: list[int],
                                    params: SamplingParams, n: int) -> list[tuple[str, str, int]] | None:
    """The n results of a non-streamed request; None when the client went away first."""
    try:
        return await _unless_abandoned(request, _collect_n(state.engine, model, prompt, params, n))
    except _ClientGone:
        return None


async def _collect_n(engine: Engine, model: str, prompt: list[int], params: SamplingParams,
                     n: int) -> list[tuple[str, str, int]]:
    """n whole choices, decoded together; an engine refusal becomes an API error."""
    try:
        return await asyncio.gather(*[_collect(engine, model, prompt, _params_for(params, i)) for i in range(n)])
    except EngineError as exc:
        raise _engine_error(exc) from None


async def _merged(engine: Engine, model: str, prompt: list[int], params: SamplingParams,
                  n: int) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of n choices as they come, tagged with their index."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for delta in engine.generate(model, prompt, _params_for(params, i)):
                await out.put((i, delta))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await out.put((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(n)]
    try:
        done = 0
        while done < n:
            i, item = await out.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            if item.finish_reason:
                done += 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # every engine.generate closed: rows cancelled


def _sse_error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, EngineError):
        exc = _engine_error(exc)
    if not isinstance(exc, APIError):
        exc = APIError(500, f"generation failed: {type(exc).__name__}: {exc}")
    return {"data": json.dumps(exc.body())}


# -- routes ------------------------------------------------------------------------

def _state(request: Request) -> ServerState:
    return request.app.state.gridtune


def _model_object(state: ServerState, model_id: str) -> dict[str, Any]:
    """An OpenAI model object, plus ``gridtune``: what this server can batch and how fast it
    decodes (Engine.stats()), so a client can size its concurrency and timeouts."""
    owner = "gridtune" if model_id == state.engine.base_id else "local"
    data = Model(id=model_id, created=int(state.started_at), object="model", owned_by=owner).model_dump(
        exclude_none=True)
    data["gridtune"] = {**state.engine.stats(), "max_queue": state.max_queue,
                        "decode_path": state.engine.decoder(model_id)}  # this model's: fast or transformers
    return data


async def list_models(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"object": "list", "data": [_model_object(state, m) for m in state.engine.model_ids()]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    model_id = request.path_params["model"]
    if not state.engine.has_model(model_id):
        raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return JSONResponse(_model_object(state, model_id))


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await _json_body(request)
    model = _model(state, body)
    messages = _messages(body)
    if body.get("tools") or body.get("functions"):
        raise invalid("tools and functions are not supported by this local server", param="tools")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("logprobs are not supported by this local server", param="logprobs")
    params, n, stream, include_usage = _sampling(body)
    chars = sum(len(m["content"]) + 16 for m in messages)
    prompt = await _admitted_prompt(state, request, n, params, chars, "messages",
                                    lambda: state.engine.chat_prompt(model, messages))
    cid, created = new_id("chatcmpl"), int(time.time())
    headers = {MAX_BATCH_HEADER: str(state.engine.max_batch)}
    if not stream:
        results = await _results_unless_abandoned(request, state, model, prompt, params, n)
        if results is None:
            return Response(status_code=499)  # nobody reads it; the generation was cancelled
        return JSONResponse(_chat_body(cid, created, model, prompt, results), headers=headers)

    def chunk(choices: list[dict[str, Any]], usage: CompletionUsage | None = None) -> dict[str, str]:
        c = ChatCompletionChunk(id=cid, object="chat.completion.chunk", created=created, model=model,
                                system_fingerprint="gridtune-local", choices=choices, usage=usage)
        data = c.model_dump(mode="json", exclude_unset=True)
        if include_usage and usage is None:
            data["usage"] = None
        return {"data": json.dumps(data)}

    async def events() -> AsyncIterator[dict[str, str]]:
        total = 0
        try:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for i, delta in _merged(state.engine, model, prompt, params, n):
                if delta.text:
                    yield chunk([{"index": i, "delta": {"content": delta.text}, "finish_reason": None}])
                if delta.finish_reason:
                    total += delta.completion_tokens
                    yield chunk([{"index": i, "delta": {}, "finish_reason": delta.finish_reason}])
            if include_usage:
                yield chunk([], CompletionUsage(prompt_tokens=len(prompt), completion_tokens=total,
                                                total_tokens=len(prompt) + total))
        except Exception as exc:  # noqa: BLE001 - reported in-band, as OpenAI does
            yield _sse_error(exc)
        yield {"data": "[DONE]"}

    # On a disconnect sse-starlette cancels events(); _merged then closes every engine.generate.
    return EventSourceResponse(events(), sep="\n", headers=headers)


def _chat_body(cid: str, created: int, model: str, prompt: list[int],
               results: list[tuple[str, str, int]]) -> dict[str, Any]:
    """A non-streamed chat.completion body for ``results`` (text, finish reason, tokens)."""
    usage = CompletionUsage(prompt_tokens=len(prompt), completion_tokens=sum(r[2] for r in results),
                            total_tokens=len(prompt) + sum(r[2] for r in results))
    resp = ChatCompletion(
        id=cid, object="chat.completion", created=created, model=model, system_fingerprint="gridtune-local",
        choices=[{"index": i, "finish_reason": reason, "logprobs": None,
                  "message": {"role": "assistant", "content": text, "refusal": None}}
                 for i, (text, reason, _) in enumerate(results)],
        usage=usage,
    )
    return resp.model_dump(mode="json", exclude_unset=True)


BATCH_WAIT_S = 0.2  # how often a batch line waiting for a place in the queue looks again


async def _batch_request(state: ServerState, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One line of a batch: the checks, queue and engine of /v1/chat/completions, except
    that a full queue is waited out (a batch has 24 hours) instead of answered with 429.
    Returns (status, body) as the endpoint would have answered."""
    try:
        model = _model(state, body)
        messages = _messages(body)
        if body.get("tools") or body.get("functions"):
            raise invalid("tools and functions are not supported by this local server", param="tools")
        params, n, stream, _usage = _sampling(body)
        if stream:
            raise invalid("stream is not allowed in a batch request", param="stream")
        _check_n(state, n)
        _check_chars(state, sum(len(m["content"]) + 16 for m in messages), "messages")
        while max(state.engine.load, state.reserved) + n > state.max_queue:
            await asyncio.sleep(BATCH_WAIT_S)
        tokens = n * int(params.max_tokens or state.engine.default_max_tokens)
        state.reserved += n
        state.reserved_tokens += tokens
        try:
            try:
                prompt = await asyncio.to_thread(state.engine.chat_prompt, model, messages)
            except EngineError as exc:
                raise _engine_error(exc) from None
            _check_prompt(state, prompt, "messages")
            _clamp_tokens(state, params, prompt)
            results = await _collect_n(state.engine, model, prompt, params, n)
        finally:
            state.reserved -= n
            state.reserved_tokens -= tokens
        return 200, _chat_body(new_id("chatcmpl"), int(time.time()), model, prompt, results)
    except APIError as exc:
        return exc.status, exc.body()


async def completions(request: Request) -> Response:
    state = _state(request)
    body = await _json_body(request)
    model = _model(state, body)
    prompt_in = body.get("prompt")
    if isinstance(prompt_in, list) and len(prompt_in) == 1 and isinstance(prompt_in[0], str):
        prompt_in = prompt_in[0]
    if not isinstance(prompt_in, str):
        raise invalid("prompt must be a string (one prompt per request here)", param="prompt")
    if body.get("echo") or body.get("logprobs") or (_integer(body, "best_of", 1) or 1) > 1:
        raise invalid("echo, logprobs and best_of are not supported by this local server", param="echo")
    if body.get("suffix"):
        raise invalid("suffix is not supported by this local server", param="suffix")
    params, n, stream, include_usage = _sampling(body)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        params.max_tokens = 16  # the legacy endpoint's documented default
    text = prompt_in
    prompt = await _admitted_prompt(state, request, n, params, len(text), "prompt",
                                    lambda: state.engine.text_prompt(model, text))
    cid, created = new_id("cmpl"), int(time.time())
    headers = {MAX_BATCH_HEADER: str(state.engine.max_batch)}
    if not stream:
        results = await _results_unless_abandoned(request, state, model, prompt, params, n)
        if results is None:
            return Response(status_code=499)
        done = sum(r[2] for r in results)
        resp = Completion(
            id=cid, object="text_completion", created=created, model=model, system_fingerprint="gridtune-local",
            choices=[{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                     for i, (text, reason, _) in enumerate(results)],
            usage=CompletionUsage(prompt_tokens=len(prompt), completion_tokens=done, total_tokens=len(prompt) + done),
        )
        return JSONResponse(resp.model_dump(mode="json", exclude_unset=True), headers=headers)

    def chunk(choices: list[dict[str, Any]], usage: CompletionUsage | None = None) -> dict[str, str]:
        c = Completion(id=cid, object="text_completion", created=created, model=model, choices=[], usage=usage)
        data = c.model_dump(mode="json", exclude_unset=True)
        data["choices"] = choices
        return {"data": json.dumps(data)}

    async def events() -> AsyncIterator[dict[str, str]]:
        total = 0
        try:
            async for i, delta in _merged(state.engine, model, prompt, params, n):
                if delta.text or delta.finish_reason:
                    yield chunk([{"index": i, "text": delta.text, "finish_reason": delta.finish_reason,
                                  "logprobs": None}])
                if delta.finish_reason:
                    total += delta.completion_tokens
            if include_usage:
                yield chunk([], CompletionUsage(prompt_tokens=len(prompt), completion_tokens=total,
                                                total_tokens=len(prompt) + total))
        except Exception as exc:  # noqa: BLE001
            yield _sse_error(exc)
        yield {"data": "[DONE]"}

    # On a disconnect sse-starlette cancels events(); _merged then closes every engine.generate.
    return EventSourceResponse(events(), sep="\n", headers=headers)


# -- files ---------------------------------------------------------------------------

def _file(meta: dict[str, Any]) -> dict[str, Any]:
    return FileObject.model_validate(meta).model_dump(mode="json", exclude_none=True)


async def upload_file(request: Request) -> Response:
    state = _state(request)
    if _media_type(request) != "multipart/form-data":
        raise APIError(415, "upload the file as multipart/form-data with the fields 'file' and 'purpose'",
                       param="file", code="unsupported_media_type")
    # The guard caps the body at the file limit plus the multipart framing (413 past it).
    try:
        async with request.form(max_files=1, max_fields=16) as form:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise invalid("you must provide a purpose", param="purpose")
            if upload is None or isinstance(upload, str):
                raise invalid("you must provide a file", param="file")
            meta = await asyncio.to_thread(state.files.create, upload.file, filename=upload.filename or "upload",
                                           purpose=purpose)
    except HTTPException as exc:  # the multipart parser's own limits
        raise invalid(f"could not read the upload: {exc.detail}", param="file") from None
    return JSONResponse(_file(meta))


async def list_files(request: Request) -> Response:
    state = _state(request)
    purpose = request.query_params.get("purpose")
    data = [_file(m) for m in state.files.list(purpose)]
    after = request.query_params.get("after")
    if after:
        ids = [d["id"] for d in data]
        data = data[ids.index(after) + 1:] if after in ids else []
    limit = _limit(request, 10000)
    return JSONResponse({"object": "list", "data": data[:limit], "has_more": len(data) > limit,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[:limit][-1]["id"] if data else None})


async def get_file(request: Request) -> Response:
    return JSONResponse(_file(_state(request).files.get(request.path_params["file_id"])))


async def file_content(request: Request) -> Response:
    from starlette.responses import FileResponse

    state = _state(request)
    path = state.files.path(request.path_params["file_id"])
    return FileResponse(path, media_type="application/octet-stream")


async def delete_file(request: Request) -> Response:
    return JSONResponse(_state(request).files.delete(request.path_params["file_id"]))


# -- fine-tuning -----------------------------------------------------------------------

def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid("limit must be an integer", param="limit") from None
    if not 1 <= value <= 10000:
        raise invalid("limit must be between 1 and 10000", param="limit")
    return value


async def create_job(request: Request) -> Response:
    body = await _json_body(request)
    return JSONResponse(_state(request).jobs.create(body))


async def list_jobs(request: Request) -> Response:
    data, more = _state(request).jobs.list(request.query_params.get("after"), _limit(request))
    return JSONResponse({"object": "list", "data": data, "has_more": more})


async def get_job(request: Request) -> Response:
    jobs = _state(request).jobs
    return JSONResponse(jobs.public(jobs.get(request.path_params["job_id"])))


async def job_events(request: Request) -> Response:
    data, more = _state(request).jobs.events(request.path_params["job_id"], request.query_params.get("after"),
                                             _limit(request))
    return JSONResponse({"object": "list", "data": data, "has_more": more})


async def job_checkpoints(request: Request) -> Response:
    data, more = _state(request).jobs.checkpoints(request.path_params["job_id"], request.query_params.get("after"),
                                                  _limit(request, 10))
    return JSONResponse({"object": "list", "data": data, "has_more": more,
                         "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


async def cancel_job(request: Request) -> Response:
    return JSONResponse(await _state(request).jobs.cancel(request.path_params["job_id"]))


def _export_target(state: ServerState, request: Request, out: str) -> tuple[Path, bool]:
    """Where export_model may write, and whether that is under the export root.

    Under the root (default DATA/exports; a relative output_dir is taken from there) any
    authenticated caller may write a new directory. Anywhere else only the owner may, which
    the server knows by the token: it is generated at start, never leaves the process but
    into the state file, which is 0600 in a 0700 directory, so only a process running as
    this user (or root) can have read it. A key given with --api-key proves nothing of the
    kind (it may be shared, sent over the network), nor does a missing key; and a web page
    can have neither (Host and Origin checks aside). The caller must also be on this
    machine. gridtune's own command line and TUI send the token; they are the owner's.
    """
    if "\x00" in out:
        raise invalid("output_dir is not a valid path", param="output_dir")
    root = Path(os.path.realpath(state.export_root or Path.cwd() / "exports"))
    target = Path(out)
    if not target.is_absolute():
        target = root / target
    resolved = Path(os.path.realpath(target))  # symlinks and '..' resolved: no escape through them
    inside = resolved != root and resolved.is_relative_to(root)
    if inside:
        return resolved, True
    # ("open": a server built in-process with neither token nor key, by the process that
    # owns it; `gridtune serve` never runs so.)
    client = request.client.host if request.client else ""
    if request.scope.get("gridtune.auth") not in ("owner", "open") or not is_loopback(client):
        raise APIError(403, f"output_dir {resolved} is outside this server's export directory {root}; export "
                            "there (a relative output_dir is taken from it), or run `gridtune export-model` as "
                            "the user who runs the server, on its machine", param="output_dir",
                       code="forbidden_path")
    return resolved, False


async def export_model(request: Request) -> Response:
    """gridtune's own: write a fine-tuned model on this machine for another engine: a merged
    Hugging Face directory (``to`` hf, the default), a GGUF (gguf), a GGUF with an Ollama
    Modelfile (ollama) or a PEFT adapter for vLLM (vllm); see exits.export_model. Answers what
    it wrote and the commands that run it. Every refusal is a 4xx that names its reason (the
    client does not retry it)."""
    from .exits import TARGETS, export_model as export
    from .merge import ExportTargetError
    from .model import ModelError

    state = _state(request)
    body = await _json_body(request)
    model = body.get("model")
    out = body.get("output_dir")
    to = body.get("to", "hf")
    quant = body.get("quant")
    if not isinstance(model, str) or not model:
        raise invalid("give the model to export", param="model")
    if not isinstance(out, str) or not out:
        raise invalid("give output_dir, the directory to write", param="output_dir")
    if to not in TARGETS:
        raise invalid(f"to must be one of {', '.join(TARGETS)}", param="to")
    if quant is not None and not isinstance(quant, str):
        raise invalid("quant must be a string such as 'q8_0'", param="quant")
    target, inside = _export_target(state, request, out)
    job = state.jobs.job_for_model(model)
    if inside:
        private_dir(Path(os.path.realpath(state.export_root or Path.cwd() / "exports")))
    result = Path(job["local"]["result_dir"])
    try:
        exported = await asyncio.to_thread(export, result, target, to=to, base=state.jobs.base_model_source,
                                           quant=quant, model_id=model, profile=state.jobs.profile(job),
                                           make_parents=inside)
    except ExportTargetError as exc:
        raise invalid(str(exc), param="output_dir", code="invalid_output_dir") from None
    except PermissionError as exc:
        raise APIError(403, f"cannot write {target}: {exc.strerror or exc}", param="output_dir",
                       code="forbidden_path") from None
    except OSError as exc:
        raise invalid(f"cannot write {target}: {exc.strerror or exc}", param="output_dir",
                      code="invalid_output_dir") from None
    except ModelError as exc:
        raise APIError(500, f"could not export {model}: {exc}", headers={"x-should-retry": "false"}) from None
    return JSONResponse({"object": "model.export", "model": model, **exported.to_dict()})


# -- batches -------------------------------------------------------------------------------

def _batches(request: Request) -> BatchManager:
    batches = _state(request).batches
    if batches is None:
        raise APIError(404, "this server has no batches")
    return batches


async def create_batch(request: Request) -> Response:
    body = await _json_body(request)
    return JSONResponse(_batches(request).create(body))


async def list_batches(request: Request) -> Response:
    data, more = _batches(request).list(request.query_params.get("after"), _limit(request))
    return JSONResponse({"object": "list", "data": data, "has_more": more,
                         "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


async def get_batch(request: Request) -> Response:
    batches = _batches(request)
    return JSONResponse(batches.public(batches.get(request.path_params["batch_id"])))


async def cancel_batch(request: Request) -> Response:
    return JSONResponse(await _batches(request).cancel(request.path_params["batch_id"]))


# -- the app -------------------------------------------------------------------------------

async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        msg = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        msg = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        msg = str(exc.detail)
    return APIError(exc.status_code, msg).response()


async def _engine_exc(request: Request, exc: EngineError) -> Response:
    return _engine_error(exc).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return APIError(500, f"The server had an error while processing your request: {type(exc).__name__}").response()


def create_app(state: ServerState, *, on_startup: list | None = None, on_shutdown: list | None = None) -> Starlette:
    """The Starlette app around ``state``; its lifespan starts the engine and the job queue."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.engine.start()
        await state.jobs.start()
        if state.batches is not None:
            await state.batches.start()
        # The model is loaded and its speed measured (a second or two) before the server
        # announces itself: the first client then gets real figures for its estimate.
        await asyncio.to_thread(state.engine.wait_ready, 300)
        for fn in on_startup or []:
            await fn()
        try:
            yield
        finally:
            for fn in on_shutdown or []:
                await fn()
            if state.batches is not None:
                await state.batches.close()
            await state.jobs.close()
            await asyncio.to_thread(state.engine.close)

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/files", upload_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
        Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", job_checkpoints, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/gridtune/export_model", export_model, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, EngineError: _engine_exc,
                            Exception: _server_error},
    )
    app.state.gridtune = state
    app.add_middleware(_Guard, state_ref={"state": state})
    return app


def build_state(loaded: Any, data_dir: Path, *, api_key: str | None = None, token: str | None = None,
                base_source: str | None = None, max_upload_bytes: int = DEFAULT_MAX_BYTES,
                max_files_bytes: int = DEFAULT_QUOTA_BYTES, max_batch: int = 32, max_queue: int | None = None,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, export_root: Path | None = None,
                allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = ()) -> ServerState:
    """Engine, file store and job manager for ``loaded`` with data under ``data_dir``.

    ``gridtune serve`` always passes a ``token``; with neither token nor api_key the server
    asks for no key (only for servers embedded in a process, such as tests)."""
    engine = Engine(loaded, max_batch=max_batch)
    files = FileStore(Path(data_dir) / "files", max_bytes=max_upload_bytes, quota_bytes=max_files_bytes)
    jobs = JobManager(Path(data_dir), files, base_model_id=engine.base_id,
                      base_model_source=base_source or loaded.name, on_model=engine.register_tuned)
    state = ServerState(engine=engine, files=files, jobs=jobs, api_key=api_key, token=token,
                       max_queue=max_queue if max_queue else 4 * max_batch, max_body_bytes=max_body_bytes,
                       export_root=Path(export_root) if export_root else Path(data_dir) / "exports",
                       allowed_hosts=frozenset(h.strip().lower() for h in allowed_hosts if h.strip()),
                       allowed_origins=frozenset(o.strip().rstrip("/").lower() for o in allowed_origins
                                                 if o.strip()))
    batches = BatchManager(Path(data_dir), files, lambda body: _batch_request(state, body),
                           concurrency=lambda: engine.max_batch)
    state.batches = batches

    def references() -> dict[str, bool]:  # a file an active job or batch needs is never deleted for room
        refs = jobs.file_refs()
        for file_id, needed in batches.file_refs().items():
            refs[file_id] = refs.get(file_id, False) or needed
        return refs

    files.references = references
    return state
