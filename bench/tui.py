"""Benchmark: the review screen at 100,000 completions.

Measures, on a real project file made by tests/bigproject.py:
  * open: from creating the app (headless, 80x24) until the review list shows
    its rows with their previews;
  * keypress-to-update latency, median and p95: "j" until the new cursor line
    is repainted; "4" until the graded line is repainted, and until the grade is
    in the project file.
Baselines measured in the same run: the same screen on 1,000 completions, and a
naive Textual DataTable holding the same 100,000 rows (one cell object per value).

    python bench/tui.py [--rows 100000] [--presses 200] [--no-datatable]

Targets (issue 4): open < 2 s, p95 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.bigproject import make_project  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def _wait(cond, timeout: float = 30.0) -> None:
    end = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.0005)


async def bench_review(path: Path, presses: int) -> dict[str, float]:
    from gridtune.tui.app import GridtuneApp

    t0 = time.perf_counter()
    app = GridtuneApp(path, start_mode="review")
    out: dict[str, float] = {}
    async with app.run_test(size=(80, 24)) as pilot:
        def opened() -> bool:
            try:
                screen = app.get_screen_stack("review")[0]
                lst = screen.list
            except Exception:  # noqa: BLE001 - not mounted yet
                return False
            return bool(lst.rows) and lst.rows[0][0] in lst._previews
        await _wait(opened)
        await pilot.pause()
        out["open_s"] = time.perf_counter() - t0
        screen = app.get_screen_stack("review")[0]
        lst = screen.list
        painted: dict[int, tuple[float, object]] = {}
        original = lst.render_line

        def render_line(y: int):
            strip = original(y)
            index = round(lst.scroll_y) + y
            if index < len(lst.rows):
                painted[index] = (time.perf_counter(), lst.rows[index][2], index == lst.cursor)
            return strip

        lst.render_line = render_line  # type: ignore[method-assign]
        move, grade_paint, grade_store = [], [], []
        for _ in range(presses):
            target = lst.cursor + 1
            t = time.perf_counter()
            app.simulate_key("j")
            await _wait(lambda: target in painted and painted[target][0] > t and painted[target][2])
            move.append(time.perf_counter() - t)
            await pilot.pause()
        for _ in range(presses):
            index = lst.cursor
            t = time.perf_counter()
            app.simulate_key("4")
            await _wait(lambda: index in painted and painted[index][0] > t and painted[index][1] == 4)
            grade_paint.append(time.perf_counter() - t)
            await _wait(lambda: screen.pending_jobs() == 0)
            grade_store.append(time.perf_counter() - t)
            await pilot.pause()
        out.update(
            move_median_ms=statistics.median(move) * 1000, move_p95_ms=pct(move, 95) * 1000,
            grade_paint_median_ms=statistics.median(grade_paint) * 1000,
            grade_paint_p95_ms=pct(grade_paint, 95) * 1000,
            grade_store_median_ms=statistics.median(grade_store) * 1000,
            grade_store_p95_ms=pct(grade_store, 95) * 1000,
        )
    return out


async def bench_datatable(path: Path) -> float:
    """The naive way: every row of review_rows() as a DataTable row."""
    from textual.app import App, ComposeResult
    from textual.widgets import DataTable

    from gridtune.store import Store

    t0 = time.perf_counter()

    class Naive(App[None]):
        def compose(self) -> ComposeResult:
            yield DataTable()

        def on_mount(self) -> None:
            with Store.open(path) as store:
                rows = store.review_rows(where="done")
                previews = store.review_previews([r[0] for r in rows], chars=60)
            table = self.query_one(DataTable)
            table.add_columns("grade", "length", "preview")
            table.add_rows(
                (r[2] if r[2] is not None else "·", r[1], "·".join(map(str, previews[r[0]][0].values())))
                for r in rows
            )

    app = Naive()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await _wait(lambda: app.query_one(DataTable).row_count > 0)
        await pilot.pause()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline-rows", type=int, default=1_000)
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--no-datatable", action="store_true", help="skip the DataTable baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRIDTUNE_HOME"] = tmp
        os.environ.pop("OPENAI_API_KEY", None)
        os.environ.pop("OPENAI_BASE_URL", None)
        big = make_project(Path(tmp) / "big.gridtune", args.rows)
        small = make_project(Path(tmp) / "small.gridtune", args.baseline_rows)
        r_small = asyncio.run(bench_review(small, args.presses))
        r_big = asyncio.run(bench_review(big, args.presses))
        naive = None if args.no_datatable else asyncio.run(bench_datatable(big))
    n, b = f"{args.rows:,}", f"{args.baseline_rows:,}"
    print(f"review screen, 80x24, headless; {args.presses} presses per key")
    print(f"{'':34}{n:>12}{b:>12}{'ratio':>8}")
    rows = [
        ("open (s)", "open_s", "{:.3f}"),
        ("j: line repainted, median (ms)", "move_median_ms", "{:.2f}"),
        ("j: line repainted, p95 (ms)", "move_p95_ms", "{:.2f}"),
        ("4: line repainted, median (ms)", "grade_paint_median_ms", "{:.2f}"),
        ("4: line repainted, p95 (ms)", "grade_paint_p95_ms", "{:.2f}"),
        ("4: grade in the file, median (ms)", "grade_store_median_ms", "{:.2f}"),
        ("4: grade in the file, p95 (ms)", "grade_store_p95_ms", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        ratio = r_big[key] / r_small[key] if r_small[key] else float("nan")
        print(f"{label:34}{fmt.format(r_big[key]):>12}{fmt.format(r_small[key]):>12}{ratio:>7.2f}x")
    if naive is not None:
        print(f"baseline: naive DataTable with the same {n} rows opens in {naive:.3f} s "
              f"({naive / r_big['open_s']:.1f}x the review screen's {r_big['open_s']:.3f} s)")
    ok_open = r_big["open_s"] < 2.0
    ok_p95 = max(r_big["move_p95_ms"], r_big["grade_paint_p95_ms"]) < 50
    print(f"targets: open < 2 s {'met' if ok_open else 'MISSED'}; p95 < 50 ms {'met' if ok_p95 else 'MISSED'}")


if __name__ == "__main__":
    main()
