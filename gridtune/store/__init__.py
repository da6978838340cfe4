"""The project file: SQLite schema, migrations, typed records and queries. No UI here."""

from .project import RunConflict, Store, StoreError
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
    "StatusCounts", "Store", "StoreError", "WorkItem",
]
