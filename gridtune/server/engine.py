"""Inference with continuous (dynamic) batching.

One thread owns the model(s) and runs the decode loop; request handlers hand it
work through a queue and get their text back through an asyncio queue.

Between two decode steps the loop admits every request that is waiting: the new
prompts are prefilled together (left padded), their KV cache is padded on the
left to the running batch's length and concatenated to it, so rows of very
different ages decode in one forward pass. A finished row leaves the batch at
once (its cache rows are dropped, and columns no row needs any more are trimmed).

Every row has its own temperature, top_p, seed, token budget and stop strings.
Stop strings are found in the decoded text; the streamed text always holds back
a tail that could be the start of a stop, so a stop is never half-emitted.

Requests for different models (the base model, each LoRA adapter, a fully
fine-tuned model) live in one batch per model and take turns step by step; LoRA
adapters share the base weights on one PeftModel (``set_adapter`` per step).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

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
    __slots__ = ("req", "tokens", "emitted", "generator", "done")

    def __init__(self, req: _Request, device: str):
        import torch

        self.req = req
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        self.done = False


@dataclass
class _Served:
    """One servable model: weights, tokenizer, and the adapter to activate (LoRA)."""

    model_id: str
    kind: str  # "base" | "lora" | "full"
    path: Path | None = None
    module: Any = None
    tokenizer: Any = None
    adapter: str | None = None
    loaded: bool = False


class _Batch:
    """The rows of one model decoding together, with their shared, left-padded KV cache."""

    def __init__(self, served: _Served):
        self.served = served
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [B, T] long
        self.positions: Any = None  # [B] next position id per row
        self.last: Any = None  # [B] last sampled token per row


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
    return ids


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class Engine:
    """The model-owning decode loop. Start it with :meth:`start`, end it with :meth:`close`."""

    def __init__(self, loaded: Any, *, max_batch: int = 32, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.base = loaded
        self.base_id: str = loaded.name
        self.device: str = loaded.device
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self._served: dict[str, _Served] = {
            self.base_id: _Served(self.base_id, "base", loaded.source, loaded.model, loaded.tokenizer, None, True)
        }
        self._lock = threading.Lock()
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._peft: Any = None  # the PeftModel wrapping the base once an adapter is loaded
        self._active = 0
        self._eos: dict[str, set[int]] = {}
        cfg = getattr(loaded.model, "config", None)
        self.context_length: int = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.generated_tokens = 0  # a counter for benchmarks and logs
        self._decoding = 0  # rows in decode batches right now (the engine thread writes it)
        self.speed: dict[int, float] = {}  # batch size -> total tokens/s, measured at start

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

    def _ensure_loaded(self, served: _Served) -> None:
        """Load a tuned model's weights; runs in the engine thread only."""
        if served.loaded:
            return
        if served.kind == "lora":
            from peft import PeftModel

            name = "a" + str(len(self._served)) + "_" + "".join(c if c.isalnum() else "_" for c in served.model_id)[-40:]
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.base.model, str(served.path), adapter_name=name)
            else:
                self._peft.load_adapter(str(served.path), adapter_name=name)
            self._peft.eval()
            served.module, served.adapter, served.tokenizer = self._peft, name, self.base.tokenizer
        else:
            from .model import load_model

            loaded = load_model(str(served.path), device=self.device)
            served.module, served.tokenizer = loaded.model, loaded.tokenizer
        served.loaded = True
        log.info("loaded %s", served.model_id)

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
        requests are in, and the decode speed measured on this machine (tokens/s for one
        stream and for a full batch; None until measured)."""
        return {
            "max_batch": self.max_batch,
            "context_length": self.context_length,
            "in_flight": self._active,
            "decoding": self._decoding,
            "stream_tokens_per_s": self.speed.get(1),
            "batch_tokens_per_s": self.speed.get(self.max_batch),
            "generated_tokens": self.generated_tokens,
        }

    async def generate(self, model_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Text deltas for one completion; the last carries the finish reason."""
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

    def close(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        import torch

        batches: dict[str, _Batch] = {}
        waiting: dict[str, list[_Request]] = {}
        with torch.inference_mode():
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
                    try:
                        served = self._get(model_id)
                        self._ensure_loaded(served)
                        if batch is None:
                            batch = batches[model_id] = _Batch(served)
                        room = self.max_batch - len(batch.rows)
                        if room < len(pending):
                            waiting[model_id] = pending[room:]
                            pending = pending[:room]
                        with self._adapter(served):
                            if pending:
                                self._admit(batch, pending)
                            elif batch.rows:
                                self._step(batch)
                    except Exception as exc:  # noqa: BLE001 - report to the requests, keep serving
                        log.exception("decode step failed for %s", model_id)
                        err = EngineError(f"generation failed: {type(exc).__name__}: {exc}", status=500)
                        for r in pending + ([row.req for row in batch.rows] if batch else []):
                            r.send(err)
                        batches.pop(model_id, None)
                        continue
                    if not batch.rows:
                        batches.pop(model_id, None)
        for batch in batches.values():
            for row in batch.rows:
                row.req.send(EngineError("the server is shutting down", status=503))
        for reqs in waiting.values():
            for r in reqs:
                r.send(EngineError("the server is shutting down", status=503))

    def _adapter(self, served: _Served):
        import contextlib

        if self._peft is None:
            return contextlib.nullcontext()
        if served.kind == "lora":
            self._peft.set_adapter(served.adapter)
            return contextlib.nullcontext()
        if served.kind == "base":
            return self._peft.disable_adapter()
        return contextlib.nullcontext()

    def _forward(self, served: _Served, input_ids, mask, positions, cache):
        out = served.module(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.cache if hasattr(out, "cache") else out.past_key_values

    def _admit(self, batch: _Batch, reqs: list[_Request]) -> None:
        """Prefill new requests together and merge them into the running batch."""
        import torch
        from transformers import DynamicCache

        served = batch.served
        pad = served.tokenizer.pad_token_id or 0
        length = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), length), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, length - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = DynamicCache()
        logits, cache = self._forward(served, ids, mask, positions, cache)
        rows = [_Row(r, self.device) for r in reqs]
        next_pos = mask.sum(-1)
        if batch.rows:
            self._merge(batch, rows, cache, mask, next_pos)
        else:
            batch.rows, batch.cache, batch.mask, batch.positions = rows, cache, mask, next_pos
        offset = len(batch.rows) - len(rows)
        tokens = self._sample(logits, rows)
        full = batch.last if offset else None
        batch.last = tokens if full is None else torch.cat([full, tokens])
        self._after_tokens(batch, list(range(offset, offset + len(rows))))

    def _merge(self, batch: _Batch, rows: list[_Row], cache: Any, mask: Any, next_pos: Any) -> None:
        import torch

        t_run, t_new = batch.mask.shape[1], mask.shape[1]
        width = max(t_run, t_new)

        def left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(batch.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, width - t_run, 2), left_pad(new.keys, width - t_new, 2)])
            old.values = torch.cat([left_pad(old.values, width - t_run, 2), left_pad(new.values, width - t_new, 2)])
        batch.mask = torch.cat([left_pad(batch.mask, width - t_run, 1), left_pad(mask, width - t_new, 1)])
        batch.positions = torch.cat([batch.positions, next_pos])
        batch.rows = batch.rows + rows

    def _step(self, batch: _Batch) -> None:
        import torch

        ones = batch.mask.new_ones((batch.mask.shape[0], 1))
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        logits, batch.cache = self._forward(batch.served, batch.last.unsqueeze(1), batch.mask,
                                            batch.positions.unsqueeze(1), batch.cache)
        batch.positions = batch.positions + 1
        batch.last = self._sample(logits, batch.rows)
        self._after_tokens(batch, list(range(len(batch.rows))))

    def _sample(self, logits: Any, rows: list[_Row]) -> Any:
        import torch

        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = logits.argmax(-1)
        for i, row in enumerate(rows):
            p = row.req.params
            if p.temperature <= 0:
                out[i] = greedy[i]
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                cum = sorted_probs.cumsum(-1)
                sorted_probs[(cum - sorted_probs) > p.top_p] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            out[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return out

    def _after_tokens(self, batch: _Batch, indices: list[int]) -> None:
        """Emit text for the rows that just got a token; drop the rows that are done."""
        import torch

        served = batch.served
        eos = self._eos.get(served.model_id)
        if eos is None:
            eos = self._eos[served.model_id] = _eos_ids(served.module, served.tokenizer)
        last = batch.last.tolist()
        for i in indices:
            row = batch.rows[i]
            if row.req.cancelled.is_set():
                row.done = True
                continue
            token = last[i]
            self.generated_tokens += 1
            if token in eos:
                row.tokens.append(token)
                self._emit(row, served.tokenizer, "stop", final=True, drop_last=True)
                continue
            row.tokens.append(token)
            at_limit = len(row.tokens) >= row.req.max_new
            self._emit(row, served.tokenizer, "length" if at_limit else None, final=at_limit)
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            batch.rows, batch.cache, batch.mask, batch.positions, batch.last = [], None, None, None, None
            return
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]
        batch.mask = mask[:, first:]
        batch.positions = batch.positions.index_select(0, index)
        batch.last = batch.last.index_select(0, index)
        batch.rows = [batch.rows[i] for i in keep]

    def _emit(self, row: _Row, tokenizer: Any, reason: str | None, *, final: bool, drop_last: bool = False) -> None:
        tokens = row.tokens[:-1] if drop_last else row.tokens
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        stops = [s for s in row.req.params.stop if s]
        if stops:
            start = max(0, row.emitted - max(len(s) for s in stops))
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                row.req.send(Delta(text[row.emitted:cut], "stop", len(row.tokens)))
                row.done = True
                return
        if final:
            row.req.send(Delta(text[row.emitted:], reason or "stop", len(tokens)))
            row.done = True
            return
        safe = len(text) - _held_back(text, stops)
        while safe > row.emitted and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
        if safe > row.emitted:
            row.req.send(Delta(text[row.emitted:safe]))
            row.emitted = safe


_ids = itertools.count()


def new_id(prefix: str) -> str:
    """A short unique id like ``chatcmpl-3f2a…``."""
    import secrets

    return f"{prefix}-{secrets.token_hex(12)}"
