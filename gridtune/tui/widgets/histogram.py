"""A compact histogram of completion lengths with the grade cut-offs marked.

Three rows of eighth-blocks and one axis row. Bars are coloured by the grade
their lengths get from ``grade_by_length``; the axis marks where grades 2–5
begin, so a person sees at once where the short ones are. The binning is
``pipeline.review.histogram``; it is computed once per data and width.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ...pipeline.curation.review import Histogram, histogram

_BLOCKS = " ▁▂▃▄▅▆▇█"
_BAND_CLASSES = [f"length-histogram--band{g}" for g in range(1, 6)]


class LengthHistogram(Widget):
    DEFAULT_CSS = """
    LengthHistogram { height: 4; }
    """
    COMPONENT_CLASSES = {*_BAND_CLASSES, "length-histogram--axis", "length-histogram--cut"}
    BAR_ROWS = 3

    lengths: reactive[tuple[int, ...]] = reactive(tuple, init=False)
    """The lengths of the finished completions; a new value repaints, the same one does not."""

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._cache: tuple[int, Histogram] | None = None

    def set_lengths(self, lengths: list[int]) -> None:
        self.lengths = tuple(lengths)

    def watch_lengths(self) -> None:
        self._cache = None

    def _histogram(self, width: int) -> Histogram:
        if self._cache is None or self._cache[0] != width:
            self._cache = (width, histogram(self.lengths, width))
        return self._cache[1]

    def render(self) -> Text:
        width = max(10, self.size.width)
        if not self.lengths:
            return Text(" lengths of finished completions show here", style="dim")
        h = self._histogram(width)
        peak = max(h.counts) or 1
        bands = [self.get_component_rich_style(c) for c in _BAND_CLASSES]
        grade_of_bin = [min(5, 1 + sum(1 for cb in h.cut_bins if cb < b)) for b in range(width)]
        rows = []
        total = self.BAR_ROWS * 8
        for r in range(self.BAR_ROWS - 1, -1, -1):
            line = Text(no_wrap=True)
            for b, count in enumerate(h.counts):
                eighths = max(1, round(count / peak * total)) if count else 0
                level = max(0, min(8, eighths - r * 8))
                line.append(_BLOCKS[level], bands[grade_of_bin[b] - 1])
            rows.append(line)
        if h.hi <= h.lo:  # one length (one completion, or all alike): no span, no grade bands to mark
            n = len(self.lengths)
            what = "1 completion" if n == 1 else f"{n:,} completions, all"
            label = Text(f"{what} {h.lo:,} chars"[:width], style=self.get_component_rich_style(
                "length-histogram--axis"), no_wrap=True)
            return Text("\n").join([*rows, label])
        axis = list(f"{h.lo}".ljust(width))[:width]
        hi = f"{h.hi} chars"
        for i, ch in enumerate(hi):
            pos = width - len(hi) + i
            if 0 <= pos < width:
                axis[pos] = ch
        marks = {b: str(grade) for grade, b in enumerate(h.cut_bins, start=2)}
        for b, mark in marks.items():
            axis[b] = mark
        label = Text("".join(axis), style=self.get_component_rich_style("length-histogram--axis"), no_wrap=True)
        cut = self.get_component_rich_style("length-histogram--cut")
        for b in marks:
            label.stylize(cut, b, b + 1)
        return Text("\n").join([*rows, label])
