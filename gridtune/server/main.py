"""`gridtune serve`: run the OpenAI-compatible local server (uvicorn) on one data directory.

* binds 127.0.0.1 on a free port by default and refuses a non-loopback address without
  an API key;
* runs with umask 077 and makes its data directory 0700: everything it writes (state,
  uploaded files, jobs, adapters, exports, logs of its workers) is private to the user;
* generates a token at start (``secrets.token_urlsafe``) that every request must carry
  (``Authorization: Bearer``) unless it carries the user's ``--api-key``;
* holds DATA/server.lock for its whole life, so one data directory has one server;
* writes DATA/server.json {"pid", "host", "port", "base_url", "model", "started_at",
  "token"} (0600) once it answers, and removes it on exit; gridtune's clients read the
  token there. Before, while it fetches or loads the model, the file holds only
  {"pid", "phase", "data_dir"} (e.g. "fetching Qwen/…: 312 MB of 988 MB, ~17 s left").
  A key given with --api-key is never written anywhere;
* exits after ``idle_timeout`` minutes with no request, no generation and no job
  queued or running (0: never).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from gridtune import locations
from gridtune.core.files import private_dir
from gridtune.core.net import is_loopback
from gridtune.core.serverstate import read_state, remove_state, write_state

log = logging.getLogger("gridtune.server")

LOCK_FILE = "server.lock"
DEFAULT_IDLE_MINUTES = 15.0


class ServeError(Exception):
    """The server cannot start; a one-line message says why."""


def _private_data_dir(data: Path) -> Path:
    """The data directory, created or made 0700; refused when another user owns it."""
    try:
        private_dir(data)
        st = data.stat()
    except OSError as exc:
        raise ServeError(f"cannot use {data} as the server's data directory: {exc.strerror or exc}") from None
    if st.st_uid != os.getuid():
        raise ServeError(f"{data} belongs to another user; the server's data directory must be your own")
    return data


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


def single_threaded_helpers() -> None:
    """Only the engine's thread decodes with several OpenMP threads (it sets its own
    count, GRIDTUNE_THREADS); any other thread that runs a torch op (loading the model,
    merging an export) must not start a team of its own: a second team on two cores made
    decoding 40-50% slower for as long as the process lived. libgomp reads this variable
    once, when torch is first imported, which in a server process comes after this."""
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 1 and not os.environ.get("GRIDTUNE_THREADS"):
        os.environ["GRIDTUNE_THREADS"] = user  # the user's count still sizes the engine
    os.environ["OMP_NUM_THREADS"] = "1"


def serve(*, host: str = "127.0.0.1", port: int = 0, model: str | None = None, api_key: str | None = None,
          data_dir: str | os.PathLike[str] | None = None, idle_timeout: float = DEFAULT_IDLE_MINUTES,
          max_upload_mb: int = 512, max_files_mb: int = 2048, max_body_mb: float = 4, max_batch: int = 32,
          max_queue: int | None = None, export_dir: str | os.PathLike[str] | None = None,
          allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = (),
          log_level: str = "info") -> None:
    """Run the server in the foreground until it is stopped or idle."""
    if not is_loopback(host) and not api_key:
        raise ServeError(f"refusing to listen on {host} (not a loopback address) without --api-key")
    os.umask(0o077)  # everything this process and its workers write is the user's alone
    single_threaded_helpers()
    data = _private_data_dir(locations.server_dir(data_dir))
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    lock = _take_lock(data)
    try:
        _serve_locked(data, host=host, port=port, model=model, api_key=api_key, idle_timeout=idle_timeout,
                      max_upload_mb=max_upload_mb, max_files_mb=max_files_mb, max_body_mb=max_body_mb,
                      max_batch=max_batch, max_queue=max_queue,
                      export_dir=Path(export_dir).expanduser() if export_dir else None,
                      allow_hosts=allow_hosts, allow_origins=allow_origins, log_level=log_level)
    finally:
        lock.close()


def _serve_locked(data: Path, *, host: str, port: int, model: str | None, api_key: str | None,
                  idle_timeout: float, max_upload_mb: int, max_files_mb: int, max_body_mb: float, max_batch: int,
                  max_queue: int | None, export_dir: Path | None, allow_hosts: tuple[str, ...],
                  allow_origins: tuple[str, ...], log_level: str) -> None:
    import uvicorn

    from .app import build_state, create_app
    from .model import ModelError, load_model

    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    log.info("loading model %s", model or "(default)")

    def phase(line: str) -> None:  # what the start is doing, for the TUI's and the CLI's start phase
        try:
            write_state(data, {"pid": os.getpid(), "phase": line, "data_dir": str(data)})
        except OSError:
            pass

    try:
        loaded = load_model(model, on_progress=phase)
    except ModelError as exc:
        sock.close()
        remove_state(data)
        raise ServeError(str(exc)) from None
    source = loaded.name if model is None else (str(Path(model).expanduser().resolve())
                                                 if Path(model).expanduser().exists() else model)
    token = secrets.token_urlsafe(32)
    extra_hosts = tuple(allow_hosts)
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        extra_hosts += (f"[{host}]" if ":" in host else host,)
    elif not is_loopback(host):  # every interface: the machine's own names (by address, Host is checked anyway)
        extra_hosts += (socket.gethostname(), socket.getfqdn())
    state = build_state(loaded, data, api_key=api_key, token=token, base_source=source,
                        max_upload_bytes=max_upload_mb * 1024 * 1024, max_files_bytes=max_files_mb * 1024 * 1024,
                        max_body_bytes=int(max_body_mb * 1024 * 1024), max_batch=max_batch, max_queue=max_queue,
                        export_root=export_dir or data / "exports", allowed_hosts=extra_hosts,
                        allowed_origins=allow_origins)
    url_host = f"[{host}]" if ":" in host else host
    base_url = f"http://{url_host}:{actual_port}/v1"
    server: uvicorn.Server | None = None
    watcher: list[asyncio.Task] = []

    async def started() -> None:
        write_state(data, {"pid": os.getpid(), "host": host, "port": actual_port, "base_url": base_url,
                                  "model": loaded.name, "started_at": time.time(), "data_dir": str(data),
                                  "token": token})
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
        remove_state(data)

    app = create_app(state, on_startup=[started], on_shutdown=[stopping])
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        remove_state(data)
        sock.close()
