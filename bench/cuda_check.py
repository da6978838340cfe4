"""The fast decode path on a CUDA GPU: same greedy tokens as the reference, and its speed.

Run where a GPU is (CI has none; the test suite covers the CPU):
1. a tiny random Llama in fp32 on CUDA: the engine's fast path gives the transformers
   path's greedy tokens for a batch of prompts whose rows join late and leave early;
2. a SmolLM2-135M-shaped Llama (random weights: no download) in bf16 on CUDA: decode
   tokens/s for 1 and 32 rows on the fast path against transformers' eager
   ``generate`` (the baseline), measured in the same run.

    python bench/cuda_check.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _greedy_equality(tmp: Path) -> bool:
    import torch

    from gridtune.server.engine import Engine, SamplingParams
    from gridtune.server.model import load_model
    from tests.tiny_model import make_tiny_model

    loaded = load_model(str(make_tiny_model(tmp / "tiny")), device="cuda")
    loaded.model.float()
    prompts = ["The capital of France is", "Count: one two", "hello", "Write a detailed scenario about Lagos.",
               "You are a careful futurist."]
    budgets = [12, 30, 5, 21, 17]

    def run(fast: bool):
        engine = Engine(loaded, max_batch=4, fast=fast, dtype=torch.float32 if fast else None, calibrate=False)
        engine.start()

        async def one(p: str, n: int) -> str:
            ids = engine.text_prompt(loaded.name, p)
            return "".join([d.text async for d in engine.generate(loaded.name, ids,
                                                                   SamplingParams(max_tokens=n, temperature=0))])

        async def everything():
            return await asyncio.gather(*[one(p, n) for p, n in zip(prompts, budgets)])

        try:
            return asyncio.run(everything()), engine.stats()["decoder"]
        finally:
            engine.close()

    got, dec_fast = run(True)
    ref, dec_ref = run(False)
    print(f"greedy tokens, fp32 on CUDA: fast path ({dec_fast}) == reference ({dec_ref}): {got == ref}")
    if got != ref:
        for a, b in zip(got, ref):
            print("   fast:", repr(a)[:80], "\n    ref:", repr(b)[:80])
    return got == ref


def _speed() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gridtune.server.fastlm import FastLlama

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = list(range(100, 180))
    steps = 100
    with torch.inference_mode():
        model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False)
        torch.cuda.synchronize()
        hf = steps / (time.perf_counter() - t)
        lm = FastLlama(model, slots=32, device="cuda")
        print(f"SmolLM2-shaped model, {lm.dtype} on {torch.cuda.get_device_name()}:")
        print(f"  baseline transformers eager generate, 1 stream: {hf:8.1f} tok/s")
        for rows in (1, 32):
            for slot in range(rows):
                lm.prefill(slot, ids)
            tokens = torch.full((rows,), 5, device="cuda")
            for warm in range(3):
                lm.decode(tokens, torch.full((rows,), len(ids) + warm, device="cuda"), len(ids) + warm + 1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(steps):
                pos = len(ids) + i
                logits = lm.decode(tokens, torch.full((rows,), pos, device="cuda"), pos + 1)
                tokens = logits.argmax(-1)
            torch.cuda.synchronize()
            rate = rows * steps / (time.perf_counter() - t)
            print(f"  fast path decode, {rows:>2} rows: {rate:10.1f} tok/s  ({rate / hf:.1f}x the baseline)")


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return
    with tempfile.TemporaryDirectory() as tmp:
        ok = _greedy_equality(Path(tmp))
    _speed()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
