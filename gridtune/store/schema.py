"""The project file's schema: forward-only migrations, versioned by user_version.

Each migration is a SQL script; migration N (1-based) brings a file from
version N-1 to N. Never edit a shipped migration: append a new one.

A project is marked by APPLICATION_ID in the SQLite header (``PRAGMA application_id``),
which only gridtune writes. Files made before the marker existed are recognised by
their exact schema (``shape``: every table, index and column of that version) and
marked when next opened; any other SQLite file is not a project, and is left alone.
"""

from __future__ import annotations

import functools
import sqlite3

APPLICATION_ID = 0x67726474  # "grdt"; a signed 32-bit value, as the header holds it

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE spec (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        json        TEXT NOT NULL,          -- the GridSpec, never a key or secret
        updated_at  REAL NOT NULL
    );

    -- A cell is identified by its variable values (canonical JSON), not its position.
    CREATE TABLE cells (
        id          INTEGER PRIMARY KEY,
        key         TEXT NOT NULL UNIQUE,
        values_json TEXT NOT NULL,
        ordinal     INTEGER NOT NULL,       -- position in the current expansion
        active      INTEGER NOT NULL DEFAULT 1  -- 0: left the grid after an edit
    );

    CREATE TABLE runs (
        id              INTEGER PRIMARY KEY,
        pid             INTEGER,
        host            TEXT,
        started_at      REAL NOT NULL,
        heartbeat_at    REAL,
        ended_at        REAL,
        state           TEXT NOT NULL CHECK (state IN
                          ('starting', 'running', 'stopping', 'finished', 'stopped', 'failed', 'died')),
        model           TEXT,
        params_json     TEXT,
        stop_requested  INTEGER NOT NULL DEFAULT 0,
        progress_json   TEXT,               -- the latest Progress snapshot
        error           TEXT
    );

    CREATE TABLE completions (
        id                 INTEGER PRIMARY KEY,
        cell_id            INTEGER NOT NULL REFERENCES cells(id) ON DELETE CASCADE,
        sample             INTEGER NOT NULL,
        status             TEXT NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'running', 'done', 'failed')),
        text               TEXT,
        original_text      TEXT,            -- the model's text when a person edited it
        length             INTEGER,         -- characters of text, for sorting and grading
        model              TEXT,
        params_json        TEXT,            -- request parameters (never a key)
        prompt_tokens      INTEGER,
        completion_tokens  INTEGER,
        latency_s          REAL,
        finish_reason      TEXT,
        attempts           INTEGER NOT NULL DEFAULT 0,
        error              TEXT,
        error_kind         TEXT CHECK (error_kind IN ('permanent', 'transient')),
        run_id             INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        grade              INTEGER CHECK (grade BETWEEN 0 AND 5),  -- current grade; 0 = rejected
        grade_source       TEXT,
        created_at         REAL NOT NULL,
        updated_at         REAL NOT NULL,
        UNIQUE (cell_id, sample)
    );
    CREATE INDEX completions_status ON completions(status);
    CREATE INDEX completions_length ON completions(length);
    CREATE INDEX completions_grade ON completions(grade);

    -- Every grade ever given; completions.grade is derived from it:
    -- the newest grade by a person, else the newest automatic one.
    CREATE TABLE grades (
        id             INTEGER PRIMARY KEY,
        completion_id  INTEGER NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
        grade          INTEGER NOT NULL CHECK (grade BETWEEN 0 AND 5),
        source         TEXT NOT NULL,       -- 'person', 'by-length', ...
        created_at     REAL NOT NULL,
        undone         INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX grades_completion ON grades(completion_id);

    CREATE TABLE exports (
        id                   INTEGER PRIMARY KEY,
        path                 TEXT NOT NULL,
        valid_path           TEXT,
        format               TEXT NOT NULL,
        min_grade            INTEGER,
        separator            TEXT,
        stop                 TEXT,
        validation_fraction  REAL NOT NULL DEFAULT 0,
        n_train              INTEGER NOT NULL,
        n_valid              INTEGER NOT NULL,
        report_json          TEXT,
        created_at           REAL NOT NULL
    );

    CREATE TABLE jobs (
        id                TEXT PRIMARY KEY,  -- the backend's job id
        base_url          TEXT,              -- which backend; never its key
        model             TEXT NOT NULL,
        training_file     TEXT,
        validation_file   TEXT,
        export_id         INTEGER REFERENCES exports(id) ON DELETE SET NULL,
        status            TEXT NOT NULL,
        fine_tuned_model  TEXT,
        error             TEXT,
        created_at        REAL NOT NULL,
        updated_at        REAL NOT NULL
    );
    """,
    # 2: curation (issue 9): near-duplicate groups, the judge's rubric, judgements
    # and calibrations. Grades themselves stay in `grades` (sources 'dedup', 'judge:<model>').
    """
    -- Project-wide settings a person edits (the judge's rubric: key 'judge.rubric').
    CREATE TABLE settings (
        key         TEXT PRIMARY KEY,
        value       TEXT NOT NULL,
        updated_at  REAL NOT NULL
    );

    -- The latest near-duplicate grouping (recomputed in full by `gridtune dedup`):
    -- one row per completion that has at least one near-copy. group_id is the
    -- smallest completion id of its group; similarity the highest Jaccard to another member.
    CREATE TABLE dup_members (
        completion_id  INTEGER PRIMARY KEY REFERENCES completions(id) ON DELETE CASCADE,
        group_id       INTEGER NOT NULL,
        similarity     REAL NOT NULL
    );
    CREATE INDEX dup_members_group ON dup_members(group_id);

    -- One row per dedup pass: with what it was computed, and what it found.
    CREATE TABLE dedup_passes (
        id           INTEGER PRIMARY KEY,
        threshold    REAL NOT NULL,
        shingle      INTEGER NOT NULL,
        num_perm     INTEGER NOT NULL,
        n_completions  INTEGER NOT NULL,
        n_groups       INTEGER NOT NULL,
        n_members      INTEGER NOT NULL,
        seconds      REAL NOT NULL,
        created_at   REAL NOT NULL
    );

    -- Every judge call's outcome: a grade, or why there is none (the reply had no
    -- grade 1-5, the request failed). A completion with a grade here is not judged
    -- again by that model.
    CREATE TABLE judgements (
        id             INTEGER PRIMARY KEY,
        completion_id  INTEGER NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
        model          TEXT NOT NULL,
        grade          INTEGER CHECK (grade BETWEEN 1 AND 5),
        reply          TEXT,
        error          TEXT,
        created_at     REAL NOT NULL
    );
    CREATE INDEX judgements_model ON judgements(model, completion_id);

    -- Agreement of a judge with the person's grades, as `judge --calibrate` measured it.
    CREATE TABLE calibrations (
        id          INTEGER PRIMARY KEY,
        model       TEXT NOT NULL,
        n           INTEGER NOT NULL,
        spearman    REAL,
        kappa       REAL,
        exact       REAL,
        created_at  REAL NOT NULL
    );
    """,
    # 3: evaluation (issue 11): what an export held out of training, the prompts an
    # evaluation asks, and every answer a model gave to one of them.
    """
    -- The export's held-out choice: {"values": {var: [value, ...]}, "combos": [cell key, ...]}.
    ALTER TABLE exports ADD COLUMN holdout_json TEXT;

    -- A prompt to evaluate on: a held-out cell of an export, or values a person added
    -- (new values never in the grid, or a playground answer to watch).
    CREATE TABLE eval_cases (
        id           INTEGER PRIMARY KEY,
        key          TEXT NOT NULL UNIQUE,   -- canonical JSON of the values
        values_json  TEXT NOT NULL,
        source       TEXT NOT NULL CHECK (source IN ('held-out', 'person')),
        note         TEXT,
        created_at   REAL NOT NULL
    );

    -- One answer of one model to one case under one setup (the export's format,
    -- separator and stop, temperature, max tokens: a digest). An interrupted
    -- evaluation resumes from here; a finished one is never paid for twice.
    CREATE TABLE eval_answers (
        id                 INTEGER PRIMARY KEY,
        case_id            INTEGER NOT NULL REFERENCES eval_cases(id) ON DELETE CASCADE,
        model              TEXT NOT NULL,
        setup              TEXT NOT NULL,
        sample             INTEGER NOT NULL,
        text               TEXT,
        finish_reason      TEXT,
        completion_tokens  INTEGER,
        latency_s          REAL,
        error              TEXT,
        created_at         REAL NOT NULL,
        UNIQUE (case_id, model, setup, sample)
    );

    -- A finished comparison, as `gridtune eval` printed it.
    CREATE TABLE eval_runs (
        id           INTEGER PRIMARY KEY,
        export_id    INTEGER REFERENCES exports(id) ON DELETE SET NULL,
        model        TEXT NOT NULL,
        against      TEXT,
        setup        TEXT NOT NULL,
        result_json  TEXT NOT NULL,
        created_at   REAL NOT NULL
    );
    """,
    # 4: data scaling (issue 11): `finetune --scaling` trains on half and on all of an
    # export's training file and evaluates both; one row per scaling run, its job ids
    # recorded as soon as each job is created, so a killed run follows them on rerun.
    """
    CREATE TABLE scaling_runs (
        id           INTEGER PRIMARY KEY,
        export_id    INTEGER REFERENCES exports(id) ON DELETE CASCADE,
        base_model   TEXT NOT NULL,
        settings     TEXT NOT NULL,          -- canonical JSON (epochs, seed, suffix): what a rerun resumes
        half_path    TEXT NOT NULL,
        n_half       INTEGER NOT NULL,
        n_all        INTEGER NOT NULL,
        half_job     TEXT,                   -- the backend's job ids (also in jobs)
        all_job      TEXT,
        state        TEXT NOT NULL CHECK (state IN ('training', 'evaluating', 'finished', 'failed')),
        error        TEXT,
        result_json  TEXT,                   -- the comparison, as `finetune --scaling --json` prints it
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL
    );
    CREATE INDEX scaling_runs_export ON scaling_runs(export_id, base_model);
    """,
    # 5: the Batch API (issue 12): each batch sent to a provider's /v1/batches and the
    # completions it carries (store/batches.py). Never a key: base_url without credentials.
    """
    CREATE TABLE batches (
        id              INTEGER PRIMARY KEY,
        tag             TEXT NOT NULL UNIQUE,   -- in the provider batch's metadata: found again after a crash
        batch_id        TEXT,                   -- the provider's id; NULL until created there
        input_file_id   TEXT,
        base_url        TEXT,
        model           TEXT NOT NULL,
        params_json     TEXT,
        status          TEXT NOT NULL,          -- 'preparing', then the provider's status
        requests        INTEGER NOT NULL,
        output_file_id  TEXT,
        error_file_id   TEXT,
        counts_json     TEXT,
        error           TEXT,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        closed_at       REAL                    -- every result read into its cell
    );

    CREATE TABLE batch_items (
        batch_row      INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
        completion_id  INTEGER NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
        state          TEXT NOT NULL DEFAULT 'sent' CHECK (state IN ('sent', 'done', 'failed', 'missing')),
        PRIMARY KEY (batch_row, completion_id)
    );
    CREATE INDEX batch_items_completion ON batch_items(completion_id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


Shape = frozenset[tuple[str, str, str, tuple[str, ...]]]


def shape(conn: sqlite3.Connection) -> Shape:
    """What a file's schema holds: (type, name, table, columns) for every table, index,
    view and trigger outside SQLite's own (sqlite_stat1 and the like come and go)."""
    rows = conn.execute(
        "SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
    ).fetchall()
    out = set()
    for kind, name, table in rows:
        columns: tuple[str, ...] = ()
        if kind == "table":
            columns = tuple(r[1] for r in conn.execute(f"PRAGMA table_info({_quote(name)})"))
        out.add((kind, name, table, columns))
    return frozenset(out)


@functools.cache
def shape_of_version(version: int) -> Shape:
    """The shape gridtune's own migrations 1..version give a file."""
    conn = sqlite3.connect(":memory:")
    try:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        return shape(conn)
    finally:
        conn.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
