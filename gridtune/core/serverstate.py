"""The local server's state file, DATA/server.json: the one definition of its name,
its format and how it is read and written.

The server writes it (0600, whole) once it answers and removes it on exit:
``{"pid", "host", "port", "base_url", "model", "started_at", "data_dir", "token"}``
(a starting server may also write ``"phase"``, what it is doing). Every gridtune
process finds the server through it and sends the token it holds. So it is read
only when it is the user's own, not a link, and nobody else could have written it:
a planted file would be a way to steal the token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import fold
from .files import write_json

STATE_FILE = "server.json"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # what the local server serves unless told otherwise
LOG_FILE = "server.log"


def state_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / STATE_FILE


def read_state(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state in ``data_dir``, None when there is none, it is not a JSON object, or
    it is not to be trusted (another user's, writable by others, a link)."""
    try:
        fd = os.open(state_path(data_dir), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return None
            state = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(data_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write the state whole, 0600 (it holds the token)."""
    write_json(state_path(data_dir), state, mode=0o600)


def remove_state(data_dir: str | os.PathLike[str], pid: int | None = None) -> None:
    """Remove the state file if it is process ``pid``'s (default: this process's)."""
    path = state_path(data_dir)
    try:
        if json.loads(path.read_text()).get("pid") == (os.getpid() if pid is None else pid):
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def phase(state: dict[str, Any] | None) -> str | None:
    """What a starting server says it is doing, on one short line; None if it says nothing."""
    value = (state or {}).get("phase")
    return fold(value)[:80] if isinstance(value, str) and value.strip() else None
