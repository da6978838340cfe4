"""Real local fine-tuning: LoRA (PEFT) or full, on a chat or prompt/completion JSONL file.

What the server's job queue relies on:

* ``JobSpec`` mirrors ``JOB_DIR/job.json``; ``run_job(spec, job_dir, resume=..., should_stop=...)``
  trains, appends OpenAI-shaped events to ``events.jsonl``, checkpoints every epoch to
  ``checkpoints/epoch-N/`` and writes the result atomically to ``result/``.
* Loss is on assistant (chat) or completion (legacy) tokens only.
* No compute is spent on padding: the examples of a step are packed into rows (as long as
  the step's longest example) with ``position_ids`` restarting at each example, from which
  transformers builds a block-diagonal causal mask; rows go through in micro-batches under
  a token budget, and the vocabulary projection runs only at positions that carry a label
  (``logits_to_keep``).
* On CUDA: bf16 autocast over bf16 base weights, LoRA weights (and their optimizer state)
  in fp32; gradient checkpointing when a micro-batch's activations would not fit in the
  GPU's free memory (or after an out-of-memory error, which retries the step); a 4-bit
  base (QLoRA, ``quantize: "4bit"``) when bitsandbytes is installed.
* Data order depends only on (seed, epoch), and a checkpoint holds the trainable weights,
  optimizer, scheduler and RNG state, so a resumed job continues as if never stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridtune.core.files import write_json
from gridtune.core.hyperparams import default_epochs

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # when none found
BASE_LR = {"lora": 1e-3, "full": 5e-5}  # × learning_rate_multiplier
MAX_LENGTH = 1024
VALID_MAX_EXAMPLES = 64  # validation loss on a fixed subset keeps evaluation cheap on a CPU
CHECKPOINT_STATE = "state.json"
RESULT_INFO = "gridtune.json"


class DataError(ValueError):
    """The training data cannot be used; the message is one line naming the problem."""


class TrainingCancelled(Exception):
    """Raised inside the step loop when ``should_stop`` turned true."""


# ---------------------------------------------------------------- job spec


def _auto(value: Any) -> Any:
    return None if value in (None, "auto") else value


@dataclass
class JobSpec:
    id: str
    base_model: str | None
    training_file: Path
    validation_file: Path | None = None
    method: str = "lora"
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    seed: int = 0
    suffix: str | None = None
    max_length: int = MAX_LENGTH
    lora_r: int = 16
    device: str | None = None
    gradient_checkpointing: bool | None = None  # None: on when activations would not fit (CUDA)
    quantize: str | None = None  # "4bit": QLoRA base on CUDA when bitsandbytes is installed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        if not data.get("training_file"):
            raise DataError("job.json names no training_file")
        hp = data.get("hyperparameters") or {}
        method = data.get("method") or "lora"
        if isinstance(method, dict):  # OpenAI's {"type": "supervised", ...} shape
            method = "lora"
        if method not in ("lora", "full"):
            raise DataError(f"unknown method {method!r}: use 'lora' or 'full'")
        n_epochs, batch_size, lrm = (_auto(hp.get(k)) for k in ("n_epochs", "batch_size", "learning_rate_multiplier"))
        return cls(
            id=str(data.get("id") or "ftjob-local"),
            base_model=data.get("base_model"),
            training_file=Path(data["training_file"]),
            validation_file=Path(data["validation_file"]) if data.get("validation_file") else None,
            method=method,
            n_epochs=int(n_epochs) if n_epochs is not None else None,
            batch_size=int(batch_size) if batch_size is not None else None,
            learning_rate_multiplier=float(lrm) if lrm is not None else None,
            seed=int(data.get("seed") or 0),
            suffix=data.get("suffix"),
            max_length=int(data.get("max_length") or MAX_LENGTH),
            lora_r=int(data.get("lora_r") or 16),
            device=data.get("device"),
            gradient_checkpointing=data.get("gradient_checkpointing"),
            quantize=data.get("quantize"),
        )


def default_batch_size(n_examples: int) -> int:
    """About a tenth of the file, between 1 and 8 (small files still get a few steps per epoch)."""
    return max(1, min(8, round(n_examples * 0.1)))


# ---------------------------------------------------------------- data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; -100 where no loss is taken

    @property
    def n_label(self) -> int:
        return sum(1 for x in self.labels if x != -100)


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int = 0
    dropped: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{Path(path).name} line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not ("messages" in record or "prompt" in record):
            raise DataError(f"{Path(path).name} line {number}: expected a 'messages' or 'prompt'/'completion' object")
        records.append(record)
    if not records:
        raise DataError(f"{Path(path).name} has no examples")
    return records


def _chat_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to learn.

    Each span runs from after the generation prompt to the end of the turn, its end-of-turn
    token included (so the model learns to stop), trailing whitespace excluded.
    """
    render = tokenizer.apply_chat_template
    clean = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    full = render(clean, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render(clean[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(clean[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the model's chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def tokenize_record(tokenizer: Any, record: dict[str, Any]) -> Example:
    """Token ids and labels for one chat or prompt/completion record (not truncated)."""
    if "messages" in record:
        text, spans = _chat_spans(tokenizer, record["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [-100] * len(ids)
        for k, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(s <= start < e for s, e in spans):
                labels[k] = ids[k]
        return Example(ids, labels)
    prompt = tokenizer(str(record.get("prompt", "")), add_special_tokens=False)["input_ids"]
    # The end-of-text token teaches the tuned model to stop even without a stop sequence.
    completion = tokenizer(str(record.get("completion", "")), add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    return Example(prompt + completion, [-100] * len(prompt) + completion)


def tokenize_file(tokenizer: Any, path: Path, max_length: int = MAX_LENGTH) -> Dataset:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("training needs a fast tokenizer (tokenizer.json) for the loss mask")
    data = Dataset([])
    for number, record in enumerate(read_jsonl(path), 1):
        try:
            example = tokenize_record(tokenizer, record)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed record; name it
            raise DataError(f"{Path(path).name} line {number}: cannot tokenize ({type(exc).__name__}: {exc})") from None
        if len(example.input_ids) > max_length:
            data.truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        # Labels are predicted from the previous token, so the first position never counts.
        if sum(1 for x in example.labels[1:] if x != -100) == 0:
            data.dropped += 1
            continue
        data.examples.append(example)
    if not data.examples:
        raise DataError(f"{Path(path).name}: no example has assistant/completion tokens to learn from")
    return data


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so resuming replays it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def pack_rows(examples: list[Example], row_len: int) -> list[list[Example]]:
    """First-fit-decreasing: examples into rows of at most ``row_len`` tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        for k, free in enumerate(room):
            if size <= free:
                rows[k].append(example)
                room[k] -= size
                break
        else:
            rows.append([example])
            room.append(row_len - size)
    return rows


def micro_batches(examples: list[Example], token_budget: int) -> list[list[list[Example]]]:
    """A step's examples packed into rows as long as its longest example, the rows grouped
    into micro-batches of at most ``token_budget`` tokens (one row always fits).

    Rows no longer than the longest example keep attention cost at or below that of a
    padded batch, while packing several short examples per row removes the padding.
    """
    if not examples:
        return []
    row_len = max(len(e.input_ids) for e in examples)
    rows = pack_rows(examples, row_len)
    per_micro = max(1, token_budget // row_len)
    return [rows[i:i + per_micro] for i in range(0, len(rows), per_micro)]


def pack(rows: list[list[Example]], device: Any) -> dict[str, Any]:
    """Tensors for rows of packed examples: ids, position ids restarting at every example,
    and the next-token targets.

    Targets are shifted within each example, so no example predicts its neighbour's first
    token; ``keep`` marks the positions that have a target (the only ones projected to
    logits). A row's padding tail gets positions from 0 too, making it a segment of its own
    that no real token attends to, so no attention mask is needed.
    """
    import torch

    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            size = len(example.input_ids)
            ids[r, at:at + size] = torch.tensor(example.input_ids)
            pos[r, at:at + size] = torch.arange(size)
            target[r, at:at + size - 1] = torch.tensor(example.labels[1:])
            at += size
        pos[r, at:] = torch.arange(width - at)
        n_tokens += at
    keep = target != -100
    return {
        "input_ids": ids.to(device),
        "position_ids": pos.to(device),
        "keep": keep.to(device),
        "targets": target[keep].to(device),
        "n_tokens": n_tokens,
    }


def packed_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Summed cross-entropy over the pack's target tokens."""
    import torch
    import torch.nn.functional as F

    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,  # None + restarting position_ids = block-diagonal causal mask
        "use_cache": False,
    }
    if _keeps_by_mask():
        # (kept positions, vocab): a boolean keep flattens them
        logits = model(**inputs, logits_to_keep=batch["keep"]).logits.float()
    else:
        # transformers before the boolean logits_to_keep: the decoder's hidden states, projected
        # at the kept positions only, as the model's own head would (soft-capping, scaling)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(**inputs).last_hidden_state[batch["keep"]]
        logits = base.get_output_embeddings()(hidden).float()
        scaling = getattr(base.config, "logits_scaling", None)
        if scaling:
            logits = logits / scaling
        cap = getattr(base.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, batch["targets"], reduction="sum")


_KEEP_BY_MASK: bool | None = None


def _keeps_by_mask() -> bool:
    """Whether this transformers takes a boolean [rows, positions] ``logits_to_keep``
    (newer releases; 5.17's models index with it as positions and fail)."""
    global _KEEP_BY_MASK
    if _KEEP_BY_MASK is None:
        import torch

        try:
            from transformers.modeling_utils import slice_logits_to_keep

            mask = torch.tensor([[True, False, True], [False, True, True]])
            _KEEP_BY_MASK = tuple(slice_logits_to_keep(torch.zeros(2, 3, 1), mask).shape) == (4, 1)
        except Exception:  # noqa: BLE001 - absent or another contract: the explicit path
            _KEEP_BY_MASK = False
    return _KEEP_BY_MASK


# ---------------------------------------------------------------- events and files


class EventLog:
    """Appends OpenAI-shaped fine-tuning events to ``events.jsonl``, one flushed line each."""

    def __init__(self, path: Path, echo: Callable[[dict[str, Any]], None] | None = None):
        self.path = Path(path)
        self.echo = echo

    def emit(self, message: str, *, type: str = "message", level: str = "info", data: dict | None = None) -> dict:
        event = {
            "id": f"ftevent-{uuid.uuid4().hex[:24]}",
            "object": "fine_tuning.job.event",
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "type": type,
            "data": data if data is not None else {},
        }
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
        if self.echo:
            self.echo(event)
        return event


def read_events(job_dir: Path) -> list[dict[str, Any]]:
    path = Path(job_dir) / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_checkpoint(job_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete ``checkpoints/epoch-N`` and its state, or None."""
    best = None
    root = Path(job_dir) / "checkpoints"
    for ckpt in root.glob("epoch-*") if root.is_dir() else []:
        state_file = ckpt / CHECKPOINT_STATE
        if not state_file.is_file():
            continue
        state = json.loads(state_file.read_text())
        if best is None or state["epoch"] > best[1]["epoch"]:
            best = (ckpt, state)
    return best


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    result_dir: Path
    trained_tokens: int
    steps: int
    final_train_loss: float | None
    final_valid_loss: float | None
    losses: list[float] = field(default_factory=list)


def _threads() -> None:
    import torch

    wanted = os.environ.get("GRIDTUNE_TRAIN_THREADS")
    torch.set_num_threads(int(wanted) if wanted else max(1, os.cpu_count() or 1))


def quantize_4bit(model: Any, device: str) -> int:
    """Replace the model's linear layers (not the output head) by bitsandbytes' NF4 layers
    computing in bf16, in place: the QLoRA base. Returns how many were replaced."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.bfloat16), requires_grad=False,
                                         quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to("cpu", torch.bfloat16), requires_grad=False)
            setattr(module, name, q.to(device))  # quantized as it moves to the GPU
            replaced += 1
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return replaced


def _four_bit(spec: JobSpec, loaded: Any, say: Callable[[str], None]) -> bool:
    """Whether to train on a 4-bit base: asked for, LoRA, CUDA and bitsandbytes importable."""
    if (spec.quantize or "").lower() not in ("4bit", "nf4", "qlora"):
        return False
    if spec.method != "lora" or not str(loaded.device).startswith("cuda"):
        say("quantize=4bit applies to LoRA on a CUDA GPU: training on the unquantized base")
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or built without this GPU's CUDA
        say("quantize=4bit needs bitsandbytes (pip install bitsandbytes): training on the bf16 base")
        return False
    return True


def lora_targets(model: Any) -> list[str]:
    """The names of the linear layers inside the decoder's blocks (every attention and MLP
    projection: q/k/v/o and gate/up/down for Llama, Qwen, Gemma, Mistral; the fused
    qkv_proj and gate_up_proj for Phi-3), read from the model's own modules; not the
    output head, embeddings or a vision tower. The fixed list only when none is found."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if (isinstance(module, torch.nn.Linear) and module is not head and "layers" in parts
                and not any("vision" in p or "visual" in p or "multi_modal" in p for p in parts)):
            names.add(parts[-1])
    if names:
        return sorted(names)
    return sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(LORA_TARGETS))


def build_model(spec: JobSpec, loaded: Any, say: Callable[[str], None] = lambda _: None) -> Any:
    """The trainable model: LoRA adapters on every attention and MLP projection, or all weights.

    LoRA weights are fp32 whatever the base's dtype (bf16 on CUDA): their updates are far
    smaller than bf16's resolution, and under autocast they are cast per matmul anyway."""
    import torch

    model = loaded.model
    model.config.use_cache = False
    if spec.method == "full":
        if loaded.device != "cpu":
            model.float()  # full FT keeps fp32 master weights; bf16 only under autocast
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)  # the same initial adapters for the same seed
    targets = lora_targets(model)
    if not targets:
        raise DataError("LoRA found none of the usual projection layers in this model; try method 'full'")
    if _four_bit(spec, loaded, say):
        n = quantize_4bit(model, str(loaded.device))
        try:
            model.is_loaded_in_4bit = True  # so PEFT wraps them with its bitsandbytes LoRA layers
        except AttributeError:  # a read-only property in some transformers releases
            pass
        say(f"QLoRA: {n} linear layers of the base quantized to 4-bit NF4 (bitsandbytes), bf16 compute")
    config = LoraConfig(r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0,
                        target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if str(loaded.device).startswith("cuda"):
        # Under autocast every LoRA matmul runs in bf16 anyway: PEFT's cast of each adapter's
        # input to fp32 first is two kernels per adapter and step thrown away (training on
        # a GPU is launch-bound for small models).
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return peft_model


def activation_bytes(config: Any, tokens: int) -> int:
    """An upper estimate of what one micro-batch of ``tokens`` keeps for backward under bf16
    autocast: per layer and token the attention and MLP inputs and intermediates, plus the
    fp32 logits and their gradient at every position (the worst case of ``logits_to_keep``)."""
    h = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    layers = int(config.num_hidden_layers)
    per_token = layers * (16 * h + 6 * inter) * 2 + int(config.vocab_size) * (2 + 4 + 4)
    return tokens * per_token


def wants_checkpointing(spec: JobSpec, model: Any, device: str, token_budget: int) -> bool:
    """Gradient checkpointing: as the job says, else on CUDA when a full micro-batch's
    activations would take more than 80% of the GPU memory still free."""
    if spec.gradient_checkpointing is not None:
        return bool(spec.gradient_checkpointing)
    if not device.startswith("cuda"):
        return False
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return activation_bytes(model.config, token_budget) > 0.8 * free


def enable_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing needs no input gradients, so frozen embeddings are fine.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model: Any, examples: list[Example], device: str, token_budget: int) -> float:
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), _autocast(device):
        for group in micro_batches(examples, token_budget):
            batch = pack(group, device)
            total += float(packed_loss_sum(model, batch))
            count += int(batch["targets"].numel())
    model.train(was_training)
    return total / max(1, count)


def save_result(model: Any, loaded: Any, spec: JobSpec, job_dir: Path) -> Path:
    """Write ``result/`` atomically: a PEFT adapter dir (LoRA) or a full model dir (full)."""
    final = Path(job_dir) / "result"
    tmp = Path(job_dir) / ".result.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    write_json(tmp / RESULT_INFO, {
        "base_model": spec.base_model, "base_name": loaded.name, "method": spec.method,
        "job_id": spec.id, "suffix": spec.suffix,
    })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def run_job(
    spec: JobSpec,
    job_dir: Path,
    *,
    resume: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    events: EventLog | None = None,
    loaded: Any = None,
) -> TrainResult:
    """Train ``spec`` in ``job_dir``; raises TrainingCancelled, DataError or what training raised.

    ``loaded`` (a LoadedModel) skips loading the base again — the caller gives up ownership,
    since the model is trained in place.
    """
    import torch

    from gridtune.server.model import load_model

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    events = events or EventLog(job_dir / "events.jsonl")
    _threads()

    checkpoint = last_checkpoint(job_dir) if resume else None
    if resume and checkpoint is None:
        events.emit("No checkpoint to resume from; starting from the beginning")
    if checkpoint is None:
        events.emit("Fine-tuning job started")

    if loaded is None:
        loaded = load_model(spec.base_model, device=spec.device)
    device = loaded.device
    train_data = tokenize_file(loaded.tokenizer, spec.training_file, spec.max_length)
    valid = None
    if spec.validation_file:
        valid_data = tokenize_file(loaded.tokenizer, spec.validation_file, spec.max_length)
        valid = valid_data.examples[:VALID_MAX_EXAMPLES]
    examples = train_data.examples
    n = len(examples)
    n_epochs = spec.n_epochs or default_epochs(n)
    batch_size = min(spec.batch_size or default_batch_size(n), n)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * n_epochs
    lr = BASE_LR[spec.method] * (spec.learning_rate_multiplier or 1.0)
    token_budget = max(spec.max_length, 8192 if device.startswith("cuda") else 2048)

    if checkpoint is None:
        events.emit(
            f"Training on {n} examples ({train_data.n_tokens} tokens) with {spec.method}: "
            f"{n_epochs} epochs, batch size {batch_size}, {total_steps} steps, learning rate {lr:g}",
            data={"n_examples": n, "n_epochs": n_epochs, "batch_size": batch_size,
                  "total_steps": total_steps, "learning_rate": lr, "tokens": train_data.n_tokens},
        )
        if train_data.truncated or train_data.dropped:
            events.emit(f"{train_data.truncated} examples truncated to {spec.max_length} tokens, "
                        f"{train_data.dropped} dropped with nothing to learn", level="warn")

    model = build_model(spec, loaded, say=lambda m: events.emit(m) if checkpoint is None else None)
    checkpointing = wants_checkpointing(spec, model, device, token_budget)
    if checkpointing:
        enable_checkpointing(model)
        if checkpoint is None:
            events.emit("Gradient checkpointing on: a micro-batch's activations would not fit in memory"
                        if spec.gradient_checkpointing is None else "Gradient checkpointing on")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all the adapters' updates on CUDA
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True if device.startswith("cuda") else None)
    warmup = max(1, total_steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    step, start_epoch, trained_tokens = 0, 0, 0
    valid_loss: float | None = None
    if checkpoint is not None:
        ckpt_dir, state = checkpoint
        from safetensors.torch import load_file

        weights = load_file(str(ckpt_dir / "trainable.safetensors"), device=str(device))
        missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(weights)
        if missing:
            raise DataError(f"checkpoint {ckpt_dir.name} does not match the model ({len(missing)} weights missing)")
        model.load_state_dict(weights, strict=False)
        extra = torch.load(ckpt_dir / "training_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        step, start_epoch = state["step"], state["epoch"]
        trained_tokens = state.get("trained_tokens", 0)
        valid_loss = state.get("valid_loss")
        events.emit(f"Fine-tuning job resumed from checkpoint {ckpt_dir.name} (step {step}/{total_steps})")

    eval_every = max(1, total_steps // 10)
    losses: list[float] = []
    train_loss: float | None = None
    for epoch in range(start_epoch, n_epochs):
        order = epoch_order(n, spec.seed, epoch)
        for first in range(0, n, batch_size):
            if should_stop():
                raise TrainingCancelled()
            group = [examples[i] for i in order[first:first + batch_size]]
            started = time.perf_counter()
            n_targets = sum(max(0, sum(1 for x in e.labels[1:] if x != -100)) for e in group)

            while True:
                try:
                    step_loss, step_tokens = _accumulate(model, optimizer, group, n_targets, token_budget,
                                                         device, should_stop)
                    break
                except torch.OutOfMemoryError:
                    # The step starts again (its gradients are cleared): first with
                    # checkpointing, then with micro-batches half as large.
                    if not device.startswith("cuda") or (checkpointing and token_budget <= spec.max_length):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    if not checkpointing:
                        checkpointing = True
                        enable_checkpointing(model)
                        events.emit("Out of GPU memory: gradient checkpointing on, step retried", level="warn")
                    else:
                        token_budget = max(spec.max_length, token_budget // 2)
                        events.emit(f"Out of GPU memory: micro-batches of {token_budget} tokens, step retried",
                                    level="warn")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            trained_tokens += step_tokens
            train_loss = step_loss / n_targets
            losses.append(train_loss)
            elapsed = time.perf_counter() - started
            epoch_end = first + batch_size >= n
            evaluated = valid is not None and (step % eval_every == 0 or epoch_end)
            if evaluated:
                valid_loss = evaluate(model, valid, device, token_budget)
            message = f"Step {step}/{total_steps}: training loss={train_loss:.4f}"
            if evaluated:
                message += f", validation loss={valid_loss:.4f}"
            events.emit(message, type="metrics", data={
                "step": step, "total_steps": total_steps, "train_loss": round(train_loss, 6),
                "valid_loss": round(valid_loss, 6) if evaluated else None,
                "epoch": epoch + 1, "tokens_per_s": round(step_tokens / max(elapsed, 1e-9), 1),
                "tokens": step_tokens, "seconds": round(elapsed, 4),
            })
        _save_checkpoint(job_dir, spec, model, optimizer, scheduler, epoch + 1, step, trained_tokens,
                         train_loss, valid_loss)
        events.emit(f"Epoch {epoch + 1}/{n_epochs} done", data={"epoch": epoch + 1, "step": step})

    result_dir = save_result(model, loaded, spec, job_dir)
    events.emit("New fine-tuned model created", data={"result_dir": str(result_dir)})
    return TrainResult(result_dir, trained_tokens, step, train_loss, valid_loss, losses)


def _accumulate(model: Any, optimizer: Any, group: list[Example], n_targets: int, token_budget: int,
                device: str, should_stop: Callable[[], bool]) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches: (summed loss, tokens)."""
    total, tokens = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for micro in micro_batches(group, token_budget):
        if should_stop():  # a long step still stops within one micro-batch
            raise TrainingCancelled()
        batch = pack(micro, device)
        with _autocast(device):
            loss_sum = packed_loss_sum(model, batch)
        (loss_sum / n_targets).backward()
        total += float(loss_sum.detach())
        tokens += batch["n_tokens"]
    return total, tokens


def _save_checkpoint(job_dir: Path, spec: JobSpec, model: Any, optimizer: Any, scheduler: Any,
                     epoch: int, step: int, trained_tokens: int, train_loss: float | None,
                     valid_loss: float | None) -> Path:
    """``checkpoints/epoch-N``: trainable weights (+ a loadable adapter for LoRA) and the
    optimizer, scheduler and RNG state, renamed into place only when complete."""
    import torch
    from safetensors.torch import save_file

    root = Path(job_dir) / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"epoch-{epoch}"
    tmp = root / f".epoch-{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if spec.method == "lora":
        model.save_pretrained(tmp / "adapter")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "training_state.pt")
    write_json(tmp / CHECKPOINT_STATE, {
        "epoch": epoch, "step": step, "trained_tokens": trained_tokens, "created_at": int(time.time()),
        "train_loss": train_loss, "valid_loss": valid_loss, "method": spec.method,
    })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if spec.method == "full":  # full weights + Adam moments are big: keep only the newest
        for old in root.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def iter_metrics(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e.get("type") == "metrics"]
