"""The OpenAI-compatible HTTP app (Starlette): models, chat and legacy completions,
files and fine-tuning jobs. Wire shapes come from the ``openai`` package's types.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from openai.types import Completion, CompletionUsage, FileObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import Delta, Engine, EngineError, SamplingParams, new_id
from .errors import APIError, invalid
from .files import DEFAULT_MAX_BYTES, FileStore
from .jobs import JobManager

log = logging.getLogger("gridtune.server")

MAX_N = 16
MAX_STOPS = 4


@dataclass
class ServerState:
    engine: Engine
    files: FileStore
    jobs: JobManager
    api_key: str | None = field(default=None, repr=False)
    started_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)
    in_flight: int = 0

    @property
    def idle_for(self) -> float:
        """Seconds with no request in flight, no job queued or running and no generation
        (counted from the end of the last job, not from the last request before it)."""
        if self.in_flight or self.jobs.active or self.engine.busy:
            self.last_activity = time.monotonic()
            return 0.0
        return time.monotonic() - self.last_activity


class _Guard:
    """Pure ASGI middleware: the API key check and activity tracking (for the idle exit)."""

    def __init__(self, app: Any, state_ref: dict[str, ServerState]):
        self.app = app
        self.state_ref = state_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state_ref["state"]
        if state.api_key:
            auth = ""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    auth = value.decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                msg = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                       "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)." if not token
                       else "Incorrect API key provided.")
                resp = APIError(401, msg, code="invalid_api_key").response()
                return await resp(scope, receive, send)
        state.in_flight += 1
        state.last_activity = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            state.last_activity = time.monotonic()


# -- helpers ---------------------------------------------------------------------

async def _json_body(request: Request) -> dict[str, Any]:
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
                            stop=[s for s in stops if s])
    return params, n, stream, include_usage


def _params_for(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index`` of n: with a seed, seed+index, so choices differ yet replay."""
    if params.seed is None or index == 0:
        return params
    return SamplingParams(params.max_tokens, params.temperature, params.top_p, params.seed + index, params.stop)


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


def _engine_error(exc: EngineError) -> APIError:
    return APIError(exc.status, str(exc), param=exc.param, code=exc.code)


async def _collect(engine: Engine, model: str, prompt: list[int], params: SamplingParams) -> tuple[str, str, int]:
    parts, reason, tokens = [], "stop", 0
    async for delta in engine.generate(model, prompt, params):
        parts.append(delta.text)
        if delta.finish_reason:
            reason, tokens = delta.finish_reason, delta.completion_tokens
    return "".join(parts), reason, tokens


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


def _sse_error(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, EngineError):
        exc = _engine_error(exc)
    if not isinstance(exc, APIError):
        exc = APIError(500, f"generation failed: {type(exc).__name__}: {exc}")
    return {"data": json.dumps(exc.body())}


# -- routes ------------------------------------------------------------------------

def _state(request: Request) -> ServerState:
    return request.app.state.gridtune


async def list_models(request: Request) -> Response:
    state = _state(request)
    created = int(state.started_at)
    data = []
    for model_id in state.engine.model_ids():
        owner = "gridtune" if model_id == state.engine.base_id else "local"
        data.append(Model(id=model_id, created=created, object="model", owned_by=owner).model_dump(exclude_none=True))
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state = _state(request)
    model_id = request.path_params["model"]
    if not state.engine.has_model(model_id):
        raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    owner = "gridtune" if model_id == state.engine.base_id else "local"
    return JSONResponse(Model(id=model_id, created=int(state.started_at), object="model",
                              owned_by=owner).model_dump(exclude_none=True))


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
    try:
        prompt = await asyncio.to_thread(state.engine.chat_prompt, model, messages)
    except EngineError as exc:
        raise _engine_error(exc) from None
    cid, created = new_id("chatcmpl"), int(time.time())
    if not stream:
        results = await _collect_n(state.engine, model, prompt, params, n)
        usage = CompletionUsage(prompt_tokens=len(prompt), completion_tokens=sum(r[2] for r in results),
                                total_tokens=len(prompt) + sum(r[2] for r in results))
        resp = ChatCompletion(
            id=cid, object="chat.completion", created=created, model=model, system_fingerprint="gridtune-local",
            choices=[{"index": i, "finish_reason": reason, "logprobs": None,
                      "message": {"role": "assistant", "content": text, "refusal": None}}
                     for i, (text, reason, _) in enumerate(results)],
            usage=usage,
        )
        return JSONResponse(resp.model_dump(mode="json", exclude_unset=True))

    _check_prompt(state, prompt, "messages")  # fail before the stream starts, not inside it

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

    return EventSourceResponse(events(), sep="\n")


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
    try:
        prompt = await asyncio.to_thread(state.engine.text_prompt, model, prompt_in)
    except EngineError as exc:
        raise _engine_error(exc) from None
    _check_prompt(state, prompt, "prompt")
    cid, created = new_id("cmpl"), int(time.time())
    if not stream:
        results = await _collect_n(state.engine, model, prompt, params, n)
        done = sum(r[2] for r in results)
        resp = Completion(
            id=cid, object="text_completion", created=created, model=model, system_fingerprint="gridtune-local",
            choices=[{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                     for i, (text, reason, _) in enumerate(results)],
            usage=CompletionUsage(prompt_tokens=len(prompt), completion_tokens=done, total_tokens=len(prompt) + done),
        )
        return JSONResponse(resp.model_dump(mode="json", exclude_unset=True))

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

    return EventSourceResponse(events(), sep="\n")


# -- files ---------------------------------------------------------------------------

def _file(meta: dict[str, Any]) -> dict[str, Any]:
    return FileObject.model_validate(meta).model_dump(mode="json", exclude_none=True)


async def upload_file(request: Request) -> Response:
    state = _state(request)
    limit = state.files.max_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 64 * 1024:
        raise APIError(413, f"the file is larger than this server's limit of {limit:,} bytes", param="file",
                       code="file_too_large")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise invalid("upload the file as multipart/form-data with the fields 'file' and 'purpose'", param="file")
    request = Request(request.scope, _capped(request.receive, limit + 64 * 1024, limit))
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


def _capped(receive: Any, cap: int, limit: int) -> Any:
    """``receive`` that stops reading a body (chunked, or lying about its length) past ``cap`` bytes."""
    seen = 0

    async def capped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise APIError(413, f"the file is larger than this server's limit of {limit:,} bytes", param="file",
                               code="file_too_large")
        return message

    return capped


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


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def export_model(request: Request) -> Response:
    """gridtune's own: merge a fine-tuned model into a Hugging Face directory on this machine."""
    state = _state(request)
    # It writes a directory on the server's disk: only for a client on this machine.
    client = request.client.host if request.client else ""
    if not _is_loopback(client):
        raise APIError(403, "export_model writes to the server's disk and is only allowed from this machine",
                       type="invalid_request_error", code="forbidden")
    body = await _json_body(request)
    model = body.get("model")
    out = body.get("output_dir")
    if not isinstance(model, str) or not isinstance(out, str) or not out:
        raise invalid("give model and output_dir", param="model")
    job = state.jobs.job_for_model(model)
    result = Path(job["local"]["result_dir"])
    from .merge import export_merged

    path = await asyncio.to_thread(export_merged, state.jobs.base_model_source, result, Path(out))
    return JSONResponse({"object": "model.export", "model": model, "output_dir": str(path)})


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
        for fn in on_startup or []:
            await fn()
        try:
            yield
        finally:
            for fn in on_shutdown or []:
                await fn()
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


def build_state(loaded: Any, data_dir: Path, *, api_key: str | None = None, base_source: str | None = None,
                max_upload_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = 32) -> ServerState:
    """Engine, file store and job manager for ``loaded`` with data under ``data_dir``."""
    engine = Engine(loaded, max_batch=max_batch)
    files = FileStore(Path(data_dir) / "files", max_bytes=max_upload_bytes)
    jobs = JobManager(Path(data_dir), files, base_model_id=engine.base_id,
                      base_model_source=base_source or loaded.name, on_model=engine.register_tuned)
    return ServerState(engine=engine, files=files, jobs=jobs, api_key=api_key)
