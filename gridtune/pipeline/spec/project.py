"""Creating projects and applying an edited grid: the spec-aware layer over the store."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from ...store import Store, StoreError
from .grid import GridSpec, cell_key


def create_project(path: str | Path, spec: GridSpec) -> Store:
    """Create a new project file from a checked spec (refuses to overwrite).

    Atomic: the project is built in a temporary file beside ``path`` and linked
    into place only when complete, so a failure (or a kill) midway leaves no
    project behind, and a file that appeared at ``path`` meanwhile is never
    replaced."""
    spec.check()
    path = Path(path)
    Store.check_new(path)  # the usual refusals (it exists, no folder) before any work
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.creating")
    try:
        with Store.open(tmp, create=True) as store:
            apply_spec(store, spec)
            store.checkpoint()  # everything in the main file: the WAL stays with the temporary name
        _link_into_place(tmp, path)
    except StoreError as exc:  # name the project the person asked for, not the temporary file
        raise StoreError(str(exc).replace(str(tmp), str(path))) from None
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm", "-journal"))):
            with contextlib.suppress(OSError):
                leftover.unlink()
    return Store.open(path)


def _link_into_place(tmp: Path, path: Path) -> None:
    """Give the finished file its name without ever replacing an existing file."""
    try:
        os.link(tmp, path)  # fails if path exists: no race with another `new`
    except FileExistsError:
        raise StoreError(f"{path}: already exists; not overwriting it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise StoreError(f"{path}: already exists; not overwriting it") from None
        os.replace(tmp, path)


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


@contextlib.contextmanager
def open_with_spec(path: str | Path, error: type[Exception]) -> Iterator[tuple[Store, GridSpec]]:
    """Open a project and read its grid spec, for a pass beside the run (the judge,
    the evaluation); a spec that does not load raises ``error`` with its message."""
    with Store.open(Path(path)) as store:
        try:
            spec = load_project_spec(store)
        except ValueError as exc:
            raise error(str(exc)) from None
        yield store, spec


# The demo holds one place out of training by default, so that F7 Eval can ask the
# first tuned model about a value it never saw, with nothing typed (issue 21).
DEMO_HOLD_OUT: tuple[str, ...] = ("place=Oslo",)


def proposed_hold_out(path: str | Path) -> tuple[str, ...]:
    """What a project's export form holds out before anyone says: the demo project's
    one value, nothing elsewhere (a grid of one's own is held out by choice)."""
    from ... import locations

    try:
        demo = Path(path).expanduser().resolve() == locations.demo_project().expanduser().resolve()
    except OSError:
        return ()
    return DEMO_HOLD_OUT if demo else ()


def open_or_create_demo(path: str | Path) -> Store:
    from .grid import demo_spec

    path = Path(path)
    if path.exists():
        return Store.open(path)
    return create_project(path, demo_spec())
