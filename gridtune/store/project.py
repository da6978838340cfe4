"""The project file: one SQLite database per project.

WAL mode so the TUI and the command line can use one file at the same time;
every write is its own short transaction, so a killed process loses nothing
that was committed and never leaves a half-written row.

The handle is one class, ``Store``, put together from its parts by concern:
cells.py (cells and completions), runs.py (runs and their work), grades.py
(grades and curation), exports.py (exports and jobs), over base.py (the
connection, transactions, errors); opening, identifying and migrating a file
are here.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from .base import StoreError, busy_timeout_s, describe_sqlite_error, sqlite_error_kind
from .cells import CellsMixin
from .exports import ExportsMixin
from .grades import GradesMixin
from .runs import RunsMixin
from .schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, shape, shape_of_version


class Store(GradesMixin, CellsMixin, RunsMixin, ExportsMixin):
    """A handle on one project file. Safe to share between threads."""

    # -- opening -----------------------------------------------------------
    @staticmethod
    def check_new(path: str | os.PathLike[str]) -> None:
        """Refuse as ``open(path, create=True)`` would (it exists; no folder can be
        made for it), without creating the file."""
        path = Path(path)
        try:
            if path.exists() or path.is_symlink():
                raise StoreError(f"{path}: already exists; not overwriting it")
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> Store:
        path = Path(path)
        try:
            exists = path.exists()
            if create and not exists:
                path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        if not create and not exists:
            raise StoreError(f"{path}: no such project (create one with `gridtune new {path} --spec SPEC.toml`)")
        if create and exists:
            raise StoreError(f"{path}: already exists; not overwriting it")
        if not create:
            _identify(path)  # read-only: a file that is not a project is never written to
        busy_s = busy_timeout_s()
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, timeout=busy_s, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_s * 1000)}")
            store = cls(path, conn)
            if create:
                # The schema and the marker go in before WAL, in rollback mode, so the
                # marker is in the main file itself from the first commit.
                store._migrate(create=True)
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL: a commit survives the process being killed (it is in the
            # WAL file), without an fsync per completion.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            if not create:
                store._migrate()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            kind = sqlite_error_kind(exc)
            if create or kind == "notadb" or (kind == "other" and not isinstance(exc, sqlite3.OperationalError)):
                what = "cannot create the project" if create else "not a gridtune project"
                raise StoreError(f"{path}: {what} ({exc})") from None
            raise StoreError(describe_sqlite_error(exc, path)) from None
        except StoreError:
            if conn is not None:
                conn.close()
            raise
        return store

    def _migrate(self, *, create: bool = False) -> None:
        """Bring the file to SCHEMA_VERSION and mark it, one migration per transaction.

        Each step reads the version inside its write lock, so two processes opening
        an old project at once migrate it once. An old unmarked project gets the
        marker with its first step (or alone, when it needs no migration)."""
        with self._lock:  # the usual case takes no write lock: a read-only project still opens
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            if version == SCHEMA_VERSION and app_id == APPLICATION_ID:
                return
        while True:
            with self.transaction() as c:
                version = c.execute("PRAGMA user_version").fetchone()[0]
                marked = c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
                if not create and not marked and not _is_old_project(c, version):
                    raise StoreError(f"{self.path}: not a gridtune project")
                if version > SCHEMA_VERSION:
                    raise StoreError(_newer(self.path, version))
                if version == SCHEMA_VERSION and marked:
                    return
                if version < SCHEMA_VERSION:
                    for statement in _split_sql(MIGRATIONS[version]):
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version = {version + 1}")
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def close(self) -> None:
        with self._lock:
            self._run_lock.release()
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identify(path: Path) -> None:
    """Refuse, in one line, a file that is not a gridtune project this gridtune can open,
    without writing anything: not to the file, not beside it.

    A project carries APPLICATION_ID; one made before the marker has exactly the tables
    of its schema version. Read through SQLite alone (a file descriptor of our own,
    closed, would drop this process's locks on the file: POSIX), read-only: where a
    -journal, or a -wal and a -shm, are there (a connection may be writing), through a
    read-only connection, which creates nothing then; else the file itself is all
    there is to read (a -wal without -shm is a copy, as of its last checkpoint, which
    says whose file it is as well), read as immutable: nothing created, nothing locked.
    """
    try:
        if path.stat().st_size == 0:
            raise StoreError(f"{path}: not a gridtune project (empty file)")
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
    live = Path(f"{path}-journal").exists() or all(Path(f"{path}{end}").exists() for end in ("-wal", "-shm"))
    uri = "file:" + quote(str(path.absolute())) + ("?mode=ro" if live else "?mode=ro&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s(), isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(describe_sqlite_error(exc, path)) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s() * 1000)}")
        conn.execute("BEGIN")  # one snapshot for every read
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        ours = app_id == APPLICATION_ID or (app_id == 0 and _is_old_project(conn, version))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        kind = sqlite_error_kind(exc)
        if kind == "notadb" or (kind == "other" and not isinstance(exc, sqlite3.OperationalError)):
            raise StoreError(f"{path}: not a gridtune project ({exc})") from None
        raise StoreError(describe_sqlite_error(exc, path)) from None
    finally:
        conn.close()
    if not ours:
        raise StoreError(f"{path}: not a gridtune project (a SQLite database of another application); "
                         "left as it was")
    if version > SCHEMA_VERSION:
        raise StoreError(_newer(path, version))


def _is_old_project(conn: sqlite3.Connection, version: int) -> bool:
    """A project made before the marker: a known version and exactly its schema."""
    return 1 <= version <= SCHEMA_VERSION and shape(conn) == shape_of_version(version)


def _newer(path: Path, version: int) -> str:
    return (f"{path}: made by a newer gridtune (schema {version}, this one knows {SCHEMA_VERSION}); "
            "upgrade gridtune")


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements (sqlite3's executescript commits)."""
    statements, buf = [], []
    for line in script.splitlines():
        buf.append(line)
        joined = "\n".join(buf)
        if line.rstrip().endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined.strip())
            buf = []
    tail = "\n".join(buf).strip()
    if tail:
        statements.append(tail)
    return [s for s in statements
            if s and not all(ln.strip().startswith("--") or not ln.strip() for ln in s.splitlines())]
