"""The demo grid end to end on the embedded server, as a first-time user runs it.

No key: ``gridtune generate`` on the demo project auto-starts the local server (a
process of its own, which loads the model and measures its speed) and runs every
cell of the demo's defaults. Printed: wall time from the command to the last cell,
time to the first completion, cells/min, completion tokens/s, and how many
completions were cut off at max tokens, and the server's decode plan (CPU kind,
kernels, threads). Target (issue 18): the whole grid in under 3 minutes on a 2-core
CPU, AVX2 only included, most completions ending on their own.

Baseline, in the same run: the same demo on the transformers decode path (the
server before the fast path, GRIDTUNE_DECODER=transformers) for ``--baseline-cells``
cells, with cells/min compared.

    python bench/demo.py                      # the whole demo, then a 32-cell baseline
    python bench/demo.py --baseline-cells 0   # no baseline
    python bench/demo.py --cells 64           # part of the grid
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _stop_server(home: Path) -> None:
    state = home / "server" / "server.json"
    try:
        pid = int(json.loads(state.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def run_demo(home: Path, *, cells: int | None, env_extra: dict[str, str]) -> dict:
    from gridtune.pipeline.spec.project import open_or_create_demo

    home.mkdir(parents=True, exist_ok=True)
    project = home / "demo.gridtune"
    open_or_create_demo(project).close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update({"GRIDTUNE_HOME": str(home), **env_extra})
    cmd = [sys.executable, "-m", "gridtune", "generate", str(project)]
    if cells:
        cmd += ["--limit", str(cells)]
    first: dict[str, float] = {}
    done = threading.Event()

    def watch(start: float) -> None:
        import sqlite3

        while not done.is_set():
            try:
                con = sqlite3.connect(f"file:{project}?mode=ro", uri=True, timeout=1)
                n = con.execute("SELECT count(*) FROM completions WHERE status='done'").fetchone()[0]
                con.close()
                if n and "first_s" not in first:
                    first["first_s"] = time.perf_counter() - start
                    return
            except Exception:  # noqa: BLE001 - the file may be mid-creation
                pass
            time.sleep(0.5)

    log = home / "generate.log"
    start = time.perf_counter()
    watcher = threading.Thread(target=watch, args=(start,), daemon=True)
    watcher.start()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    done.set()
    _stop_server(home)
    import sqlite3

    con = sqlite3.connect(str(project))
    rows = con.execute("SELECT status, finish_reason, completion_tokens, latency_s FROM completions").fetchall()
    con.close()
    finished = [r for r in rows if r[0] == "done"]
    try:  # the server's one line about its kernels (engine.py logs it once the model is loaded)
        server_log = (home / "server" / "server.log").read_text()
        plan = next((line[line.index("decoder: "):] for line in server_log.splitlines() if "decoder: " in line), None)
    except OSError:
        plan = None
    tokens = sum(r[2] or 0 for r in finished)
    cut = sum(1 for r in finished if r[1] == "length")
    return {
        "exit_code": rc, "cells_asked": cells or len(rows), "done": len(finished),
        "failed": sum(1 for r in rows if r[0] == "failed"), "cut_off": cut,
        "stopped_on_their_own": len(finished) - cut, "wall_s": round(wall, 1),
        "first_completion_s": round(first["first_s"], 1) if "first_s" in first else None,
        "cells_per_min": round(len(finished) / wall * 60, 1) if wall else 0.0,
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "mean_completion_tokens": round(tokens / len(finished), 1) if finished else None,
        "plan": plan, "log": str(log), "last_lines": log.read_text().strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=None, help="generate only this many cells (default: all)")
    parser.add_argument("--baseline-cells", type=int, default=32,
                        help="cells for the transformers-path baseline (0: none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridtune-demo-bench-") as tmp:
        figures = {"fast": run_demo(Path(tmp) / "fast", cells=args.cells, env_extra={})}
        if args.baseline_cells:
            figures["baseline"] = run_demo(Path(tmp) / "baseline", cells=args.baseline_cells,
                                           env_extra={"GRIDTUNE_DECODER": "transformers"})
            base = figures["baseline"]["cells_per_min"]
            figures["ratio_cells_per_min_vs_baseline"] = (
                round(figures["fast"]["cells_per_min"] / base, 2) if base else None)
    if args.json:
        print(json.dumps(figures))
        return
    f = figures["fast"]
    print(f"demo grid on the embedded server (no key), {os.cpu_count()} CPUs")
    print(f"  {f['plan'] or 'decoder: (no line in the server log)'}")
    print(f"  gridtune: {f['done']}/{f['cells_asked']} cells in {f['wall_s']} s "
          f"({f['wall_s'] / 60:.1f} min; target < 3 min), first completion after {f['first_completion_s']} s, "
          f"{f['cells_per_min']} cells/min, {f['tokens_per_s']} completion tok/s")
    print(f"    {f['stopped_on_their_own']} ended on their own, {f['cut_off']} cut off at max tokens, "
          f"{f['failed']} failed; mean {f['mean_completion_tokens']} tokens; exit {f['exit_code']}")
    if "baseline" in figures:
        b = figures["baseline"]
        print(f"  baseline (transformers decode path), {b['cells_asked']} cells: {b['done']} done in {b['wall_s']} s, "
              f"{b['cells_per_min']} cells/min, {b['tokens_per_s']} tok/s, {b['cut_off']} cut off")
        print(f"  cells/min: {figures['ratio_cells_per_min_vs_baseline']}x the baseline")
    if f["exit_code"]:
        print("  last lines of the run:", *f["last_lines"], sep="\n    ")


if __name__ == "__main__":
    main()
