"""The app's sections: one screen per step of the recipe, in its order, each with its key."""

from __future__ import annotations

from dataclasses import dataclass

from .screens.evaluate import EvalScreen
from .screens.export import ExportScreen
from .screens.generate import GenerateScreen
from .screens.grid import GridScreen
from .screens.playground import PlaygroundScreen
from .screens.review import ReviewScreen
from .section import SectionScreen


@dataclass(frozen=True)
class Section:
    mode: str
    title: str
    key: str
    screen: type[SectionScreen]


SECTIONS: tuple[Section, ...] = (
    Section("grid", "Grid", "f2", GridScreen),
    Section("generate", "Generate", "f3", GenerateScreen),
    Section("review", "Review", "f4", ReviewScreen),
    Section("export", "Export", "f5", ExportScreen),
    Section("playground", "Playground", "f6", PlaygroundScreen),
    Section("eval", "Eval", "f7", EvalScreen),
)
