"""Inference with continuous (dynamic) batching.

One thread owns the model(s) and runs the decode loop; request handlers hand it
work through a queue and get their text back through an asyncio queue.

Between two decode steps the loop admits waiting requests (up to a prompt-token
budget, so running rows are never starved): each new prompt is prefilled into a
free row, and rows of very different ages decode in one forward pass. A finished
or cancelled row leaves the batch before the next step.

Two decoders: the fast path (fastlm.py: Llama and its kin, preallocated KV
slots, fused weights, bf16 where the CPU has it) serves the base model and every
tuned one (LoRA merged into a copy); the transformers path (a left-padded
DynamicCache) serves other architectures and is the reference the tests hold the
fast path to.

Every row has its own temperature, top_p, seed, token budget and stop strings.
Stop strings are found in the decoded text; the streamed text always holds back
a tail that could be the start of a stop, so a stop is never half-emitted.
Requests for different models live in one batch per model and take turns step by step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import random
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("gridtune.server")

DEFAULT_MAX_TOKENS = 512


class EngineError(Exception):
    """A request the engine cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 bans)


@dataclass
class Delta:
    """A piece of generated text; the last one of a request has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0


@dataclass
class _Request:
    model_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the request's loop is gone (client went away at shutdown)
            self.cancelled.set()


class _Row:
    """One request while it decodes: its tokens, what text was sent, its sampler."""

    __slots__ = ("req", "tokens", "emitted", "generator", "done", "text", "prefix_at", "read_at", "position")

    def __init__(self, req: _Request, device: str):
        import torch

        self.req = req
        self.tokens: list[int] = []
        self.emitted = 0  # characters of ``text`` already sent
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        self.done = False
        # Incremental detokenization (as TGI/vLLM do): decode only the tokens since a
        # stable prefix, so a long completion costs O(1) per token, not O(length).
        self.text = ""
        self.prefix_at = 0
        self.read_at = 0
        self.position = len(req.prompt_ids)  # where the next token's K/V goes (fast path)


@dataclass
class _Served:
    """One servable model: weights, tokenizer, and how it decodes (fast path or HF)."""

    model_id: str
    kind: str  # "base" | "lora" | "full"
    path: Path | None = None
    module: Any = None  # the transformers model (HF path; None once a fast copy replaces it)
    tokenizer: Any = None
    adapter: str | None = None  # the PEFT adapter name (HF path only)
    loaded: bool = False
    fast: Any = None  # a fastlm.FastLlama when the model runs on the fast path
    eos: set[int] = field(default_factory=set)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    from .model import turn_end_ids

    return ids | turn_end_ids(tokenizer)  # the family's own end of turn (<end_of_turn>, <|end|>)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


PREFIX_MIN = 8  # shorter shared prefixes are cheaper to run than to copy


class _FastBatch:
    """Rows of one fast-path model; row i lives in KV slot i of its FastLlama."""

    def __init__(self, served: _Served):
        self.served = served
        self.lm = served.fast
        self.rows: list[_Row] = []

    def fits(self, new: list[_Request], budget_bytes: int) -> bool:
        """Whether the rows plus ``new``, at the most positions any may reach, stay within
        the KV memory budget (an empty batch always takes one row)."""
        reqs = [r.req for r in self.rows] + new
        if len(reqs) <= 1:
            return True
        longest = max(len(r.prompt_ids) + r.max_new for r in reqs)
        return self.lm.bytes_for(len(reqs), longest + 1) <= budget_bytes

    def admit(self, rows: list[_Row]) -> Any:
        import torch

        out = []
        for row in rows:
            slot, ids = len(self.rows), row.req.prompt_ids
            src, shared = self._shared_prefix(ids)
            if shared:  # the grid's prompts share their template: copy its K/V, run the rest
                self.lm.ensure(slot + 1, len(ids) + 1)
                self.lm.move(src, slot, shared)
            out.append(self.lm.prefill(slot, ids, start=shared) if shared else self.lm.prefill(slot, ids))
            self.rows.append(row)
        return torch.stack(out)

    def _shared_prefix(self, ids: list[int]) -> tuple[int, int]:
        """(slot, length) of the longest prefix of ``ids`` that a row's slot already holds
        (a row's prompt K/V stays put while it decodes); (0, 0) when none is worth copying."""
        if not getattr(self.lm, "extends", False):
            return 0, 0
        best, where = 0, 0
        for slot, row in enumerate(self.rows):
            other = row.req.prompt_ids
            n = 0
            for a, b in zip(ids, other, strict=False):
                if a != b:
                    break
                n += 1
            if n > best:
                best, where = n, slot
        best = min(best, len(ids) - 1)  # the last token runs, for its logits
        return (where, best) if best >= PREFIX_MIN else (0, 0)

    def step(self) -> Any:
        import torch

        positions = [row.position for row in self.rows]
        length = max(positions) + 1
        self.lm.ensure(len(self.rows), length)
        tokens = torch.tensor([row.tokens[-1] for row in self.rows], device=self.lm.device)
        logits = self.lm.decode(tokens, torch.tensor(positions, device=self.lm.device), length)
        for row in self.rows:
            row.position += 1
        return logits

    def keep(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (in order) in slots 0..K-1, moving as few slots as possible."""
        k = len(keep)
        kept = set(keep)
        holes = [i for i in range(k) if i not in kept]
        movers = [i for i in keep if i >= k]
        rows = list(self.rows)
        for hole, src in zip(holes, movers, strict=True):
            self.lm.move(src, hole, rows[src].position)
            rows[hole] = rows[src]
        self.rows = rows[:k]


def _cache_kwarg(module: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); ask the model which it takes."""
    import inspect

    model = module.get_base_model() if hasattr(module, "get_base_model") else module
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _HFBatch:
    """Rows of one model on the transformers path, with a shared left-padded DynamicCache.

    Kept for architectures the fast path does not run, and as the reference the tests
    compare the fast path against. New rows are prefilled together and their cache is
    padded on the left to the running batch's length and concatenated to it."""

    def __init__(self, served: _Served, device: str):
        self.served = served
        self.device = device
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [B, T] long
        self.positions: Any = None  # [B] next position id per row
        self.cache_kwarg = _cache_kwarg(served.module)  # once: inspecting the signature each step is waste

    def _forward(self, input_ids, mask, positions, cache):
        kwargs = {self.cache_kwarg: cache}
        out = self.served.module(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :].float(), getattr(out, "cache", None) or out.past_key_values

    def admit(self, rows: list[_Row]) -> Any:
        import torch
        from transformers import DynamicCache

        pad = self.served.tokenizer.pad_token_id or 0
        length = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.req.prompt_ids)
            ids[i, length - n:] = torch.tensor(r.req.prompt_ids)
            mask[i, length - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        next_pos = mask.sum(-1)
        if self.rows:
            self._merge(cache, mask, next_pos)
        else:
            self.cache, self.mask, self.positions = cache, mask, next_pos
        self.rows = self.rows + rows
        return logits

    def _merge(self, cache: Any, mask: Any, next_pos: Any) -> None:
        import torch

        t_run, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_run, t_new)

        def left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad(old.keys, width - t_run, 2), left_pad(new.keys, width - t_new, 2)])
            old.values = torch.cat([left_pad(old.values, width - t_run, 2), left_pad(new.values, width - t_new, 2)])
        self.mask = torch.cat([left_pad(self.mask, width - t_run, 1), left_pad(mask, width - t_new, 1)])
        self.positions = torch.cat([self.positions, next_pos])

    def step(self) -> Any:
        import torch

        last = torch.tensor([row.tokens[-1] for row in self.rows], device=self.device)
        ones = self.mask.new_ones((self.mask.shape[0], 1))
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits, self.cache = self._forward(last.unsqueeze(1), self.mask, self.positions.unsqueeze(1), self.cache)
        self.positions = self.positions + 1
        return logits

    def keep(self, keep: list[int]) -> None:
        import torch

        if not keep:
            self.rows, self.cache, self.mask, self.positions = [], None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]


def default_threads() -> int:
    """The most intra-op threads decoding may use: the physical cores (GRIDTUNE_THREADS
    overrides; an SMT sibling shares its core's vector units and only adds barrier
    waits); _ThreadTuner drops to one while other processes hold the cores. Measured
    on 2 cores over HTTP with the client beside it: 2 threads decoded 81 tok/s for one
    stream and 295 for 32, one thread 49 and 226. Only this thread may run a team that
    large; ``gridtune serve`` keeps every other thread at one (server/main.py), since a
    second team on the same cores cost 40-50%."""
    import os

    wanted = os.environ.get("GRIDTUNE_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    from .fastlm import physical_cores

    return physical_cores()


class _ThreadTuner:
    """Keeps the decode thread count that is faster *now*: every core on a quiet machine
    (2 threads beat 1 by 1.3-1.7x on 2 cores), one when other processes hold the cores
    (an OpenMP team whose threads get preempted waits at every op: 2 threads fell to a
    fifth of their speed beside a running test suite). Every ``EVERY`` steps it decodes
    ``TRIAL`` steps with the other count and keeps whichever cost less per row."""

    EVERY = 64
    TRIAL = 6

    def __init__(self, most: int):
        self.most = max(1, most)
        self.current = self.most
        self.steps = 0
        self.recent: list[float] = []  # seconds per row of the last TRIAL steps at ``current``
        self.trial: list[float] | None = None  # the same, while trying the other count
        self.switches = 0

    def _set(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def after_step(self, rows: int, seconds: float) -> None:
        if self.most == 1 or rows < 1 or seconds <= 0:
            return
        cost = seconds / rows
        if self.trial is not None:
            self.trial.append(cost)
            if len(self.trial) >= self.TRIAL:
                other = 1 if self.current == self.most else self.most
                baseline = sorted(self.recent)[len(self.recent) // 2] if self.recent else float("inf")
                tried = sorted(self.trial)[len(self.trial) // 2]
                if tried < baseline:
                    self.current = other
                    self.switches += 1
                    log.info("decoding with %d thread(s): %.1f ms a row against %.1f", other, tried * 1e3,
                             baseline * 1e3)
                self._set(self.current)
                self.trial, self.recent = None, []
            return
        self.recent = (self.recent + [cost])[-self.TRIAL:]
        self.steps += 1
        if self.steps % self.EVERY == 0 and len(self.recent) >= self.TRIAL:
            self.trial = []
            self._set(1 if self.current == self.most else self.most)


def kv_budget_bytes() -> int:
    """Most memory one model's KV cache may grow to (GRIDTUNE_KV_MB, default 4096): long
    requests then decode in smaller batches instead of exhausting the machine's memory."""
    import os

    wanted = os.environ.get("GRIDTUNE_KV_MB", "").strip()
    return (int(wanted) if wanted.isdigit() and int(wanted) > 0 else 4096) * 1024 * 1024


class Engine:
    """The model-owning decode loop. Start it with :meth:`start`, end it with :meth:`close`.

    ``fast``: None runs every model the fast path supports on it (see fastlm.py) unless
    GRIDTUNE_DECODER=transformers says otherwise, False keeps the transformers path for
    all; ``dtype`` overrides the fast path's dtype.
    """

    def __init__(self, loaded: Any, *, max_batch: int = 32, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 fast: bool | None = None, dtype: Any = None, threads: int | None = None,
                 calibrate: bool = True):
        self.base = loaded
        self.base_id: str = loaded.name
        self.device: str = loaded.device
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        if fast is None:
            import os

            fast = os.environ.get("GRIDTUNE_DECODER", "").strip().lower() not in ("transformers", "hf")
        self._fast_wanted = fast
        self._fast_dtype = dtype
        self._threads = threads
        self._calibrate_at_start = calibrate
        self._served: dict[str, _Served] = {
            self.base_id: _Served(self.base_id, "base", loaded.source, loaded.model, loaded.tokenizer, None, False)
        }
        self._lock = threading.Lock()
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._peft: Any = None  # the PeftModel wrapping the base once an adapter is loaded (HF path)
        self._active = 0
        cfg = getattr(loaded.model, "config", None)
        self.context_length: int = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.generated_tokens = 0  # a counter for benchmarks and logs
        self._decoding = 0  # rows in decode batches right now (the engine thread writes it)
        self.speed: dict[int, float] = {}  # batch size -> total decode tokens/s on this machine
        self._tuner: _ThreadTuner | None = None
        self.prefill_speed: float | None = None  # prompt tokens/s
        self.kv_budget = kv_budget_bytes()

    # -- models ---------------------------------------------------------------
    def register_tuned(self, model_id: str, result_dir: str | Path) -> None:
        """Make a fine-tuned result servable under ``model_id`` (loaded on first use)."""
        result_dir = Path(result_dir)
        if (result_dir / "adapter_config.json").is_file():
            kind = "lora"
        elif (result_dir / "config.json").is_file():
            kind = "full"
        else:
            raise EngineError(f"{result_dir} holds neither a LoRA adapter nor a model", status=500)
        with self._lock:
            self._served.setdefault(model_id, _Served(model_id, kind, result_dir))

    def model_ids(self) -> list[str]:
        with self._lock:
            return list(self._served)

    def has_model(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._served

    def _get(self, model_id: str) -> _Served:
        with self._lock:
            served = self._served.get(model_id)
        if served is None:
            raise EngineError(f"The model `{model_id}` does not exist", status=404, param="model",
                              code="model_not_found")
        return served

    def tokenizer_for(self, model_id: str) -> Any:
        served = self._get(model_id)
        if served.tokenizer is None:
            if served.kind == "lora":
                served.tokenizer = self.base.tokenizer
            else:
                from .model import load_tokenizer

                served.tokenizer = load_tokenizer(served.path)
        return served.tokenizer

    def _to_fast(self, served: _Served, module: Any) -> bool:
        """Give ``served`` a fast-path copy of ``module``'s weights when it can run there."""
        if not self._fast_wanted:
            return False
        from . import fastlm

        if not fastlm.supports(module):
            log.info("%s runs on the transformers path (architecture not on the fast path)", served.model_id)
            return False
        from .cuda_decode import wrap  # CUDA graphs on a GPU; the FastLlama itself elsewhere

        served.fast = wrap(fastlm.FastLlama(module, slots=self.max_batch, dtype=self._fast_dtype, device=self.device))
        return True

    def _ensure_loaded(self, served: _Served) -> None:
        """Load a model's weights; runs in the engine thread only."""
        if served.loaded:
            return
        if served.kind == "base":
            served.eos = _eos_ids(served.module, served.tokenizer)
            self._to_fast(served, served.module)
        elif served.kind == "lora" and self._fast_wanted and self._fast_base():
            from .fastlm import merged_lora

            merged = merged_lora(self.base.model, str(served.path))
            served.tokenizer = self.base.tokenizer
            served.eos = _eos_ids(merged, served.tokenizer)
            self._to_fast(served, merged)
            del merged  # the fast copy holds the merged weights
        elif served.kind == "lora":
            from peft import PeftModel

            safe_id = "".join(c if c.isalnum() else "_" for c in served.model_id)
            name = "a" + str(len(self._served)) + "_" + safe_id[-40:]
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.base.model, str(served.path), adapter_name=name)
            else:
                self._peft.load_adapter(str(served.path), adapter_name=name)
            self._peft.eval()
            served.module, served.adapter, served.tokenizer = self._peft, name, self.base.tokenizer
            served.eos = _eos_ids(self.base.model, served.tokenizer)
        else:
            from .model import load_model

            loaded = load_model(str(served.path), device=self.device)
            served.tokenizer = loaded.tokenizer
            served.eos = _eos_ids(loaded.model, loaded.tokenizer)
            if not self._to_fast(served, loaded.model):
                served.module = loaded.model
        served.loaded = True
        log.info("loaded %s (%s path)", served.model_id, "fast" if served.fast is not None else "transformers")

    def _fast_base(self) -> bool:
        base = self._served[self.base_id]
        self._ensure_loaded(base)
        return base.fast is not None

    # -- prompts ----------------------------------------------------------------
    def chat_prompt(self, model_id: str, messages: list[dict[str, Any]]) -> list[int]:
        tok = self.tokenizer_for(model_id)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, model_id: str, prompt: str) -> list[int]:
        tok = self.tokenizer_for(model_id)
        return list(tok(prompt)["input_ids"])

    # -- requests ---------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._active > 0

    @property
    def load(self) -> int:
        """Requests admitted and not finished (queued or decoding)."""
        return self._active

    def stats(self) -> dict[str, Any]:
        """What a client needs to size its work: how many rows decode together, how many
        requests are in, and the speed measured on this machine (decode tokens/s in total
        for one stream and for a full batch, prompt tokens/s; None until measured)."""
        stream = self.speed.get(1)
        batch = self.speed.get(self.max_batch)
        return {
            "max_batch": self.max_batch,
            "context_length": self.context_length,
            "in_flight": self._active,
            "decoding": self._decoding,
            "stream_tokens_per_s": round(stream, 1) if stream else None,
            "batch_tokens_per_s": round(batch, 1) if batch else None,
            "prefill_tokens_per_s": round(self.prefill_speed, 1) if self.prefill_speed else None,
            "generated_tokens": self.generated_tokens,
            "decoder": "fast" if self._served[self.base_id].fast is not None else (
                "transformers" if self._served[self.base_id].loaded else "loading"),
            "kernels": self.kernels(),
        }

    def decoder(self, model_id: str) -> str:
        """Which path decodes ``model_id``: "fast", "transformers", or "on first use" (not loaded yet)."""
        served = self._get(model_id)
        if served.fast is not None:
            return "fast"
        return "transformers" if served.loaded else "on first use"

    def kernels(self) -> dict[str, Any] | None:
        """The base model's decode plan (CPU kind, dtype, kernels, threads; fastlm.Plan),
        None until loaded or off the fast path."""
        fast = self._served[self.base_id].fast
        plan = getattr(fast, "plan", None) or getattr(getattr(fast, "lm", None), "plan", None)
        if plan is None:
            return None
        out = plan.as_dict()
        if self._tuner is not None:
            out["threads"] = self._tuner.most
            out["threads_now"] = self._tuner.current  # one while other processes hold the cores
        return out

    async def generate(self, model_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Text deltas for one completion; the last carries the finish reason.

        Leaving the iteration early (the client went away, the task was cancelled) marks
        the request cancelled; the engine drops its row before the next decode step."""
        self._get(model_id)
        if not prompt_ids:
            raise EngineError("the prompt is empty", param="messages")
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise EngineError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context_length} tokens",
                param="messages", code="context_length_exceeded")
        max_new = min(params.max_tokens if params.max_tokens is not None else self.default_max_tokens, room)
        loop = asyncio.get_running_loop()
        req = _Request(model_id, list(prompt_ids), params, max_new, loop, asyncio.Queue())
        self._active += 1
        self._inbox.put(req)
        try:
            while True:
                item = await req.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            req.cancelled.set()
            self._active -= 1

    # -- the loop ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gridtune-engine", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the base model is loaded and its speed measured."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # Prompt tokens prefilled between two decode steps: new work gets in quickly while
    # running rows are never starved for long (a 100-token prompt is ~0.2 s on one core).
    PREFILL_BUDGET = 256

    def _run(self) -> None:
        import torch

        self._tuner = _ThreadTuner(self._threads or default_threads()) if self.device == "cpu" else None
        if self._tuner is not None:
            torch.set_num_threads(self._tuner.current)
        batches: dict[str, Any] = {}
        waiting: dict[str, list[_Request]] = {}
        with torch.inference_mode():
            try:
                base = self._served[self.base_id]
                self._ensure_loaded(base)
                plan = getattr(base.fast, "plan", None) or getattr(getattr(base.fast, "lm", None), "plan", None)
                if plan is not None:
                    line = plan.describe()
                    if self._tuner is not None and self._tuner.most != plan.threads:
                        line = line.rsplit(", ", 1)[0] + f", {self._tuner.most} thread(s)"
                    log.info("%s", line)
                if self._calibrate_at_start and base.fast is not None:
                    self._calibrate(base)
            except Exception:  # noqa: BLE001 - requests will report the failure
                log.exception("could not prepare %s", self.base_id)
            finally:
                self._ready.set()
            while not self._stopping.is_set():
                block = not batches and not waiting
                try:
                    item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                except queue.Empty:
                    item = None
                while item is not None:
                    waiting.setdefault(item.model_id, []).append(item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self._stopping.is_set():
                    break
                for model_id in list(set(batches) | set(waiting)):
                    batch = batches.get(model_id)
                    pending = [r for r in waiting.pop(model_id, []) if not r.cancelled.is_set()]
                    admitted: list[_Request] = []
                    try:
                        served = self._get(model_id)
                        self._ensure_loaded(served)
                        if batch is None:
                            batch = batches[model_id] = (_FastBatch(served) if served.fast is not None
                                                         else _HFBatch(served, self.device))
                        self._drop_cancelled(batch)
                        room = self.max_batch - len(batch.rows)
                        budget = self.PREFILL_BUDGET
                        while pending and room > 0 and (budget > 0 or not admitted):
                            if served.fast is not None and not batch.fits(admitted + pending[:1], self.kv_budget):
                                break  # waits until rows finish and free cache memory
                            # the HF path prefills all of its new rows together: no budget there
                            budget -= len(pending[0].prompt_ids) if served.fast is not None else 0
                            admitted.append(pending.pop(0))
                            room -= 1
                        if pending:
                            waiting[model_id] = pending
                        with self._adapter(served):
                            if admitted:
                                self._admit(batch, admitted)
                            if batch.rows and (served.fast is not None or not admitted):
                                self._step(batch)
                    except Exception as exc:  # noqa: BLE001 - report to the requests, keep serving
                        log.exception("decode step failed for %s", model_id)
                        err = EngineError(f"generation failed: {type(exc).__name__}: {exc}", status=500)
                        for r in admitted + ([row.req for row in batch.rows] if batch else []):
                            r.send(err)
                        batches.pop(model_id, None)
                        continue
                    if not batch.rows:
                        batches.pop(model_id, None)
                self._decoding = sum(len(b.rows) for b in batches.values())
        self._decoding = 0
        for batch in batches.values():
            for row in batch.rows:
                row.req.send(EngineError("the server is shutting down", status=503))
        for reqs in waiting.values():
            for r in reqs:
                r.send(EngineError("the server is shutting down", status=503))

    def _calibrate(self, served: _Served) -> None:
        """Measure prefill and decode speed (1 row, a full batch) on this machine, once."""
        import time

        import torch

        lm = served.fast
        ids = (served.tokenizer("The quick brown fox jumps over the lazy dog. " * 12,
                                add_special_tokens=False)["input_ids"] or [0])[:96]
        t0 = time.perf_counter()
        lm.prefill(0, ids)
        self.prefill_speed = len(ids) / (time.perf_counter() - t0)
        lm.ensure(self.max_batch, len(ids) + 8)
        for slot in range(1, self.max_batch):
            lm.move(0, slot, len(ids))
        for rows in (1, self.max_batch):
            tokens = torch.full((rows,), ids[-1], device=lm.device)
            steps, elapsed = 0, 0.0
            for i in range(6):
                positions = torch.full((rows,), len(ids) + i, device=lm.device)
                t0 = time.perf_counter()
                lm.decode(tokens, positions, len(ids) + i + 1)
                if i >= 2:  # the first steps pay one-time costs (allocations, kernel selection)
                    elapsed += time.perf_counter() - t0
                    steps += 1
            self.speed[rows] = rows * steps / elapsed
        log.info("decode speed: %.0f tok/s for one stream, %.0f in total for %d; prefill %.0f tok/s",
                 self.speed[1], self.speed[self.max_batch], self.max_batch, self.prefill_speed)

    def _adapter(self, served: _Served):
        import contextlib

        if self._peft is None or served.fast is not None:
            return contextlib.nullcontext()
        if served.kind == "lora":
            self._peft.set_adapter(served.adapter)
            return contextlib.nullcontext()
        if served.kind == "base":
            return self._peft.disable_adapter()
        return contextlib.nullcontext()

    def _admit(self, batch: Any, reqs: list[_Request]) -> None:
        """Prefill new requests into the batch and give each its first token."""
        import time

        rows = [_Row(r, self.device) for r in reqs]
        t0 = time.perf_counter()
        logits = batch.admit(rows)
        if batch.served.fast is not None:
            took = time.perf_counter() - t0
            n = sum(len(r.prompt_ids) for r in reqs)
            rate = n / took if took > 0 else None
            if rate:
                self.prefill_speed = rate if self.prefill_speed is None else 0.8 * self.prefill_speed + 0.2 * rate
        self._after_tokens(batch, rows, self._sample(logits, rows))

    def _step(self, batch: Any) -> None:
        import time

        t0 = time.perf_counter()
        logits = batch.step()
        tokens = self._sample(logits, batch.rows)
        size = len(batch.rows)
        took = time.perf_counter() - t0
        if self._tuner is not None:
            self._tuner.after_step(size, took)
        if batch.served.fast is not None and took > 0 and size in (1, self.max_batch):
            rate = size / took
            old = self.speed.get(size)
            self.speed[size] = rate if old is None else 0.9 * old + 0.1 * rate
        self._after_tokens(batch, list(batch.rows), tokens)

    def _drop_cancelled(self, batch: Any) -> None:
        if any(row.req.cancelled.is_set() for row in batch.rows):
            for row in batch.rows:
                if row.req.cancelled.is_set():
                    row.done = True
            batch.keep([i for i, row in enumerate(batch.rows) if not row.done])

    def _sample(self, logits: Any, rows: list[_Row]) -> list[int]:
        """One token per row: greedy at temperature 0, else from softmax(logits / T) with
        top_p, by inverse CDF on one uniform number drawn from the row's own generator (so
        a seed replays whatever batch the row shares). All rows in a few tensor ops: a
        per-row ``multinomial`` over a 49k vocabulary cost ~1 ms a row, a third of a
        32-row decode step."""
        import torch

        for i, row in enumerate(rows):
            bias = row.req.params.logit_bias
            if bias:  # ids past this model's vocabulary name no token here: nothing to move
                ids = [t for t in bias if t < logits.shape[-1]]
                logits[i, ids] += torch.tensor([bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
        greedy = logits.argmax(-1)
        temps = [row.req.params.temperature for row in rows]
        if all(t <= 0 for t in temps):
            return greedy.tolist()
        dev = logits.device
        scale = torch.tensor([t if t > 0 else 1.0 for t in temps], device=dev).unsqueeze(1)
        probs = torch.softmax(logits / scale, dim=-1)
        for i, row in enumerate(rows):
            top_p = row.req.params.top_p
            if temps[i] > 0 and top_p < 1.0:  # rare: sort only the rows that ask for it
                sorted_probs, order = probs[i].sort(descending=True)
                cum = sorted_probs.cumsum(-1)
                sorted_probs[(cum - sorted_probs) > top_p] = 0
                probs[i] = torch.zeros_like(probs[i]).scatter_(0, order, sorted_probs)
        uniform = torch.cat([torch.rand(1, generator=row.generator, device=dev) for row in rows])
        cdf = probs.cumsum(-1)
        target = (uniform * cdf[:, -1]).unsqueeze(1)
        drawn = torch.searchsorted(cdf, target).squeeze(1).clamp(max=logits.shape[-1] - 1)
        sampled = torch.tensor([t > 0 for t in temps], device=dev)
        return torch.where(sampled, drawn, greedy).tolist()

    def _after_tokens(self, batch: Any, rows: list[_Row], tokens: list[int]) -> None:
        """Emit text for the rows that just got a token; drop the rows that are done."""
        served = batch.served
        eos = served.eos
        for row, token in zip(rows, tokens, strict=True):
            if row.req.cancelled.is_set():
                row.done = True
                continue
            self.generated_tokens += 1
            if token in eos:
                self._emit(row, served.tokenizer, "stop", final=True, completion_tokens=len(row.tokens) + 1)
                continue
            row.tokens.append(token)
            at_limit = len(row.tokens) >= row.req.max_new
            self._emit(row, served.tokenizer, "length" if at_limit else None, final=at_limit,
                       completion_tokens=len(row.tokens))
        if any(row.done for row in batch.rows):
            batch.keep([i for i, row in enumerate(batch.rows) if not row.done])

    @staticmethod
    def _detokenize(row: _Row, tokenizer: Any, final: bool) -> None:
        """Extend ``row.text`` with the new tokens' text. Only the tokens since a stable
        prefix are decoded; a tail that is not yet a whole character waits (unless final)."""
        prefix = tokenizer.decode(row.tokens[row.prefix_at:row.read_at], skip_special_tokens=True)
        full = tokenizer.decode(row.tokens[row.prefix_at:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            row.text += full[len(prefix):]
            row.prefix_at, row.read_at = row.read_at, len(row.tokens)

    def _emit(self, row: _Row, tokenizer: Any, reason: str | None, *, final: bool, completion_tokens: int) -> None:
        self._detokenize(row, tokenizer, final)
        text = row.text
        stops = [s for s in row.req.params.stop if s]
        if stops:
            start = max(0, row.emitted - max(len(s) for s in stops))
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                row.req.send(Delta(text[row.emitted:cut], "stop", len(row.tokens)))
                row.done = True
                return
        if final:
            row.req.send(Delta(text[row.emitted:], reason or "stop", completion_tokens))
            row.done = True
            return
        safe = len(text) - _held_back(text, stops)
        if safe > row.emitted:
            row.req.send(Delta(text[row.emitted:safe]))
            row.emitted = safe


_ids = itertools.count()


def new_id(prefix: str) -> str:
    """A short unique id like ``chatcmpl-3f2a…``."""
    import secrets

    return f"{prefix}-{secrets.token_hex(12)}"
