"""Faults that lost money or changed files (issue 20), each done the real way: real
foreign SQLite files compared byte for byte, a real second process holding the
write lock, a real HTTP server on 127.0.0.1 sending huge bodies, a real full
filesystem (a small tmpfs, when this machine lets the test mount one)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gridtune.store import Store, StoreError
from gridtune.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION

GRIDTUNE = [sys.executable, "-c", "from gridtune.cli.main import main; main()"]

SPEC = """
name = "faults"
[prompt]
generation = "Write about {a} and {b}."
[variables]
a = [1, 2, 3, 4]
b = ["p", "q"]
[generation]
model = "gpt-4o-mini"
max_tokens = 50
"""


def gridtune(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GRIDTUNE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Exit 2, one error line (the last on stderr), no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("gridtune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder``, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def new_project(folder: Path, name: str = "p.gridtune") -> Path:
    spec = folder / "spec.toml"
    spec.write_text(SPEC)
    path = folder / name
    result = gridtune("new", str(path), "--spec", str(spec))
    assert result.returncode == 0, result.stderr
    spec.unlink()
    return path


# -- 1. foreign SQLite files are never changed -------------------------------------------


def _sqlite(path: Path, *statements: str, wal: bool = False) -> None:
    c = sqlite3.connect(path, isolation_level=None)
    if wal:
        c.execute("PRAGMA journal_mode = WAL")
    for statement in statements:
        c.execute(statement)
    c.close()


def foreign_files(folder: Path) -> list[Path]:
    """Other applications' SQLite files, each alone in its folder: the shapes that
    fooled the old Store.open, and near-copies of a gridtune project."""
    made: list[Path] = []

    def make(name: str, *statements: str, wal: bool = False) -> Path:
        (folder / name).mkdir()
        path = folder / name / "f.db"
        _sqlite(path, *statements, wal=wal)
        made.append(path)
        return path

    for version in (1, 2, 3, 4):  # user_version 1-4 used to be "migrated"
        make(f"v{version}", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
             "INSERT INTO notes (body) VALUES ('keep me')", f"PRAGMA user_version = {version}")
    make("v99-wal", "CREATE TABLE t (x)", "PRAGMA user_version = 99", wal=True)  # used to be switched to WAL
    make("rollback-v99", "CREATE TABLE t (x)", "PRAGMA user_version = 99")
    make("no-tables-v3", "PRAGMA user_version = 3")
    make("other-app-id", *[s for script in MIGRATIONS for s in _statements(script)],
         f"PRAGMA user_version = {SCHEMA_VERSION}", "PRAGMA application_id = 42")  # gridtune's tables, another app
    make("one-extra-table", *[s for script in MIGRATIONS for s in _statements(script)],
         "CREATE TABLE extra (x)", f"PRAGMA user_version = {SCHEMA_VERSION}")
    make("one-table-short", *[s for script in MIGRATIONS for s in _statements(script)],
         "DROP TABLE batch_items", f"PRAGMA user_version = {SCHEMA_VERSION}")
    make("a-column-short", *[s for script in MIGRATIONS[:3] for s in _statements(script)],
         "ALTER TABLE exports DROP COLUMN holdout_json", "PRAGMA user_version = 3")
    # A WAL file with committed pages still in its -wal (its application crashed):
    # reading it through a writable connection would checkpoint them into the file.
    (folder / "wal-pending").mkdir()
    pending = folder / "wal-pending" / "f.db"
    c = sqlite3.connect(pending, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("PRAGMA wal_autocheckpoint = 0")
    c.execute("CREATE TABLE t (x)")
    c.execute("PRAGMA user_version = 2")
    shutil.copy(pending, folder / "wal-pending" / "copy.db")
    shutil.copy(f"{pending}-wal", folder / "wal-pending" / "copy.db-wal")
    c.close()
    pending.unlink()
    (folder / "wal-pending" / "copy.db").rename(pending)
    (folder / "wal-pending" / "copy.db-wal").rename(f"{pending}-wal")
    made.append(pending)
    return made


def _statements(script: str) -> list[str]:
    from gridtune.store.project import _split_sql

    return _split_sql(script)


def test_foreign_sqlite_files_are_refused_in_one_line_and_left_byte_for_byte(tmp_path):
    for path in foreign_files(tmp_path):
        before = snapshot(path.parent)
        with pytest.raises(StoreError, match="not a gridtune project") as caught:
            Store.open(path)
        assert "\n" not in str(caught.value)
        assert "no such table" not in str(caught.value)
        assert snapshot(path.parent) == before, path.parent.name
    # And through the command line, as the fault hunt found it ("even status"); each
    # gridtune process costs seconds here, so the commands that write go to one file.
    (tmp_path / "cli").mkdir()
    for path in foreign_files(tmp_path / "cli"):
        if path.parent.name not in ("v1", "v99-wal", "other-app-id", "one-extra-table", "wal-pending"):
            continue
        before = snapshot(path.parent)
        commands = [("status", str(path))]
        if path.parent.name == "v1":
            commands += [("grade", str(path), "--by-length"), ("generate", str(path)),
                         ("export", str(path), "-o", str(path.parent / "out.jsonl"))]
        for args in commands:
            line = one_line_error(gridtune(*args))
            assert "not a gridtune project" in line and str(path) in line, line
        assert snapshot(path.parent) == before, path.parent.name


def test_a_file_marked_by_a_newer_gridtune_is_refused_untouched(tmp_path):
    newer = tmp_path / "newer.gridtune"
    _sqlite(newer, "CREATE TABLE spec (id)", f"PRAGMA application_id = {APPLICATION_ID}",
            f"PRAGMA user_version = {SCHEMA_VERSION + 1}", wal=True)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="newer gridtune"):
        Store.open(newer)
    assert snapshot(tmp_path) == before


def test_a_new_project_carries_the_marker_in_the_file_itself(tmp_path):
    path = new_project(tmp_path)
    header = path.read_bytes()[:100]  # not only in the WAL: the main file's own header
    assert int.from_bytes(header[68:72], "big") == APPLICATION_ID
    assert int.from_bytes(header[60:64], "big") == SCHEMA_VERSION


def _old_project(folder: Path, version: int) -> Path:
    """A project as an older gridtune left it: schema ``version``, WAL, no marker."""
    if version == SCHEMA_VERSION:  # the last unmarked release wrote exactly this schema
        path = new_project(folder, f"old{version}.gridtune")
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA application_id = 0")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        return path
    path = folder / f"old{version}.gridtune"
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    for target in range(1, version + 1):
        c.execute("BEGIN IMMEDIATE")
        for statement in _statements(MIGRATIONS[target - 1]):
            c.execute(statement)
        c.execute(f"PRAGMA user_version = {target}")
        c.execute("COMMIT")
    c.execute("INSERT INTO cells (key, values_json, ordinal) VALUES ('k', '{}', 0)")
    c.close()
    return path


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
def test_a_project_of_an_older_gridtune_opens_migrated_and_marked(tmp_path, version):
    path = _old_project(tmp_path, version)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA application_id").fetchone()[0] == 0
    raw.close()
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.cell_count() >= 1  # its data is still there
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    raw.close()
    if version == 1:  # the command line opens it too (once: a process costs seconds here)
        status = gridtune("status", str(path), "--json")
        assert status.returncode == 0, status.stderr


def test_two_processes_opening_an_old_project_at_once_migrate_it_once(tmp_path):
    path = _old_project(tmp_path, 1)
    code = f"from gridtune.store import Store; Store.open({str(path)!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION
