"""Chat messages in the OpenAI shape."""

from __future__ import annotations


def chat_messages(user: str, system: str | None = None) -> list[dict[str, str]]:
    """A system message (when there is one) followed by the user's."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
