"""Widgets shared by gridtune's screens."""

from .histogram import LengthHistogram
from .status import StatusLine

__all__ = ["LengthHistogram", "StatusLine"]
