"""The generation runner against the usual scripts, on a loopback OpenAI-shaped server
(tests/fakeserver.py in its own process, so its CPU is not charged to the client).

    python bench/generate.py [--scenarios open,limited,faults] [--rounds 2] [--window 60]
                             [--concurrency 100] [--latency 0.2]

Three clients, in alternating rounds in one sitting, each measured the same way
(wall time from the call to the return, client CPU as the process's CPU time):
- gridtune: run_generation, committing every completion to a project file;
- naive: asyncio.gather under a semaphore with the plain AsyncOpenAI client (its
  default retries, which honour Retry-After), saving nothing;
- gridtune-stream (on request): the same, streaming each reply (as it does from
  the local and compatible servers: the openai client's SSE reader, no lean path);
- cookbook: a faithful minimal version of OpenAI's api_request_parallel_processor
  (bench/cookbook_parallel.py; aiohttp), writing its JSONL file. Skipped without aiohttp.

Scenarios (issue 12):
- open: no limit, --open-cells requests at --concurrency. Target: gridtune >= 330
  req/s and never below the naive client.
- limited: the server enforces --rpm and --tpm over a sliding --window (60 s is the
  real minute; a shorter one scales every limit with it) and fails 5% at random with
  a 500; --limited-cells requests, some of them long. Clients are told the limits.
  Target for gridtune: 0 failed, 0 lost, limit breaches <= 1% of requests, wall <=
  1.1x the even-pacing bound (the requests or the tokens at exactly the limit rate).
- faults: 15% random 429s with Retry-After 1 s and 3% malformed replies,
  --faults-cells requests at concurrency 32. Target: gridtune 0 failed and wall <=
  1.2x the naive client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gridtune.pipeline.generation.generate import GenerateOptions, run_generation  # noqa: E402
from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec  # noqa: E402
from gridtune.pipeline.spec.project import create_project  # noqa: E402
from gridtune.store import Store  # noqa: E402
from tests.fakeserver import charged_tokens  # noqa: E402

KEY = "sk-bench"
MODEL = "gpt-4o-mini"
MAX_TOKENS = 100
FAILED_500 = 0.05  # the limited scenario's random 500s


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def control(base_url: str, **data) -> None:
    req = urllib.request.Request(base_url.removesuffix("/v1") + "/_control", json.dumps(data).encode(),
                                 {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def breaches(base_url: str) -> int:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_requests?summary=1", timeout=10) as r:
        return json.loads(r.read())["breaches"]


def cell_values(cells: int, long_every: int | None) -> list[str]:
    """The grid's one variable: short items, and every ``long_every``-th a long one."""
    long_text = " ".join(f"detail{j} of the long brief, with numbers {j * 37 % 1000}" for j in range(60))
    return [f"{i}: {long_text}" if long_every and i % long_every == 0 else str(i) for i in range(cells)]


def spec(values: list[str]) -> GridSpec:
    return GridSpec(name="bench", generation="Describe item {i} in detail.", variables={"i": values},
                    settings=GenerationSettings(model=MODEL, max_tokens=MAX_TOKENS))


def bodies(values: list[str]) -> list[dict]:
    return [{"model": MODEL, "max_tokens": MAX_TOKENS,
             "messages": [{"role": "user", "content": f"Describe item {v} in detail."}]} for v in values]


# -- the three clients: each returns (wall seconds, failed, lost) ----------------------------------


def run_gridtune(workdir: Path, tag: str, values: list[str], concurrency: int, limits: dict,
                 stream: bool = False) -> tuple[float, int, int]:
    path = workdir / f"bench-{tag}.gridtune"
    create_project(path, spec(values)).close()
    options = GenerateOptions(concurrency=concurrency, stream=stream, rpm=limits.get("rpm"), tpm=limits.get("tpm"),
                              rate_period_s=limits.get("window", 60.0))
    start = time.perf_counter()
    result = asyncio.run(run_generation(path, options))
    elapsed = time.perf_counter() - start
    with Store.open(path) as store:
        done = store.status_counts().done
    return elapsed, result.progress.failed, len(values) - done


def run_naive(base_url: str, values: list[str], concurrency: int) -> tuple[float, int, int]:
    async def go() -> int:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=base_url, api_key=KEY)  # default retries (2), Retry-After honoured
        sem = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> None:
            async with sem:
                await client.chat.completions.create(**body)

        results = await asyncio.gather(*(one(b) for b in bodies(values)), return_exceptions=True)
        await client.close()
        return sum(isinstance(r, BaseException) for r in results)

    start = time.perf_counter()
    lost = asyncio.run(go())
    return time.perf_counter() - start, lost, lost


def run_cookbook(base_url: str, workdir: Path, tag: str, values: list[str], limits: dict) -> tuple[float, int, int]:
    from cookbook_parallel import process_api_requests

    out = workdir / f"cookbook-{tag}.jsonl"
    start = time.perf_counter()
    tracker = asyncio.run(process_api_requests(
        bodies(values), base_url + "/chat/completions", KEY, str(out),
        max_requests_per_minute=limits.get("rpm") or 1e9, max_tokens_per_minute=limits.get("tpm") or 1e12,
        period_s=limits.get("window", 60.0)))
    return time.perf_counter() - start, tracker.num_tasks_failed, len(values) - tracker.num_tasks_succeeded


# -- scenarios ---------------------------------------------------------------------------------------


def scenario(name: str, args: argparse.Namespace, base_url: str, workdir: Path, clients: list[str]) -> dict:
    window = args.window
    if name == "open":
        values, concurrency, limits, setup = cell_values(args.open_cells, None), args.concurrency, {}, {}
    elif name == "limited":
        values, concurrency = cell_values(args.limited_cells, 20), args.concurrency
        limits = {"rpm": args.rpm * window / 60, "tpm": args.tpm * window / 60, "window": window}
        setup = {"limits": {"rpm": int(limits["rpm"]), "tpm": int(limits["tpm"]), "window_s": window},
                 "faults": [{"status": 500, "prob": FAILED_500}]}
    else:
        values, concurrency, limits = cell_values(args.faults_cells, None), 32, {}
        setup = {"faults": [{"status": 429, "prob": 0.15, "retry_after": "1", "code": "rate_limit_exceeded"},
                            {"kind": "malformed", "prob": 0.03 / 0.85}]}
    rows: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": [], "failed": [], "lost": [], "breaches": []}
                                               for c in clients}
    for n in range(args.rounds):
        for client in clients:
            control(base_url, reset=True, seed=n, latency=args.latency, **setup)
            c0 = time.process_time()
            tag = f"{name}-{client}-{n}"
            if client.startswith("gridtune"):
                wall, failed, lost = run_gridtune(workdir, tag, values, concurrency, limits,
                                                  stream=client == "gridtune-stream")
            elif client == "naive":
                wall, failed, lost = run_naive(base_url, values, concurrency)
            else:
                wall, failed, lost = run_cookbook(base_url, workdir, tag, values, limits)
            row = rows[client]
            row["wall"].append(wall)
            row["cpu"].append(time.process_time() - c0)
            row["failed"].append(failed)
            row["lost"].append(lost)
            row["breaches"].append(breaches(base_url) if name == "limited" else 0)
            print(f"  [{name} round {n + 1}] {client:15s} {wall:7.2f} s  {len(values) / wall:6.1f} req/s  "
                  f"failed {failed}  lost {lost}  breaches {row['breaches'][-1]}", file=sys.stderr, flush=True)
    requests = len(values)
    print(f"\n{name}: {requests} requests, concurrency {concurrency}, latency {args.latency * 1000:.0f} ms, "
          f"median of {args.rounds} round(s)")
    if name == "limited":
        tokens = sum(charged_tokens(b) for b in bodies(values))
        bare = max(requests / limits["rpm"], tokens / limits["tpm"]) * window
        # The server counts every attempt, so the 5% that fail are sent again (1/0.95 of each).
        even = bare / (1 - FAILED_500)
        burst = (max(math.ceil(requests / (1 - FAILED_500) / limits["rpm"]),
                     math.ceil(tokens / (1 - FAILED_500) / limits["tpm"])) - 1) * window
        print(f"  limits {args.rpm:g} rpm, {args.tpm:g} tpm over a sliding {window:g} s window "
              f"({limits['rpm']:.0f} requests, {limits['tpm']:.0f} tokens per window), 5% random 500s; "
              f"{tokens:,} tokens as the server charges them")
        print(f"  even-pacing bound {even:.1f} s with the 5% failed attempts sent again ({bare:.1f} s for the "
              f"requests alone); the window's burst allows about {burst + args.latency:.1f} s")
    summary = {}
    for client, row in rows.items():
        wall = statistics.median(row["wall"])
        cpu_ms = statistics.median(row["cpu"]) / requests * 1000
        summary[client] = {"wall": wall, "rate": requests / wall, "cpu_ms": cpu_ms, "failed": max(row["failed"]),
                           "lost": max(row["lost"]), "breaches": max(row["breaches"])}
        extra = f"  breaches {summary[client]['breaches']} (worst round)" if name == "limited" else ""
        if name == "limited":
            extra += f"  {wall / even:.2f}x even pacing"
        print(f"  {client:15s} {wall:7.2f} s  {requests / wall:6.1f} req/s  client CPU {cpu_ms:.2f} ms/request  "
              f"failed {summary[client]['failed']}  lost {summary[client]['lost']} (worst round){extra}")
    g = summary["gridtune"]
    for other in clients[1:]:
        print(f"  gridtune / {other}: {summary[other]['wall'] / g['wall']:.2f}x the speed "
              f"({g['rate']:.1f} vs {summary[other]['rate']:.1f} req/s)")
    if name == "open":
        ok = g["rate"] >= 330 and g["rate"] >= summary["naive"]["rate"] and g["failed"] == 0
        target = ">= 330 req/s, not below naive"
    elif name == "limited":
        ok = (g["failed"] == 0 and g["lost"] == 0 and g["breaches"] <= 0.01 * requests
              and g["wall"] <= 1.1 * even)
        target = "0 failed, 0 lost, breaches <= 1%, wall <= 1.1x even pacing"
    else:
        ok = g["failed"] == 0 and g["lost"] == 0 and g["wall"] <= 1.2 * summary["naive"]["wall"]
        target = "0 failed, wall <= 1.2x naive"
    print(f"  target ({target}): {'met' if ok else 'NOT met'}")
    return {"ok": ok, **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="open,limited,faults")
    ap.add_argument("--clients", default="gridtune,naive,cookbook",
                    help="gridtune first; also gridtune-stream (the runner streaming, as it does from local and "
                         "compatible servers)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each client; medians reported")
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--open-cells", type=int, default=1000)
    ap.add_argument("--limited-cells", type=int, default=1500)
    ap.add_argument("--faults-cells", type=int, default=300)
    ap.add_argument("--rpm", type=float, default=600)
    ap.add_argument("--tpm", type=float, default=160_000)
    ap.add_argument("--window", type=float, default=60.0, help="the limits' window in seconds (60: a real minute)")
    args = ap.parse_args()
    clients = [c for c in args.clients.split(",") if c]
    if "cookbook" in clients:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            print("aiohttp is not installed: the cookbook script is skipped", file=sys.stderr)
            clients.remove("cookbook")
    server, base_url = start_server(args.latency)
    os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = base_url, KEY
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_naive(base_url, [str(i) for i in range(32)], 32)  # warm-up: imports, first connections
            run_gridtune(Path(tmp), "warm", [str(i) for i in range(32)], 32, {})
            for name in args.scenarios.split(","):
                results[name] = scenario(name, args, base_url, Path(tmp), clients)
    finally:
        server.terminate()
        server.wait(timeout=10)
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
