"""Backend selection by environment, and what of it may be written down."""

from __future__ import annotations

import pytest

from gridtune.pipeline.client.backend import OPENAI_URL, Backend
from gridtune.pipeline.client.resolve import resolve_backend


def test_base_url_selects_a_compatible_server(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1/")
    b = resolve_backend(start_local=False)
    assert (b.kind, b.base_url) == ("compatible", "http://127.0.0.1:8000/v1")


def test_key_alone_selects_openai(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    b = resolve_backend(start_local=False)
    assert (b.kind, b.base_url, b.default_model) == ("openai", OPENAI_URL, "gpt-4o-mini")
    assert "sk-test" not in repr(b)  # the key never shows in a repr, a log line or a traceback


@pytest.mark.parametrize("url, public", [
    ("https://user:secret@llm.example.com:8443/v1?api-key=abc", "https://llm.example.com:8443/v1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
])
def test_public_url_drops_credentials_and_query(url, public):
    assert Backend("compatible", url, "k").public_url == public


def test_redact_masks_a_key_echoed_in_an_error():
    b = Backend("openai", OPENAI_URL, "sk-live-abcdefghijklmnop")
    assert b.redact("Incorrect API key provided: sk-live-abcdefghijklmnop.") == "Incorrect API key provided: sk-...op."
