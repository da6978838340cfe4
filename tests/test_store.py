"""The project file: schema, cells keyed by values, grades with history, concurrency."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from gridtune.pipeline.spec.grid import demo_spec
from gridtune.pipeline.spec.project import apply_spec, create_project, load_project_spec
from gridtune.store import Store, StoreError
from gridtune.store.schema import APPLICATION_ID, SCHEMA_VERSION


@pytest.fixture
def store(tmp_path):
    s = create_project(tmp_path / "p.gridtune", demo_spec())
    yield s
    s.close()


def finish(store, item, text):
    store.save_done(item.completion_id, text=text, model="m", params={"temperature": 1.0},
                    prompt_tokens=10, completion_tokens=len(text) // 4, latency_s=0.1,
                    finish_reason="stop", attempts=1)


def test_new_project_file_settings(store, tmp_path):
    raw = sqlite3.connect(tmp_path / "p.gridtune")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.status_counts().to_dict() == {
        "cells": 256, "completions": 256, "done": 0, "failed": 0, "pending": 256, "running": 0,
        "graded": 0, "rejected": 0, "grades": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0},
        "cut_off": 0,
    }
    assert load_project_spec(store) == demo_spec()


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="no such project"):
        Store.open(tmp_path / "missing.gridtune")
    junk = tmp_path / "junk.gridtune"
    junk.write_text("this is not sqlite " * 100)
    with pytest.raises(StoreError, match="not a gridtune project"):
        Store.open(junk)
    newer = tmp_path / "newer.gridtune"
    c = sqlite3.connect(newer)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # a project, from a newer gridtune
    c.close()
    with pytest.raises(StoreError, match="newer gridtune"):
        Store.open(newer)


def test_a_file_that_is_not_a_project_is_left_as_it_was(tmp_path):
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    before = other.read_bytes()
    with pytest.raises(StoreError, match="not a gridtune project"):
        Store.open(other)
    assert other.read_bytes() == before  # not switched to WAL, not migrated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]
    empty = tmp_path / "empty.gridtune"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="empty file"):
        Store.open(empty)
    assert empty.read_bytes() == b""


def test_unusable_paths_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="File exists|Not a directory"):
        create_project(tmp_path / "file" / "p.gridtune", demo_spec())
    with pytest.raises(StoreError, match="too long"):
        Store.open(tmp_path / ("a" * 300 + ".gridtune"))


def test_create_refuses_to_overwrite(store, tmp_path):
    with pytest.raises(StoreError, match="already exists"):
        create_project(tmp_path / "p.gridtune", demo_spec())


def test_editing_the_grid_keeps_completions_of_surviving_cells(store):
    work = store.pending_work()
    by_place = {}
    for item in work:
        finish(store, item, f"text for {item.values['place']} {item.values['year']}")
        by_place.setdefault(item.values["place"], []).append(item.completion_id)
    spec = demo_spec()
    spec.variables["place"] = ["Tokyo", "Paris"]  # Lagos, Oslo, Lima leave; Paris arrives
    assert apply_spec(store, spec) == {"cells": 128, "added": 64, "kept": 64, "removed": 192}
    counts = store.status_counts()
    assert (counts.cells, counts.done, counts.pending) == (128, 64, 64)
    assert store.get_completion(by_place["Tokyo"][0]).text.startswith("text for Tokyo")
    # Putting Lagos back brings its finished completions back too.
    spec.variables["place"] = ["Tokyo", "Paris", "Lagos"]
    apply_spec(store, spec)
    assert store.status_counts().done == 128


def test_samples_expand_and_shrink_without_losing_finished_work(store):
    spec = demo_spec()
    spec.settings.samples = 3
    apply_spec(store, spec)
    assert store.status_counts().completions == 768
    item = [w for w in store.pending_work() if w.sample == 2][0]
    finish(store, item, "third sample")
    spec.settings.samples = 1
    apply_spec(store, spec)
    counts = store.status_counts()
    assert counts.completions == 257 and counts.done == 1  # the finished 3rd sample stays


def test_person_grade_wins_and_history_is_kept(store):
    item = store.pending_work(limit=1)[0]
    finish(store, item, "hello")
    cid = item.completion_id
    assert store.set_grade(cid, 3, "by-length") == 3
    assert store.set_grade(cid, 5, "person") == 5
    assert store.set_grade(cid, 1, "by-length") == 5  # automatic never overrides a person
    assert store.undo_grade(cid) == 5  # withdraws the newest (automatic) grade
    assert store.undo_grade(cid) == 3  # withdraws the person's: back to the automatic one
    history = store.grade_history(cid)
    assert [(g.grade, g.source, g.undone) for g in history] == [
        (3, "by-length", False), (5, "person", True), (1, "by-length", True),
    ]
    with pytest.raises(ValueError):
        store.set_grade(cid, 6)


def test_edit_keeps_the_models_text(store):
    item = store.pending_work(limit=1)[0]
    finish(store, item, "original words")
    store.edit_text(item.completion_id, "edited words, longer")
    rec = store.get_completion(item.completion_id)
    assert rec.text == "edited words, longer" and rec.original_text == "original words"
    assert rec.length == len("edited words, longer") and rec.edited
    store.edit_text(item.completion_id, "again")
    assert store.get_completion(item.completion_id).original_text == "original words"


def test_export_rows_skip_rejected_and_filter_by_grade(store):
    items = store.pending_work(limit=4)
    for i, item in enumerate(items):
        finish(store, item, "x" * (i + 1))
    ids = [i.completion_id for i in items]
    store.set_grade(ids[0], 0)
    store.set_grade(ids[1], 2)
    store.set_grade(ids[2], 5)
    assert [r[0] for r in store.iter_export_rows(None)] == ids[1:]
    assert [r[0] for r in store.iter_export_rows(3)] == [ids[2]]


def test_two_handles_write_the_same_file_at_once(store, tmp_path):
    other = Store.open(tmp_path / "p.gridtune")
    work = store.pending_work()
    errors = []

    def write(handle, items):
        try:
            for item in items:
                finish(handle, item, "t" * 50)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(h, work[i::2])) for i, h in enumerate((store, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert other.status_counts().done == 256
    other.close()


def test_review_rows_sort_and_filter(store):
    items = store.pending_work(limit=5)
    for n, item in zip([30, 10, 50, 20, 40], items):
        finish(store, item, "y" * n)
    store.set_grade(items[2].completion_id, 4)
    rows = store.review_rows(where="done")
    assert [r[1] for r in rows] == [10, 20, 30, 40, 50]
    assert [r[1] for r in store.review_rows(where="done", descending=True)][:2] == [50, 40]
    assert [r[0] for r in store.review_rows(where="graded")] == [items[2].completion_id]
    assert len(store.review_rows(where="ungraded")) == 4
    assert len(store.review_rows(where="all")) == 256
    assert [r[1] for r in store.review_rows(where="done", search="yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy")] == [40, 50]


def test_a_run_declared_dead_takes_no_more_writes_from_its_runner(store):
    import os
    import socket

    from gridtune.store import RunLost

    run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="m", params=None,
                             is_alive=lambda r: False)
    assert store.holds_run_lock
    a, b, c = store.pending_work(limit=3)
    store.mark_running(a.completion_id, run_id)
    store.save_done(b.completion_id, text="saved while ours", model="m", params=None, prompt_tokens=1,
                    completion_tokens=1, latency_s=0.1, finish_reason="stop", attempts=1, run_id=run_id)
    assert store.heartbeat(run_id, {"done": 1}) is False
    # Another process declares it dead (e.g. from another host, by its heartbeat) and takes its cells.
    with Store.open(store.path) as other:
        other.update_run(run_id, state="died")
        other.reset_running()
    with pytest.raises(RunLost, match=f"run #{run_id} was marked died by another process"):
        store.heartbeat(run_id, {"done": 2})
    store.save_done(c.completion_id, text="too late", model="m", params=None, prompt_tokens=1,
                    completion_tokens=1, latency_s=0.1, finish_reason="stop", attempts=1, run_id=run_id)
    store.save_failed(a.completion_id, error="too late", error_kind="permanent", attempts=1, run_id=run_id)
    store.mark_running(c.completion_id, run_id)
    store.finish_run(run_id, "finished")
    assert not store.holds_run_lock
    assert store.get_completion(b.completion_id).text == "saved while ours"
    assert [store.get_completion(x.completion_id).status for x in (a, c)] == ["pending", "pending"]
    run = store.get_run(run_id)
    assert run.state == "died" and run.progress == {"done": 1}


def test_sqlite_errors_are_described_in_one_line(tmp_path, monkeypatch):
    from gridtune.store import describe_sqlite_error
    from gridtune.store.project import busy_timeout_s

    cases = {
        "database is locked": "locked by another process",
        "attempt to write a readonly database": "read-only",
        "database or disk is full": "disk is full",
        "database disk image is malformed": "damaged",
        "unable to open database file": "cannot open",
        "disk I/O error": "disk failed",
        "no such table: x": "database error: no such table: x",
    }
    for message, expected in cases.items():
        line = describe_sqlite_error(sqlite3.OperationalError(message), tmp_path / "p.gridtune")
        assert line.startswith(f"{tmp_path / 'p.gridtune'}: ") and expected in line and "\n" not in line
    monkeypatch.setenv("GRIDTUNE_BUSY_TIMEOUT_S", "0.25")
    assert busy_timeout_s() == 0.25
    monkeypatch.setenv("GRIDTUNE_BUSY_TIMEOUT_S", "soon")
    assert busy_timeout_s() == 30.0
