"""Creating projects and applying an edited grid: the spec-aware layer over the store."""

from __future__ import annotations

import json
from pathlib import Path

from ..store import Store
from .grid import GridSpec, cell_key


def create_project(path: str | Path, spec: GridSpec) -> Store:
    """Create a new project file from a checked spec (refuses to overwrite)."""
    spec.check()
    store = Store.open(path, create=True)
    apply_spec(store, spec)
    return store


def apply_spec(store: Store, spec: GridSpec) -> dict[str, int]:
    """Save an edited spec and re-expand its grid, keeping the completions of every
    cell that still exists. Returns counts of cells added, kept and removed."""
    spec.check()
    cells = ((cell_key(v), json.dumps(v, ensure_ascii=False)) for v in spec.cells())
    return store.sync_grid(spec.to_json(), cells, spec.settings.samples)


def load_project_spec(store: Store) -> GridSpec:
    text = store.spec_json()
    if text is None:
        raise ValueError(f"{store.path}: project has no grid spec")
    return GridSpec.from_json(text)


def open_or_create_demo(path: str | Path) -> Store:
    from .grid import demo_spec

    path = Path(path)
    if path.exists():
        return Store.open(path)
    return create_project(path, demo_spec())
