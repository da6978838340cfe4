"""`gridtune serve`: run the OpenAI-compatible local server (uvicorn) on one data directory.

* binds 127.0.0.1 by default and refuses a non-loopback address without an API key;
* holds DATA/server.lock for its whole life, so one data directory has one server;
* writes DATA/server.json {"pid", "host", "port", "base_url", "model", "started_at"}
  once it answers (never the key) and removes it on exit;
* exits after ``idle_timeout`` minutes with no request, no generation and no job
  queued or running (0: never).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from gridtune import locations

log = logging.getLogger("gridtune.server")

STATE_FILE = "server.json"
LOCK_FILE = "server.lock"
LOG_FILE = "server.log"
DEFAULT_IDLE_MINUTES = 15.0


class ServeError(Exception):
    """The server cannot start; a one-line message says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((Path(data_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _remove_state(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _take_lock(data_dir: Path):
    import fcntl

    fh = open(data_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        other = read_state(data_dir) or {}
        where = f" at {other['base_url']} (pid {other.get('pid')})" if other.get("base_url") else ""
        raise ServeError(f"a gridtune server is already running on {data_dir}{where}") from None
    return fh


def serve(*, host: str = "127.0.0.1", port: int = 0, model: str | None = None, api_key: str | None = None,
          data_dir: str | os.PathLike[str] | None = None, idle_timeout: float = DEFAULT_IDLE_MINUTES,
          max_upload_mb: int = 512, max_batch: int = 32, log_level: str = "info") -> None:
    """Run the server in the foreground until it is stopped or idle."""
    if not is_loopback(host) and not api_key:
        raise ServeError(f"refusing to listen on {host} (not a loopback address) without --api-key")
    data = locations.server_dir(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    lock = _take_lock(data)
    try:
        _serve_locked(data, host=host, port=port, model=model, api_key=api_key, idle_timeout=idle_timeout,
                      max_upload_mb=max_upload_mb, max_batch=max_batch, log_level=log_level)
    finally:
        lock.close()


def _serve_locked(data: Path, *, host: str, port: int, model: str | None, api_key: str | None,
                  idle_timeout: float, max_upload_mb: int, max_batch: int, log_level: str) -> None:
    import uvicorn

    from .app import build_state, create_app
    from .model import ModelError, load_model

    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    log.info("loading model %s", model or "(default)")
    try:
        loaded = load_model(model)
    except ModelError as exc:
        sock.close()
        raise ServeError(str(exc)) from None
    source = loaded.name if model is None else (str(Path(model).expanduser().resolve())
                                                 if Path(model).expanduser().exists() else model)
    state = build_state(loaded, data, api_key=api_key, base_source=source,
                        max_upload_bytes=max_upload_mb * 1024 * 1024, max_batch=max_batch)
    url_host = f"[{host}]" if ":" in host else host
    base_url = f"http://{url_host}:{actual_port}/v1"
    state_path = data / STATE_FILE
    server: uvicorn.Server | None = None
    watcher: list[asyncio.Task] = []

    async def started() -> None:
        _write_state(state_path, {"pid": os.getpid(), "host": host, "port": actual_port, "base_url": base_url,
                                  "model": loaded.name, "started_at": time.time(), "data_dir": str(data)})
        log.info("serving %s at %s (data in %s)", loaded.name, base_url, data)
        if idle_timeout and idle_timeout > 0:
            watcher.append(asyncio.create_task(_idle_watch()))

    async def _idle_watch() -> None:
        limit = idle_timeout * 60
        tick = max(0.5, min(30.0, limit / 4))
        while True:
            await asyncio.sleep(tick)
            if state.idle_for >= limit and server is not None:
                log.info("idle for %.0f minute(s): exiting", idle_timeout)
                server.should_exit = True
                return

    async def stopping() -> None:
        for t in watcher:
            t.cancel()
        _remove_state(state_path)

    app = create_app(state, on_startup=[started], on_shutdown=[stopping])
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        _remove_state(state_path)
        sock.close()
