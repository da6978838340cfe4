"""A lean decoder for Llama-family models: the local server's fast path.

Why not ``model.generate`` or the model's own forward: for a 135M model on a CPU the
arithmetic of one decode step is a few milliseconds; what HF's eager forward adds
around it (per-layer module calls, cache objects, mask building, re-concatenated
caches) costs several times that. Here one decode step is ~16 tensor ops per layer:

- weights are copied out once, q/k/v and gate/up fused into one matrix each, in
  bf16 on CPUs with native bf16 (AVX512-BF16/AMX), where it halves the bytes read
  per token and uses the bf16 dot-product units; fp32 elsewhere;
- the KV cache is preallocated per *slot* (one slot per batch row) and written in
  place; rows of a batch are slots ``0..B-1``, so a step reads views, never copies;
  a finished row's slot is refilled by moving the last row into it (one row copy);
- grouped-query attention in decode treats the query heads that share a KV head as
  the query positions of one SDPA call, so K/V are never repeated;
- one mask and one RoPE table lookup per step, shared by all layers.

Tuned models are served the same way: a LoRA adapter is merged into a copy of the
weights (so a tuned model decodes exactly as fast as its base), a full fine-tune is
read like the base. Architectures this cannot run (anything not plain Llama/RoPE)
fall back to the HF path in engine.py, which is also the reference the tests compare
this decoder's greedy tokens against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_SUPPORTED = {"llama"}


def supports(model: Any) -> bool:
    """Whether ``model`` (a transformers causal LM) can run on this decoder."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED:
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return False
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    return True


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (else bf16 is emulated and slower than fp32)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        return False
    if cap in ("AVX512_BF16", "AMX_BF16"):
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16, else fp32; GRIDTUNE_DTYPE overrides
    (float32 makes decoding batch-invariant enough for replayable tests)."""
    import os

    wanted = os.environ.get("GRIDTUNE_DTYPE", "").strip().lower()
    if wanted in ("float32", "fp32"):
        return torch.float32
    if wanted in ("bfloat16", "bf16"):
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class _Linear:
    """A weight for ``F.linear``, plus a low-bit copy for steps of 1-2 rows.

    One stream's decode step reads every weight once and does little else, so it is
    bound by memory bandwidth: measured here on 70M parameters out of cache, one row
    took 9.6 ms in bf16, 5.4 ms with torch's int8 weight-only kernel and 2.3 ms with its
    int4 kernel (groups of 32 along the input, a scale and a zero each: the layout of
    the default model's own Q4_1 GGUF, whose weights it therefore holds almost exactly).
    From ~4 rows on, bf16's GEMM is faster than either, so batches use the bf16 weight.
    """

    __slots__ = ("w", "mode", "q", "aux")

    def __init__(self, w: torch.Tensor, small: str | None):
        self.w = w
        self.mode, self.q, self.aux = None, None, None
        if small == "int4" and w.shape[1] % INT4_GROUP == 0:
            try:
                self.q, self.aux = _int4(w)
                self.mode = "int4"
            except Exception:  # noqa: BLE001 - a shape the kernel does not take: int8 then
                small = "int8"
        if small == "int8":
            full = w.float()
            scales = (full.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
            self.q = (full / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.aux = scales.to(w.dtype)
            self.mode = "int8"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is not None and x.shape[0] <= SMALL_MAX_ROWS:
            if self.mode == "int4":
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, INT4_GROUP, self.aux)
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.aux)
        return F.linear(x, self.w)


SMALL_MAX_ROWS = 2
INT4_GROUP = 32


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales and zeros) for torch's CPU int4 kernel: per group of 32
    inputs, q = round((w - min) / scale) in 0..15 and w ~ (q - 8) * scale + (min + 8 * scale)."""
    n, k = w.shape
    groups = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    aux = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).contiguous().to(w.dtype)
    return packed, aux


def small_kernel(dtype: torch.dtype, device: str) -> str | None:
    """The low-bit kernel for 1-2 row steps on this machine: int4, else int8, else None.
    Only where results are approximate anyway (bf16 on CPU): fp32 is the exact mode the
    tests hold to the reference. Each kernel is checked by running it."""
    if device != "cpu" or dtype != torch.bfloat16:
        return None
    w = torch.linspace(-1, 1, 64 * 64).view(64, 64).to(dtype)
    x = torch.linspace(-1, 1, 64).view(1, 64).to(dtype)
    want = F.linear(x.float(), w.float())
    for mode in ("int4", "int8"):
        try:
            lin = _Linear(w, mode)
            if lin.mode == mode and torch.allclose(lin(x).float(), want, atol=0.1, rtol=0.05):
                return mode
        except Exception:  # noqa: BLE001 - an older torch, another build
            continue
    return None


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: _Linear  # [(H + 2*KVH) * D, hidden]
    o: _Linear
    ln2: torch.Tensor
    gate_up: _Linear  # [2 * inter, hidden]
    down: _Linear


class FastLlama:
    """Decoder weights, the slot KV cache, prefill and one batched decode step."""

    def __init__(self, model: Any, *, slots: int, dtype: torch.dtype | None = None,
                 device: str | None = None, capacity: int = 512, kv_dtype: torch.dtype | None = None,
                 lowbit: bool | None = None):
        cfg = model.config
        self.device = device or str(next(model.parameters()).device)
        self.dtype = dtype or pick_dtype(self.device)
        # Attention (RoPE, the KV cache, SDPA) runs in fp32 on CPU even with bf16 weights:
        # the CPU's SDPA kernels are about twice as fast in fp32 for a decode batch, and
        # two casts per layer cost less than that.
        self.kv_dtype = kv_dtype or (torch.float32 if self.device == "cpu" else self.dtype)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.inter = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.max_pos = int(cfg.max_position_embeddings)
        self.slots = slots
        self.group = self.n_heads // self.n_kv
        # Low-bit copies for 1-2 row steps (see _Linear): None where the dtype calls for
        # them (bf16 on CPU), False never, True wherever a kernel runs.
        self.small = None if lowbit is False else small_kernel(torch.bfloat16 if lowbit else self.dtype, self.device)
        self.layers, self.norm, self.embed, self.lm_head = self._weights(model)
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self._rope(theta)
        self.capacity = 0  # positions per slot
        self.allocated = 0  # slots with memory behind them (grows with the batch, up to ``slots``)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ensure(1, capacity)

    # -- weights --------------------------------------------------------------------
    def _weights(self, model: Any):
        dt, dev = self.dtype, self.device
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=dev, dtype=dt).contiguous()

        def lin(t: torch.Tensor) -> _Linear:
            return _Linear(w(t), self.small)

        layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            layers.append(_Layer(
                ln1=w(layer.input_layernorm.weight),
                qkv=lin(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                o=lin(att.o_proj.weight),
                ln2=w(layer.post_attention_layernorm.weight),
                gate_up=lin(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                down=lin(mlp.down_proj.weight),
            ))
        embed = w(base.embed_tokens.weight)
        head = model.get_output_embeddings().weight
        lm_head = _Linear(embed if head.data_ptr() == base.embed_tokens.weight.data_ptr() else w(head), self.small)
        return layers, w(base.norm.weight), embed, lm_head

    def _rope(self, theta: float) -> None:
        d = self.head_dim
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        pos = torch.arange(self.max_pos, dtype=torch.float64)
        freqs = torch.outer(pos, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        # rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * sign: fold the sign into sin.
        sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)]).double()
        self.cos = emb.cos().to(self.device, self.kv_dtype)
        self.sin = (emb.sin() * sign).to(self.device, self.kv_dtype)

    # -- the cache -----------------------------------------------------------------------
    @property
    def bytes_per_position(self) -> int:
        """KV cache bytes one slot needs per position (all layers, K and V)."""
        return 2 * len(self.layers) * self.n_kv * self.head_dim * torch.finfo(self.kv_dtype).bits // 8

    def bytes_for(self, rows: int, length: int) -> int:
        """Cache bytes for ``rows`` slots of ``length`` positions, as ``ensure`` would grow it."""
        return self._grown(self.allocated, rows, self.slots) * self._grown(self.capacity, length, self.max_pos) \
            * self.bytes_per_position

    @staticmethod
    def _grown(current: int, wanted: int, ceiling: int) -> int:
        if wanted <= current:
            return current
        return min(ceiling, max(wanted, 2 * current))

    def ensure(self, rows: int, length: int) -> None:
        """Memory for ``rows`` slots of ``length`` positions each. Both grow by doubling
        and are kept: one long request costs one slot's worth, not a whole batch's."""
        rows = min(rows, self.slots)
        if rows <= self.allocated and length <= self.capacity:
            return
        new_rows = self._grown(self.allocated, rows, self.slots)
        new_cap = self._grown(self.capacity, length, self.max_pos)
        new_cap = min(self.max_pos, int(math.ceil(new_cap / 64) * 64))
        shape = (new_rows, self.n_kv, new_cap, self.head_dim)
        ks, vs = [], []
        for i in range(len(self.layers)):
            k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            if self.capacity:
                k[:self.allocated, :, :self.capacity] = self.k[i]
                v[:self.allocated, :, :self.capacity] = self.v[i]
            ks.append(k)
            vs.append(v)
        self.k, self.v, self.capacity, self.allocated = ks, vs, new_cap, new_rows

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # -- forward -------------------------------------------------------------------------
    def _rot(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, torch.roll(x, self.head_dim // 2, dims=-1), sin)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.hidden,), self.norm, self.eps)
        return self.lm_head(x).float()

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a prompt into ``slot``'s cache; the logits of its last position, [V] fp32."""
        n = len(ids)
        self.ensure(slot + 1, n + 1)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(torch.tensor(ids, device=self.device), self.embed)  # [n, hidden]
        cos, sin = self.cos[:n].unsqueeze(1), self.sin[:n].unsqueeze(1)  # [n, 1, D]
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), L.ln1, self.eps)
            qkv = L.qkv(h).to(self.kv_dtype)
            qk = self._rot(qkv[:, :(H + KV) * D].view(n, H + KV, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KV) * D:].view(n, KV, D)
            self.k[i][slot, :, :n] = k.transpose(0, 1)
            self.v[i][slot, :, :n] = v.transpose(0, 1)
            # [1, KV, group*n, D] would break causality across the group: repeat K/V once here.
            kk = k.transpose(0, 1).repeat_interleave(self.group, dim=0).unsqueeze(0)
            vv = v.transpose(0, 1).repeat_interleave(self.group, dim=0).unsqueeze(0)
            o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kk, vv, is_causal=True)
            x = x + L.o(o[0].transpose(0, 1).reshape(n, H * D).to(self.dtype))
            h = F.rms_norm(x, (self.hidden,), L.ln2, self.eps)
            gu = L.gate_up(h)
            x = x + L.down(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        return self._logits(x[-1:])[0]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One step for rows in slots ``0..B-1``: ``tokens`` [B] at ``positions`` [B];
        ``length`` is one past the largest position. Returns logits [B, V] fp32."""
        B = tokens.shape[0]
        H, KV, D, G = self.n_heads, self.n_kv, self.head_dim, self.group
        x = F.embedding(tokens, self.embed)  # [B, hidden]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B, 1, D]
        # Each row sees its own positions 0..pos; slots hold stale data past that.
        mask = (torch.arange(length, device=self.device).unsqueeze(0) <= positions.unsqueeze(1))
        mask = mask.view(B, 1, 1, length)
        rows = torch.arange(B, device=self.device)
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), L.ln1, self.eps)
            qkv = L.qkv(h).to(self.kv_dtype)
            qk = self._rot(qkv[:, :(H + KV) * D].view(B, H + KV, D), cos, sin)
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, positions] = qk[:, H:]
            vc[rows, :, positions] = qkv[:, (H + KV) * D:].view(B, KV, D)
            q = qk[:, :H].reshape(B, KV, G, D)  # the G heads of a KV head as G query rows
            o = F.scaled_dot_product_attention(q, kc[:B, :, :length], vc[:B, :, :length], attn_mask=mask)
            x = x + L.o(o.reshape(B, H * D).to(self.dtype))
            h = F.rms_norm(x, (self.hidden,), L.ln2, self.eps)
            gu = L.gate_up(h)
            x = x + L.down(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        return self._logits(x)


def merged_lora(base_model: Any, adapter_dir: str) -> Any:
    """A plain copy of ``base_model`` with the LoRA adapter in ``adapter_dir`` merged in."""
    import copy

    from peft import PeftModel

    clone = copy.deepcopy(base_model)
    merged = PeftModel.from_pretrained(clone, adapter_dir).merge_and_unload()
    merged.eval()
    return merged
