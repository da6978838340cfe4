"""What a server's answer is and what is worth retrying: the reply a chat completion
gives, the errors that are transient, their one-line description, and the retry
policy (Retry-After honoured, backoff with jitter, 429s waited out as a queue).
Shared by the generation runner, the judge and the eval's request pool."""

from __future__ import annotations

import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Protocol

import openai

PERMANENT_STATUS = {400, 401, 403, 404, 422}
TRANSIENT_STATUS = {408, 409, 429}
RETRY_AFTER_MAX_S = 120.0  # a server asking for longer is honoured only this far per attempt
RATE_LIMIT_WAIT_S = 3600.0  # 429s (a full queue, a rate limit) are not failed attempts: only this much time ends them


# -- errors: what is worth retrying -----------------------------------------------


class MalformedResponse(Exception):
    """The server answered 200 with something that is not a usable completion."""


class StreamError(Exception):
    """The server reported an error inside a stream it had started (after the 200)."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return not _insufficient_quota(exc)
        return exc.status_code in TRANSIENT_STATUS or exc.status_code >= 500
    # Timeouts are APIConnectionError too; a 200 with a broken body is MalformedResponse.
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, MalformedResponse,
                            StreamError))


def retry_kind(exc: BaseException | None) -> str:
    """Why a transient failure is retried, as a key of progress.RETRY_KINDS."""
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return "rate_limited"
        if exc.status_code >= 500:
            return "server_error"
        return "other"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, (openai.APIResponseValidationError, MalformedResponse)):
        return "malformed"
    if isinstance(exc, StreamError):
        return "server_error"
    return "other"


def _insufficient_quota(exc: openai.APIStatusError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    return "insufficient_quota" in (exc.code, body.get("type"))


def describe(exc: BaseException) -> str:
    """A one-line reason to store with a failed completion."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or (exc.body if isinstance(exc.body, str) else "") or exc.message
        code = f" [{exc.code}]" if exc.code else ""
        return f"HTTP {exc.status_code}{code}: {' '.join(str(message).split())[:300]}"
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"connection error: {cause or exc.message}"
    if isinstance(exc, (openai.APIResponseValidationError, MalformedResponse)):
        return f"malformed response: {exc}"
    if isinstance(exc, StreamError):
        return f"error in the stream: {' '.join(str(exc).split())[:300]}"
    return f"{type(exc).__name__}: {exc}"


def retry_after_s(exc: BaseException | None) -> float | None:
    """The server's requested wait: retry-after-ms, else Retry-After (seconds or a date)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) / scale, 0.0)
        except ValueError:
            pass
    date = headers.get("retry-after")
    if date:
        parsed = email.utils.parsedate_tz(date)
        if parsed is not None:
            return max(email.utils.mktime_tz(parsed) - time.time(), 0.0)
    return None


def _rate_limited(exc: BaseException | None) -> bool:
    """A 429 that asks us to wait (not one saying the quota is spent)."""
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429 and not _insufficient_quota(exc)


def backoff_s(failures: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter after ``failures`` (1, 2, ...) failed attempts."""
    return min(maximum, initial * 2 ** (max(failures, 1) - 1)) + random.random() * initial


class _Tries(Protocol):
    busy: int  # 429s of a rate limit, waited out
    failures: int  # other transient failures
    first_sent: float | None


class _RetryPolicy(Protocol):
    @property
    def max_attempts(self) -> int: ...
    @property
    def rate_limit_wait_s(self) -> float: ...
    @property
    def backoff_initial_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...


def retry_delay_s(tries: _Tries, exc: Exception, policy: _RetryPolicy) -> float | None:
    """How long a request waits after the transient failure ``exc`` before its next
    try; None: no more tries. A rate limit (429) is a queue, not a fault: only the
    total time bound since the first send ends it; other failures count against
    max_attempts. The server's Retry-After is honoured (up to RETRY_AFTER_MAX_S, with
    a little jitter so waiters do not return in lockstep), else exponential backoff.
    Shared by the generation runner and the judge/eval request pool."""
    if _rate_limited(exc):
        tries.busy += 1
        if time.monotonic() - (tries.first_sent or 0.0) >= policy.rate_limit_wait_s:
            return None
        count = tries.busy
    else:
        tries.failures += 1
        if tries.failures >= policy.max_attempts:
            return None
        count = tries.failures
    asked = retry_after_s(exc)
    if asked is None:
        return backoff_s(count, policy.backoff_initial_s, policy.backoff_max_s)
    return min(asked, RETRY_AFTER_MAX_S) * (1 + random.random() * 0.1)


@dataclass(frozen=True)
class Reply:
    """What a chat completion response gives us to store."""

    text: str
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    chunks: int = 0  # streamed content pieces (a stand-in for tokens in progress when usage is missing)


def parse_reply(raw: bytes | str) -> Reply:
    """The first choice of a chat.completion body; MalformedResponse if it has none."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise MalformedResponse(f"not JSON ({exc})") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise MalformedResponse("no choices in the response")
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise MalformedResponse("the first choice has no message content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    model = data.get("model")

    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) else None

    return Reply(text, choices[0].get("finish_reason"), model if isinstance(model, str) else None,
                 count("prompt_tokens"), count("completion_tokens"))
