"""Decoding on a CUDA GPU without per-operation launch overhead: the fast path's decode
step replayed from CUDA graphs over its own (static) KV cache.

Why: one decode step of FastLlama is ~16 small kernels per layer, ~500 for the default
model. Launched one by one from Python each costs more than its arithmetic, so eager
decoding on a GPU is launch-bound (18 tok/s for one stream of SmolLM2-135M on an H200).
A graph launches the whole step at once. A graph replays fixed shapes and addresses, so:

- the batch is padded up to the next bucket (1, 2, 4, 8, 16, 32, ... up to the slot
  count); padding rows decode token 0 at position 0 in free slots, and their logits are
  dropped (a free slot's position 0 is rewritten by the prefill that takes the slot);
- the attention length is rounded up to a multiple of ``LENGTH_STEP``; positions past a
  row's own are masked, exactly as in eager decode;
- tokens and positions go through static input buffers, and the logits come back in
  the graph's static output buffer: valid until the next step (the engine samples from
  them at once);
- the KV cache is FastLlama's own. When it grows (a longer request, more rows) its
  tensors move, so every graph is dropped and re-captured on demand.

One graph per (batch bucket, length bucket), captured the first time that shape is
needed (a few tens of ms); the graphs share one memory pool, so their intermediates
take the memory of one step. GRIDTUNE_CUDA_GRAPHS=0 keeps eager decoding.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch

LENGTH_STEP = 256  # attention length granularity: at most 255 masked positions more per step
MAX_GRAPHS = 96  # least recently used graphs beyond this are dropped (they re-capture on need)


def batch_buckets(slots: int) -> list[int]:
    """Powers of two below ``slots``, then ``slots`` itself."""
    sizes, n = [], 1
    while n < slots:
        sizes.append(n)
        n *= 2
    return sizes + [slots]


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


def wanted() -> bool:
    return os.environ.get("GRIDTUNE_CUDA_GRAPHS", "").strip().lower() not in ("0", "false", "no", "off")


def wrap(lm: Any) -> Any:
    """``lm`` decoding through CUDA graphs where it runs on a CUDA device, else ``lm`` itself."""
    if not str(lm.device).startswith("cuda") or not torch.cuda.is_available() or not wanted():
        return lm
    return GraphedDecoder(lm)


class GraphedDecoder:
    """A FastLlama whose ``decode`` pads to fixed shapes and replays captured graphs.

    Everything else (prefill, ensure, move, the cache sizes) is the wrapped FastLlama's.
    ``graphs=False`` runs the same padded, bucketed step eagerly: it is what the CPU
    tests hold to the unpadded decode, since graphs themselves need a GPU.
    """

    def __init__(self, lm: Any, *, graphs: bool = True):
        self.lm = lm
        self.graphs = graphs
        self.sizes = batch_buckets(lm.slots)
        self._graphs: OrderedDict[tuple[int, int], tuple[Any, torch.Tensor]] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._cache_key: tuple | None = None
        most = self.sizes[-1]
        self._tokens = torch.zeros(most, dtype=torch.long, device=lm.device)
        self._positions = torch.zeros(most, dtype=torch.long, device=lm.device)
        self.captures = 0  # graphs captured so far (a benchmark and test figure)

    def __getattr__(self, name: str) -> Any:
        lm = self.__dict__.get("lm")
        if lm is None:
            raise AttributeError(name)
        return getattr(lm, name)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """FastLlama.decode's contract: rows in slots ``0..B-1``; logits [B, V] fp32."""
        lm = self.lm
        rows = tokens.shape[0]
        padded = bucket(rows, self.sizes)
        span = min(-(-length // LENGTH_STEP) * LENGTH_STEP, lm.max_pos)
        lm.ensure(padded, span)
        key = (lm.k[0].data_ptr(), tuple(lm.k[0].shape))
        if key != self._cache_key:  # the cache moved: graphs would read freed memory
            self._graphs.clear()
            self._cache_key = key
            if self.graphs:  # a pool whose graphs are all gone cannot take new captures
                self._pool = torch.cuda.graph_pool_handle()
        self._tokens[:rows].copy_(tokens)
        self._positions[:rows].copy_(positions)
        if padded > rows:
            self._tokens[rows:padded].zero_()
            self._positions[rows:padded].zero_()
        tok, pos = self._tokens[:padded], self._positions[:padded]
        if not self.graphs:
            return lm.decode(tok, pos, span)[:rows]
        shape = (padded, span)
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._capture(tok, pos, span)
            self._graphs[shape] = entry
            if len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(shape)
        graph, out = entry
        graph.replay()
        return out[:rows]

    def _capture(self, tok: torch.Tensor, pos: torch.Tensor, span: int) -> tuple[Any, torch.Tensor]:
        # Warm-up on a side stream first (lazy initialisation and kernel selection must not
        # be captured). It writes the current rows' K/V at their positions, which the
        # replay then writes again with the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.lm.decode(tok, pos, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a request handler, say) do not spoil the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.lm.decode(tok, pos, span)
        self.captures += 1
        return graph, out
