"""Shared test setup: every test runs with its own gridtune home, offline.

Area-specific fixtures live in their own modules and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The local server decodes in fp32 in tests: bf16 results depend on the batch a row
# shares (as on every batched server), which would make replay tests flaky.
# tests/test_fast_decode.py covers bf16 explicitly.
os.environ.setdefault("GRIDTUNE_DTYPE", "float32")


@pytest.fixture(autouse=True)
def _steady_cursors(monkeypatch):
    """Cursors do not blink in tests: a blinking cursor is two pictures, and a snapshot
    taken on a loaded machine would catch either."""
    from textual.widgets import Input, TextArea

    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)
    monkeypatch.setattr(TextArea, "_toggle_cursor_blink_visible", lambda self: None)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, request):
    """Each test gets a fresh GRIDTUNE_HOME and no OpenAI settings from the caller's shell.

    The model cache (GRIDTUNE_CACHE) is left alone when the caller set it, so the
    real default model is fetched once, not once per test.
    """
    home = tmp_path_factory.mktemp("gridtune-home")
    monkeypatch.setenv("GRIDTUNE_HOME", str(home))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("GRIDTUNE_LOCAL_MODEL", raising=False)
    if request.module.__name__.rsplit(".", 1)[-1].startswith("test_snapshots_"):
        # A screen's picture must not depend on what an earlier test cached (the export
        # report counts tokens with the local model's own tokenizer once it is there).
        monkeypatch.setenv("GRIDTUNE_CACHE", str(tmp_path_factory.mktemp("empty-cache")))
    yield home
    _stop_servers_under(home)


def _stop_servers_under(home: Path) -> None:
    """A test that auto-started a local server must not leave it running:
    kill any server whose state file lies in this test's home."""
    for state in home.rglob("server.json"):
        try:
            pid = int(json.loads(state.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

from tests.fakeserver import fake_openai, fake_openai_server  # noqa: E402,F401  (the OpenAI fake)
