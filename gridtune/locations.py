"""The one place that knows where gridtune keeps things on disk.

Nothing here creates a directory at import time; callers ask for a path and
create it when they are about to write.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "gridtune"


def data_dir() -> Path:
    """The user's gridtune data directory (demo project, server state).

    ``GRIDTUNE_HOME`` overrides it, which is what tests and multi-user boxes use.
    """
    home = os.environ.get("GRIDTUNE_HOME")
    if home:
        return Path(home).expanduser()
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def cache_dir() -> Path:
    """Where downloaded model files are cached (``GRIDTUNE_CACHE`` overrides)."""
    cache = os.environ.get("GRIDTUNE_CACHE")
    if cache:
        return Path(cache).expanduser()
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def server_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The embedded server's data directory: ``--data-dir``, else GRIDTUNE_HOME/server."""
    if explicit:
        return Path(explicit).expanduser()
    return data_dir() / "server"


def demo_project() -> Path:
    return data_dir() / "demo.gridtune"
