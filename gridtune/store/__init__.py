"""The project file: SQLite schema, migrations, typed records and queries. No UI here."""

from .base import RunConflict, RunLost, StoreError, describe_sqlite_error, sqlite_error_kind
from .project import Store
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
