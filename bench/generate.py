"""Generation throughput against the loopback fake server at a fixed latency.

    python bench/generate.py [--cells 640] [--concurrency 32] [--latency 0.2] [--rounds 2]

Prints requests/s for the gridtune runner (committing every completion to a
project file) and for a naive baseline measured in the same run (asyncio.gather
under a semaphore with the plain AsyncOpenAI client, saving nothing), each
against the ideal, concurrency / latency. Target: runner >= 0.9 of ideal and
never below the baseline. The server runs in its own process so its CPU is
not charged to the client being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gridtune.pipeline.generate import GenerateOptions, run_generation  # noqa: E402
from gridtune.pipeline.grid import GenerationSettings, GridSpec  # noqa: E402
from gridtune.pipeline.project import create_project  # noqa: E402
from gridtune.store import Store  # noqa: E402

KEY = "sk-bench"


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def spec(cells: int) -> GridSpec:
    return GridSpec(name="bench", generation="Describe item {i} in detail.", variables={"i": list(range(cells))},
                    settings=GenerationSettings(model="bench-model", max_tokens=100))


async def _naive(base_url: str, cells: int, concurrency: int) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model="bench-model", max_tokens=100,
                messages=[{"role": "user", "content": f"Describe item {i} in detail."}])

    await asyncio.gather(*(one(i) for i in range(cells)))
    await client.close()


def naive(base_url: str, cells: int, concurrency: int) -> float:
    # Timed like the runner: from the call to the return, event loop and client
    # set-up included, so the two are measured over the same scope.
    start = time.perf_counter()
    asyncio.run(_naive(base_url, cells, concurrency))
    return time.perf_counter() - start


def runner(workdir: Path, n: int, cells: int, concurrency: int) -> float:
    path = workdir / f"bench-{n}.gridtune"
    create_project(path, spec(cells)).close()
    start = time.perf_counter()
    # Plain requests, as OpenAI gets them and as the naive baseline sends them (the fake
    # server counts as a compatible server, which the runner would otherwise stream from).
    result = asyncio.run(run_generation(path, GenerateOptions(concurrency=concurrency, stream=False)))
    elapsed = time.perf_counter() - start
    with Store.open(path) as store:
        done = store.status_counts().done
    if result.exit_code != 0 or done != cells:
        raise SystemExit(f"runner did not commit every result: {done}/{cells} done, {result.progress.failed} failed")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=640)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each; the median is reported")
    args = ap.parse_args()

    server, base_url = start_server(args.latency)
    os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = base_url, KEY
    ideal = args.concurrency / args.latency
    times: dict[str, list[float]] = {"naive": [], "runner": []}
    cpu: dict[str, list[float]] = {"naive": [], "runner": []}
    try:
        naive(base_url, args.concurrency, args.concurrency)  # warm-up: imports, first connections
        with tempfile.TemporaryDirectory() as tmp:
            runner(Path(tmp), -1, args.concurrency, args.concurrency)
            for n in range(args.rounds):
                for name, run in (("naive", lambda: naive(base_url, args.cells, args.concurrency)),
                                  ("runner", lambda: runner(Path(tmp), n, args.cells, args.concurrency))):
                    c0 = time.process_time()
                    times[name].append(run())
                    cpu[name].append(time.process_time() - c0)
                print(f"  round {n + 1}: naive {args.cells / times['naive'][-1]:6.1f} req/s, "
                      f"runner {args.cells / times['runner'][-1]:6.1f} req/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(f"{args.cells} cells, concurrency {args.concurrency}, latency {args.latency * 1000:.0f} ms; "
          f"ideal {ideal:.1f} req/s; median of {args.rounds} round(s)")
    rates = {}
    for name, label in (("naive", "naive baseline (gather + semaphore, saves nothing)"),
                        ("runner", "gridtune runner (commits every completion)")):
        rates[name] = args.cells / statistics.median(times[name])
        cpu_ms = statistics.median(cpu[name]) / args.cells * 1000
        print(f"  {label:52s} {rates[name]:7.1f} req/s  {rates[name] / ideal:5.2f} of ideal  "
              f"(client CPU {cpu_ms:.2f} ms/request)")
    ratio = rates["runner"] / rates["naive"]
    print(f"  runner / naive: {ratio:.2f}")
    ok = rates["runner"] >= 0.9 * ideal and ratio >= 1.0
    print("target (>= 0.9 of ideal and not below the naive baseline):", "met" if ok else "NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
