"""Prompting a model once: the CLI's `ask` and the playground both come here.

Chat by default; legacy completions (``prompt=``) for models tuned on
prompt/completion pairs, which expect the training separator at the end of the
prompt. One streaming path serves both, ending with the finish reason, which
tells the playground whether the reply ran to max tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai

from ...core.chat import chat_messages
from .backend import Backend
from .calls import CallError, wrap


@dataclass
class Piece:
    """One streamed piece of a reply; the last one has ``done`` and ``finish_reason``."""

    text: str = ""
    finish_reason: str | None = None
    done: bool = False


def _sampling(stop: list[str] | str | None, temperature: float | None, max_tokens: int | None,
              seed: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if stop:
        out["stop"] = stop
    if temperature is not None:
        out["temperature"] = temperature
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if seed is not None:
        out["seed"] = seed
    return out


def stream_pieces(backend: Backend, model: str, *, messages: list[dict[str, str]] | None = None,
                  prompt: str | None = None, stop: list[str] | str | None = None,
                  temperature: float | None = None, max_tokens: int | None = None,
                  seed: int | None = None) -> Iterator[Piece]:
    """Stream a reply (blocking; run it in a thread): text pieces, then a final
    ``Piece(done=True, finish_reason=...)``. Give ``messages`` for chat or
    ``prompt`` for the legacy completions endpoint."""
    if (messages is None) == (prompt is None):
        raise ValueError("give either messages (chat) or prompt (legacy completions)")
    kwargs = {"model": model, "stream": True, **_sampling(stop, temperature, max_tokens, seed)}
    legacy = prompt is not None
    finish: str | None = None
    chunks = 0
    try:
        with backend.client() as client:
            if legacy:
                stream = client.completions.create(prompt=prompt, **kwargs)
            else:
                stream = client.chat.completions.create(messages=messages, **kwargs)
            with stream:
                for chunk in stream:
                    chunks += 1
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    text = choice.text if legacy else choice.delta.content
                    if text:
                        yield Piece(text)
                    finish = choice.finish_reason or finish
    except openai.OpenAIError as exc:
        raise wrap(f"asking {model}", exc, backend) from None
    if not chunks:  # a server that ignores stream=true answers with one JSON body the client cannot read
        raise CallError(f"asking {model}: the server sent no streamed reply (does it support stream=true?)")
    yield Piece(finish_reason=finish, done=True)


def ask(backend: Backend, model: str, prompt: str, *, stop: list[str] | str | None = None,
        temperature: float | None = None, max_tokens: int | None = None, stream: bool = False,
        system: str | None = None, legacy: bool = False, seed: int | None = None) -> Any:
    """Prompt ``model``: the reply text, or (``stream``) an iterator of text pieces."""
    if stream:
        target = {"prompt": prompt} if legacy else {"messages": chat_messages(prompt, system)}
        pieces = stream_pieces(backend, model, stop=stop, temperature=temperature, max_tokens=max_tokens,
                               seed=seed, **target)
        return (p.text for p in pieces if p.text)
    kwargs = {"model": model, **_sampling(stop, temperature, max_tokens, seed)}
    try:
        with backend.client() as client:
            if legacy:
                return client.completions.create(prompt=prompt, **kwargs).choices[0].text
            resp = client.chat.completions.create(messages=chat_messages(prompt, system), **kwargs)
            return resp.choices[0].message.content or ""
    except openai.OpenAIError as exc:
        raise wrap(f"asking {model}", exc, backend) from None


__all__ = ["CallError", "Piece", "ask", "chat_messages", "stream_pieces"]
