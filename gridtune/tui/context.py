"""What every screen is given: the open project, its store and (lazily) its backend.

Screens receive one ``ProjectContext``; nothing here imports Textual, and nothing
here blocks at construction: the spec is read on first use, the backend is
resolved on first use (call those from a worker).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..pipeline.spec.grid import GridSpec
from ..pipeline.spec.project import load_project_spec
from ..store import Store

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline.client.backend import Backend

LOCAL_NOT_RUNNING = "local server (starts on demand)"


class ProjectContext:
    """The open project. ``store`` is a thread-safe handle shared by every screen."""

    def __init__(self, path: Path, store: Store):
        self.path = Path(path)
        self.store = store
        self._spec: GridSpec | None = None
        self._backend: Backend | None = None
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> ProjectContext:
        return cls(path, Store.open(path))

    @property
    def name(self) -> str:
        try:
            return self.spec().name
        except Exception:  # a project without a spec still has a file name
            return self.path.stem

    # -- the grid spec ---------------------------------------------------
    def spec(self) -> GridSpec:
        """The project's grid spec (cached; ``reload_spec`` after saving one)."""
        with self._lock:
            if self._spec is None:
                self._spec = load_project_spec(self.store)
            return self._spec

    def reload_spec(self) -> GridSpec:
        with self._lock:
            self._spec = None
            return self.spec()

    # -- the backend -----------------------------------------------------
    def backend(self, *, start: bool = True) -> Backend:
        """The backend the environment selects, resolved on first use.

        May start the local server (seconds): call it from a worker. Raises
        ``BackendError`` with a one-line message when none can be used.
        """
        from ..pipeline.client.resolve import resolve_backend

        with self._lock:
            if self._backend is None:
                self._backend = resolve_backend(start_local=start)
            return self._backend

    def backend_label(self) -> str:
        """A short label for the status line; never starts a server."""
        from ..pipeline.client.backend import BackendError

        try:
            return self.backend(start=False).label
        except BackendError:
            return LOCAL_NOT_RUNNING
        except Exception as exc:  # noqa: BLE001 - a label must never crash the app
            return f"backend: {exc}"

    def close(self) -> None:
        self.store.close()
