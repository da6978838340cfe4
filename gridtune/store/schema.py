"""The project file's schema: forward-only migrations, versioned by user_version.

Each migration is a SQL script; migration N (1-based) brings a file from
version N-1 to N. Never edit a shipped migration: append a new one.
"""

from __future__ import annotations

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
]

SCHEMA_VERSION = len(MIGRATIONS)
