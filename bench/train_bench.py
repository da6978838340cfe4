"""Fine-tuning throughput: gridtune's training path against a plain PyTorch + PEFT loop and TRL.

Same model, same LoRA config (r 16, alpha 32, dropout 0, every attention/MLP projection),
same examples, same batches in the same order, same hyperparameters as gridtune's job
(AdamW lr 1e-3, weight decay 0, gradient clipping 1.0, linear warm-up then decay to 10 %),
same initial adapters (seed 0), same thread count and precision (fp32 on a CPU), measured
in the same run. Tokens/s counts real (non-padding) tokens only, so padding shows up as
lost throughput, and skips each loop's first (warm-up) step. Four loops:

* naive     — every batch padded to the fixed max length, HF loss on assistant tokens (baseline)
* bucketed  — the same loop, padded only to the longest example of each batch
* gridtune  — ``train.run_job``: padding-free packing with position_ids, logits only where
              there is a label (its per-step timings from the job's metrics events)
* trl       — Hugging Face TRL's ``SFTTrainer`` (optional: ``pip install trl``), configured
              for the device: fp32 on a CPU (its default bf16 autocast emulates bf16 on a CPU
              without native bf16, hundreds of seconds a step), no gradient checkpointing
              (TRL's default; gridtune does not checkpoint when activations fit), no eval,
              saving or reporting, loss logged every step

Wall time is from the start of the training call to the end of the last step, with the
model loaded before it for every loop: for gridtune the ``run_job`` call (it tokenizes the
file, wraps LoRA and builds the optimizer inside it), for TRL ``trainer.train()`` (its
tokenization and LoRA wrapping happen in ``SFTTrainer(...)``, before, untimed), for the plain
loops the step loop. Final loss is the last step's training loss (mean over its target tokens).

    python bench/train_bench.py                  # tiny random model, about a minute on 2 cores
    python bench/train_bench.py --default-model  # SmolLM2-135M-Instruct
    python bench/train_bench.py --default-model --seq-len 310 --rounds 1
        # issue 22's setting: 64 chat examples, 12,638 tokens, one epoch; TRL beside gridtune
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = ("energy health school market river city future model data light art law trade "
         "music water power travel science work home").split()
BATCH_SIZE = 8
LORA_R = 16


def synthetic_rows(n: int, seq_len: int, tokenizer: Any, seed: int = 0) -> list[dict]:
    """Chat examples whose token lengths spread between a quarter of ``seq_len`` and ``seq_len``
    (real exports vary like this; the naive loop pads them all to ``seq_len``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = rng.randint(seq_len // 4, seq_len)
        prompt = f"Write about {rng.choice(WORDS)} in case {i}."
        reply = []
        while True:
            reply.append(rng.choice(WORDS))
            if len(reply) % 8 == 0:
                row = {"messages": [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": " ".join(reply)}]}
                ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
                if len(ids) >= target - 8:
                    break
        rows.append(row)
    return rows


def _lora_config(model: Any, r: int = LORA_R) -> Any:
    """gridtune's LoRA config (``train.build_model``) for this model."""
    from peft import LoraConfig

    from gridtune.server.train import lora_targets

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=lora_targets(model))


def _lora(model: Any) -> Any:
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)  # the same initial adapters as gridtune's job (seed 0)
    return get_peft_model(model, _lora_config(model))


def _schedule(total_steps: int) -> Any:
    """gridtune's learning-rate factor per step (as in ``train.run_job``): linear warm-up, then
    linear decay to 10 %."""
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total_steps - warmup))

    return factor


def _optimizer(params: list, total_steps: int) -> tuple[Any, Any]:
    import torch

    from gridtune.server.train import BASE_LR

    opt = torch.optim.AdamW(params, lr=BASE_LR["lora"], weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total_steps))


def plain_loop(model_ref: str, examples: list, batches: list[list[int]], seq_len: int, bucketed: bool,
               total_steps: int) -> dict:
    """The textbook loop: pad, attention mask, labels -100 on padding and prompts, model(labels=...),
    AdamW with gridtune's learning rate, schedule and clipping."""
    import torch

    from gridtune.server.model import load_model

    loaded = load_model(model_ref)
    model = _lora(loaded.model)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, total_steps)
    pad = loaded.tokenizer.pad_token_id
    device = loaded.device
    tokens, seconds, loss = 0, 0.0, float("nan")
    wall_started = time.perf_counter()
    for k, batch in enumerate(batches):
        group = [examples[i] for i in batch]
        width = max(len(e.input_ids) for e in group) if bucketed else seq_len
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for row, e in enumerate(group):
            ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, :len(e.input_ids)] = 1
            labels[row, :len(e.labels)] = torch.tensor(e.labels)
        started = time.perf_counter()
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k:  # the first step warms up allocators and kernels
            seconds += time.perf_counter() - started
            tokens += sum(len(e.input_ids) for e in group)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "wall_s": time.perf_counter() - wall_started, "final_loss": loss}


def gridtune_loop(model_ref: str, rows: list[dict], steps: int, work: Path) -> tuple[list[dict], float]:
    """Run the real job path for exactly ``steps`` steps on a model loaded beforehand; returns its
    metrics events' data and the wall time from the ``run_job`` call to the end of the last step."""
    from gridtune.server import train
    from gridtune.server.model import load_model

    job_dir = work / "job"
    job_dir.mkdir()
    (job_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    epochs = math.ceil(steps / math.ceil(len(rows) / BATCH_SIZE))
    spec = train.JobSpec(id="ftjob-bench", base_model=model_ref, training_file=job_dir / "train.jsonl",
                         n_epochs=epochs, batch_size=BATCH_SIZE, seed=0)
    done: list[dict] = []
    ended: list[float] = []

    def echo(event: dict) -> None:
        if event["type"] == "metrics":
            ended.append(time.perf_counter())
            done.append(event["data"])

    events = train.EventLog(job_dir / "events.jsonl", echo=echo)
    loaded = load_model(model_ref)
    started = time.perf_counter()
    try:
        train.run_job(spec, job_dir, should_stop=lambda: len(done) >= steps, events=events, loaded=loaded)
    except train.TrainingCancelled:
        pass
    return done[:steps], ended[steps - 1] - started


def trl_loop(model_ref: str, examples: list, batches: list[list[int]], total_steps: int, work: Path) -> dict | None:
    """TRL's ``SFTTrainer`` on the same batches; None when TRL is not installed.

    Loss masking: SmolLM2's chat template has no ``{% generation %}`` markers and TRL cannot
    patch it, so ``assistant_only_loss`` fails; TRL's prompt/completion route gives the same
    token ids but also trains the newline after ``<|im_end|>``. So TRL gets the examples
    pre-tokenized — gridtune's own input ids, with ``completion_mask`` = gridtune's labels — and
    ``completion_only_loss=True``: exactly gridtune's assistant-only targets.
    Order: the rows in gridtune's batch order, read sequentially (when the example count is
    not a multiple of the batch size, TRL's batches straddle epochs: same examples, other groups).
    """
    try:
        import datasets
        import torch
        from transformers import PrinterCallback, ProgressCallback, TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None

    from gridtune.server.model import load_model
    from gridtune.server.train import BASE_LR, MAX_LENGTH

    datasets.disable_progress_bars()
    loaded = load_model(model_ref)
    device = str(loaded.device)
    order = [i for batch in batches for i in batch]
    data = datasets.Dataset.from_list([
        {"input_ids": examples[i].input_ids, "completion_mask": [int(x != -100) for x in examples[i].labels]}
        for i in order])
    threads = torch.get_num_threads()
    cpu = not device.startswith("cuda")
    config = SFTConfig(
        output_dir=str(work / "trl"), seed=0, max_steps=len(batches), per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1, learning_rate=BASE_LR["lora"], weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", train_sampling_strategy="sequential", max_length=MAX_LENGTH,
        completion_only_loss=True, packing=False, padding_free=False, gradient_checkpointing=False,
        bf16=not cpu, fp16=False, use_cpu=cpu, dataloader_num_workers=0, dataloader_pin_memory=not cpu,
        eval_strategy="no", save_strategy="no", report_to="none", logging_strategy="steps", logging_steps=1,
        disable_tqdm=True,
    )

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.threads: set[int] = set()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.threads.add(torch.get_num_threads())

    class Trainer(SFTTrainer):  # gridtune's schedule (HF's linear warm-up starts from 0, decays to 0)
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                      _schedule(total_steps))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    torch.manual_seed(0)  # the same initial adapters as the other loops
    clock = Clock()
    trainer = Trainer(model=loaded.model, args=config, train_dataset=data, processing_class=loaded.tokenizer,
                      peft_config=_lora_config(loaded.model), callbacks=[clock])
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(clock.ends) == len(batches) and clock.threads == {threads}, (len(clock.ends), clock.threads)
    tokens = sum(sum(len(examples[i].input_ids) for i in b) for b in batches[1:])
    seconds = clock.ends[-1] - clock.ends[0]  # steps 2..N, step to step (batch fetch and logging included)
    return {"tokens_per_s": tokens / seconds, "wall_s": clock.ends[-1] - started, "final_loss": losses[-1]}


def run(model_dir_or_none: str | None = None, n_examples: int = 64, seq_len: int = 256, steps: int = 8,
        *, threads: int | None = None, rounds: int = 3) -> dict:
    """Measure the three loops on the same data; returns figures and ratios against the naive loop.

    ``model_dir_or_none``: a model directory, "SmolLM2-135M-Instruct", or None for a tiny
    random model built on the fly.
    """
    import os

    import torch

    from gridtune.server import train
    from gridtune.server.model import load_model

    threads = threads or (os.cpu_count() or 1)
    os.environ["GRIDTUNE_TRAIN_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="gridtune-train-bench-") as tmp:
        work = Path(tmp)
        model_ref = model_dir_or_none
        if model_ref is None:
            from tests.tiny_model import make_tiny_model

            model_ref = str(make_tiny_model(work / "tiny-bench", vocab_size=2048, layers=4, hidden=256))
        if model_ref == "SmolLM2-135M-Instruct":
            # Dequantizing the GGUF takes ~15 s; every loop loads a plain copy instead.
            plain = work / "smollm2-plain"
            base = load_model(model_ref)
            base.model.save_pretrained(plain)
            base.tokenizer.save_pretrained(plain)
            del base
            model_ref = str(plain)
        from gridtune.server.model import load_tokenizer, resolve_source

        tokenizer = load_tokenizer(*resolve_source(model_ref)[1:])
        rows = synthetic_rows(n_examples, seq_len, tokenizer)
        examples = [train.tokenize_record(tokenizer, r) for r in rows]
        seq_len = max(seq_len, max(len(e.input_ids) for e in examples))
        # gridtune's own batches (seed 0), so every loop sees the same groups in the same order
        steps_per_epoch = math.ceil(len(rows) / BATCH_SIZE)
        total_steps = steps_per_epoch * math.ceil(steps / steps_per_epoch)  # the job's schedule length
        batches: list[list[int]] = []
        epoch = 0
        while len(batches) < steps:
            order = train.epoch_order(len(examples), 0, epoch)
            batches += [order[i:i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]
            epoch += 1
        batches = batches[:steps]
        real_tokens = [sum(len(examples[i].input_ids) for i in b) for b in batches]

        timed = real_tokens[1:]  # every loop skips its first (warm-up) step

        def gridtune() -> dict:
            job_work = Path(tempfile.mkdtemp(dir=work))
            job, wall = gridtune_loop(model_ref, rows, steps, job_work)
            # a step's time is its (exactly known) token count over the rate its event reported
            rate = sum(timed) / sum(t / d["tokens_per_s"] for t, d in zip(timed, job[1:]))
            return {"tokens_per_s": rate, "wall_s": wall, "final_loss": job[-1]["train_loss"]}

        loops = {
            "gridtune": gridtune,
            "naive": lambda: plain_loop(model_ref, examples, batches, seq_len, False, total_steps),
            "bucketed": lambda: plain_loop(model_ref, examples, batches, seq_len, True, total_steps),
            "trl": lambda: trl_loop(model_ref, examples, batches, total_steps, Path(tempfile.mkdtemp(dir=work))),
        }
        # The cores are shared: best of `rounds`, in alternating order, damps others' load.
        best: dict[str, dict | None] = {name: None for name in loops}
        for r in range(rounds):
            for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
                got = loops[name]()
                if got is None:  # TRL not installed
                    loops.pop(name)
                    continue
                if best[name] is None or got["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = got
        results = {name: v for name, v in best.items() if v is not None}
    padding = 1 - sum(real_tokens) / (len(batches) * BATCH_SIZE * seq_len)
    base = results["naive"]["tokens_per_s"]
    figures = {
        "model": model_dir_or_none or "tiny random Llama (4 layers, hidden 256)",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": threads, "rounds": rounds, "n_examples": n_examples, "seq_len": seq_len, "steps": steps,
        "batch_size": BATCH_SIZE, "padding_fraction_naive": round(padding, 3),
        "tokens_trained": sum(real_tokens), "dataset_tokens": sum(len(e.input_ids) for e in examples),
        **{f"{k}_tokens_per_s": round(v["tokens_per_s"], 1) for k, v in results.items()},
        **{f"{k}_wall_s": round(v["wall_s"], 2) for k, v in results.items()},
        **{f"{k}_final_loss": round(v["final_loss"], 4) for k, v in results.items()},
        "ratio_gridtune_vs_naive": round(results["gridtune"]["tokens_per_s"] / base, 2),
        "ratio_bucketed_vs_naive": round(results["bucketed"]["tokens_per_s"] / base, 2),
        "trl": "trl" in results,
    }
    if "trl" in results:
        trl, ours = results["trl"], results["gridtune"]
        ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
        figures["ratio_gridtune_vs_trl"] = round(ratio, 2)
        figures["loss_gridtune_minus_trl"] = round(ours["final_loss"] - trl["final_loss"], 4)
        # targets (issue 22): on a CPU ≥ 1.5× TRL's tokens/s, final loss ≤ TRL's + 0.05
        figures["target_met"] = ((ratio >= 1.5 or figures["device"] != "cpu")
                                 and ours["final_loss"] <= trl["final_loss"] + 0.05)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default-model", action="store_true", help="use SmolLM2-135M-Instruct")
    parser.add_argument("--model", help="a local model directory")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each loop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = "SmolLM2-135M-Instruct" if args.default_model else args.model
    figures = run(model, n_examples=args.examples, seq_len=args.seq_len, steps=args.steps, rounds=args.rounds)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"model: {figures['model']}  device: {figures['device']}  threads: {figures['threads']}  "
          f"best of {figures['rounds']} rounds")
    print(f"{figures['n_examples']} examples ({figures['dataset_tokens']} tokens), {figures['steps']} steps of "
          f"{figures['batch_size']} ({figures['tokens_trained']} tokens), lengths up to {figures['seq_len']} "
          f"tokens ({figures['padding_fraction_naive']:.0%} of the naive batches is padding)")

    def line(label: str, key: str, note: str) -> None:
        print(f"  {label:<34}: {figures[key + '_tokens_per_s']:>10.1f} tokens/s  "
              f"wall {figures[key + '_wall_s']:>7.1f} s  final loss {figures[key + '_final_loss']:.4f}  {note}")

    line("naive PyTorch+PEFT (fixed padding)", "naive", "(baseline)")
    line("bucketed (pad to batch max)", "bucketed", f"{figures['ratio_bucketed_vs_naive']:.2f}x")
    line("gridtune (packed, padding-free)", "gridtune", f"{figures['ratio_gridtune_vs_naive']:.2f}x")
    if not figures["trl"]:
        print("  TRL SFTTrainer: not installed (pip install trl), skipped")
        return
    line("TRL SFTTrainer", "trl", f"{figures['trl_tokens_per_s'] / figures['naive_tokens_per_s']:.2f}x")
    target = ("target on a CPU: >= 1.5x, loss <= TRL + 0.05" if figures["device"] == "cpu"
              else "target: loss <= TRL + 0.05")
    print(f"  gridtune vs TRL: {figures['ratio_gridtune_vs_trl']:.2f}x tokens/s, final loss "
          f"{figures['loss_gridtune_minus_trl']:+.4f}  ({target}: {'met' if figures['target_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
