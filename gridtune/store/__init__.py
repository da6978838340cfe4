"""The project file: SQLite schema, migrations, typed records and queries. No UI here."""

from .project import RunConflict, RunLost, Store, StoreError, describe_sqlite_error, sqlite_error_kind
from .records import (
    CompletionRecord,
    ExportRecord,
    GradeRecord,
    JobRecord,
    RunRecord,
    StatusCounts,
    WorkItem,
)

__all__ = [
    "CompletionRecord", "ExportRecord", "GradeRecord", "JobRecord", "RunConflict", "RunRecord",
    "RunLost", "StatusCounts", "Store", "StoreError", "WorkItem", "describe_sqlite_error", "sqlite_error_kind",
]
