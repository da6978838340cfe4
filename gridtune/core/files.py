"""Files written whole: a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def temp_beside(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{tag}")


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Write ``path`` whole (a temp file beside it, then a rename), as a ``mode`` file
    whatever the umask (0600 by default: private to the user). Never follows a link."""
    path = Path(path)
    tmp = temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = 0o600) -> None:
    """``obj`` as indented JSON, written whole (see write_atomic)."""
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode(), mode=mode)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` (and missing parents) created 0700; an existing ``path`` is made 0700."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
