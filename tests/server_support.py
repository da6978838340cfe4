"""Helpers for the local-server tests: a tiny model with varied greedy output, and
servers run in-process (a thread) or as a real `gridtune serve` subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_model


def make_varied_model(path: Path) -> Path:
    """The tiny model with its weights scaled up, so greedy decoding wanders through the
    vocabulary instead of repeating one token: stop strings then have something to cut."""
    import torch
    from transformers import AutoModelForCausalLM

    make_tiny_model(path, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_varied_model(tmp_path_factory.mktemp("models") / "tiny-varied")


class InProcessServer:
    """The real app under uvicorn in a background thread, on a free loopback port.

    ``token``: the owner token every request must carry (``gridtune serve`` always has one);
    None (the default here) makes an open server, for tests about other things. ``state_kw``
    go to build_state (max_queue, max_batch, max_body_bytes, export_root, ...)."""

    def __init__(self, model_dir: Path | None, data_dir: Path, *, api_key: str | None = None,
                 token: str | None = None, max_upload_bytes: int = 512 * 1024 * 1024, **state_kw):
        import uvicorn

        from gridtune.server.app import build_state, create_app
        from gridtune.server.model import load_model

        self.loaded = load_model(str(model_dir) if model_dir else None)  # None: the default model
        self.token = token
        self.api_key = api_key
        self.state = build_state(self.loaded, data_dir, api_key=api_key, token=token,
                                 base_source=str(model_dir) if model_dir else None,
                                 max_upload_bytes=max_upload_bytes, **state_kw)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = self.loaded.name
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, **kwargs)

    @property
    def key(self) -> str:
        """What a client sends as its bearer token."""
        return self.token or self.api_key or "test"

    def write_state(self, data_dir: Path) -> None:
        """Make this server the user's local server for gridtune's discovery (server.json)."""
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = {"pid": os.getpid(), "host": "127.0.0.1", "port": self.port, "base_url": self.base_url,
                 "model": self.model, "started_at": time.time()}
        if self.token:
            state["token"] = self.token
        path = data_dir / "server.json"
        path.write_text(json.dumps(state))
        path.chmod(0o600)


@pytest.fixture
def local(tiny_model_dir, tmp_path, _isolated_home):
    """The tiny model on an in-process server that the command line finds as the local
    backend (its state file where `gridtune` looks); import it with tiny_model_dir."""
    with InProcessServer(tiny_model_dir, tmp_path / "srv") as srv:
        srv.write_state(_isolated_home / "server")
        yield srv
        (_isolated_home / "server" / "server.json").unlink(missing_ok=True)


def gridtune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from gridtune.cli.main import main; main()", *args]


@contextlib.contextmanager
def serve_subprocess(model_dir: Path, data_dir: Path, *extra: str, env: dict | None = None,
                     timeout: float = 120) -> Iterator[tuple[subprocess.Popen, dict]]:
    """`gridtune serve --port 0` as a real process; yields (process, server.json)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "server.json").unlink(missing_ok=True)
    log = open(data_dir / "test-serve.log", "ab")
    proc = subprocess.Popen(gridtune_cmd("serve", "--port", "0", "--model", str(model_dir), "--data-dir",
                                         str(data_dir), "--idle-timeout", "0", *extra),
                            stdout=log, stderr=log, env=env or dict(os.environ))
    try:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: "
                                   + (data_dir / "test-serve.log").read_text()[-2000:])
            try:
                state = json.loads((data_dir / "server.json").read_text())
                if state.get("pid") == proc.pid and state.get("base_url"):  # not the phase of a start
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("server did not start in time")
        yield proc, state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_for(predicate, timeout: float = 120, interval: float = 0.2):
    """Poll until ``predicate()`` is truthy (returns it); fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout:.0f} s")


def chat_examples(n: int = 20) -> list[dict]:
    cities = ["Tokyo", "Lagos", "Oslo", "Lima", "Paris"]
    years = [2030, 2035, 2040, 2050]
    out = []
    for i in range(n):
        city, year = cities[i % len(cities)], years[(i // len(cities)) % len(years)]
        out.append({"messages": [
            {"role": "system", "content": "You are a careful futurist."},
            {"role": "user", "content": f"AGI scenario. Place: {city}. Year: {year}."},
            {"role": "assistant", "content": f"In {year}, {city} reached AGI. It affects energy and art."},
        ]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
