"""The review's coverage panel: kept examples per variable value and per pair of
values, thin ones in the warning colour with "!", empty ones in the error colour
as "–", so a person sees at once what grading and dropping left thin.

The numbers come from ``pipeline.coverage.coverage`` (its "kept" is the export's);
this module only lays them out for a terminal: each variable's values on a line
or two, then one small matrix per pair of variables, packed side by side when
they fit the width, so a 4×4×4×4 grid's six matrices take three rows of blocks.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from ...pipeline.curation.coverage import Coverage, CoverageRow

CELL = 6  # width of one count column in a pair matrix
LABEL = 10  # width of a matrix's row labels
GAP = 3  # spaces between matrices side by side

_STYLES = {"empty": "bold red", "thin": "bold yellow", "ok": ""}


def _short(value: Any, n: int) -> str:
    text = str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _count(row: CoverageRow, threshold: int) -> tuple[str, str]:
    state = row.state(threshold)
    text = "–" if state == "empty" else f"{row.kept}!" if state == "thin" else str(row.kept)
    return text, _STYLES[state]


def _values_lines(cov: Coverage, width: int) -> list[Text]:
    by_var: dict[str, list[CoverageRow]] = {}
    for r in cov.values:
        by_var.setdefault(r.variables[0], []).append(r)
    name_width = min(14, max((len(n) for n in by_var), default=0))
    lines: list[Text] = []
    for name, rows in by_var.items():
        line = Text(f"{_short(name, name_width):<{name_width}}", style="dim")
        for r in rows:
            count, style = _count(r, cov.threshold)
            label = f"  {_short(r.values[0], 14)} "
            if line.cell_len + len(label) + len(count) > width and line.cell_len > name_width:
                lines.append(line)
                line = Text(" " * name_width)
            line.append(label)
            line.append(count, style or "bold")
        lines.append(line)
    return lines


def _matrix(cov: Coverage, a: str, b: str, rows: list[CoverageRow]) -> list[Text]:
    cols = list(dict.fromkeys(repr(r.values[1]) for r in rows))
    col_names = {repr(r.values[1]): _short(r.values[1], CELL - 1) for r in rows}
    row_keys = list(dict.fromkeys(repr(r.values[0]) for r in rows))
    row_names = {repr(r.values[0]): _short(r.values[0], LABEL) for r in rows}
    grid = {(repr(r.values[0]), repr(r.values[1])): r for r in rows}
    out = [Text(_short(f"{a} × {b}", LABEL + 1 + CELL * len(cols)), style="bold"),
           Text(" " * (LABEL + 1) + "".join(f"{col_names[c]:>{CELL}}" for c in cols), style="dim")]
    for rk in row_keys:
        line = Text(f"{row_names[rk]:>{LABEL}} ", style="dim")
        for c in cols:
            cell = grid.get((rk, c))
            count, style = _count(cell, cov.threshold) if cell else ("", "")
            line.append(" " * (CELL - len(count)))
            line.append(count, style)
        out.append(line)
    return out


def _pack(blocks: list[list[Text]], width: int) -> list[Text]:
    """Blocks of lines side by side while they fit ``width``, a blank line between rows of blocks."""
    out: list[Text] = []
    row: list[list[Text]] = []

    def flush() -> None:
        if not row:
            return
        widths = [max(line.cell_len for line in block) for block in row]
        for i in range(max(len(block) for block in row)):
            line = Text()
            for j, block in enumerate(row):
                piece = block[i] if i < len(block) else Text()
                line.append_text(piece)
                if j < len(row) - 1:
                    line.append(" " * (widths[j] - piece.cell_len + GAP))
            out.append(line)
        out.append(Text())
        row.clear()

    used = 0
    for block in blocks:
        w = max(line.cell_len for line in block)
        if row and used + GAP + w > width:
            flush()
            used = 0
        used = w if not row else used + GAP + w
        row.append(block)
    flush()
    return out


def coverage_text(cov: Coverage, width: int = 78) -> Text:
    """The panel's content for ``width`` columns."""
    thin = sum(1 for r in cov.thin() if r.kept)
    empty = len(cov.empty())
    head = Text()
    head.append(f"{cov.kept:,} kept over {cov.cells:,} cells", "bold")
    head.append(" · ")
    head.append(f"{empty} empty", _STYLES["empty"] if empty else "")
    head.append(" · ")
    head.append(f"{thin} thin", _STYLES["thin"] if thin else "")
    head.append(f" (under {cov.threshold})", "dim")
    lines = [head, Text(), *_values_lines(cov, width)]
    pairs: dict[tuple[str, ...], list[CoverageRow]] = {}
    for r in cov.pairs:
        pairs.setdefault(r.variables, []).append(r)
    if pairs:
        lines.append(Text())
        lines += _pack([_matrix(cov, a, b, rows) for (a, b), rows in pairs.items()], width)
    text = Text("\n").join(line for line in lines)
    text.rstrip()
    text.no_wrap = True
    text.overflow = "crop"
    return text


class CoveragePanel(VerticalScroll, can_focus=True):
    """The coverage tables, scrollable with the arrow keys; ``show`` sets them."""

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.coverage: Coverage | None = None

    def compose(self) -> ComposeResult:
        yield Static("counting…", id="coverage-text")

    def show(self, cov: Coverage | None, error: str | None = None) -> None:
        self.coverage = cov
        body = self.query_one("#coverage-text", Static)
        if error:
            body.update(Text(error, style="red"))
        elif cov is None:
            body.update(Text("counting…", style="dim"))
        else:
            body.update(coverage_text(cov, max(20, self.scrollable_content_region.width or 78)))
