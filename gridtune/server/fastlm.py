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


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden]
    o: torch.Tensor
    ln2: torch.Tensor
    gate_up: torch.Tensor  # [2 * inter, hidden]
    down: torch.Tensor


class FastLlama:
    """Decoder weights, the slot KV cache, prefill and one batched decode step."""

    def __init__(self, model: Any, *, slots: int, dtype: torch.dtype | None = None,
                 device: str | None = None, capacity: int = 512):
        cfg = model.config
        self.device = device or str(next(model.parameters()).device)
        self.dtype = dtype or pick_dtype(self.device)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.inter = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.max_pos = int(cfg.max_position_embeddings)
        self.slots = slots
        self.group = self.n_heads // self.n_kv
        self.layers, self.norm, self.embed, self.lm_head = self._weights(model)
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self._rope(theta)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ensure_capacity(capacity)

    # -- weights --------------------------------------------------------------------
    def _weights(self, model: Any):
        dt, dev = self.dtype, self.device
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=dev, dtype=dt).contiguous()

        layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            layers.append(_Layer(
                ln1=w(layer.input_layernorm.weight),
                qkv=w(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                o=w(att.o_proj.weight),
                ln2=w(layer.post_attention_layernorm.weight),
                gate_up=w(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                down=w(mlp.down_proj.weight),
            ))
        embed = w(base.embed_tokens.weight)
        head = model.get_output_embeddings().weight
        lm_head = embed if head.data_ptr() == base.embed_tokens.weight.data_ptr() else w(head)
        return layers, w(base.norm.weight), embed, lm_head

    def _rope(self, theta: float) -> None:
        d = self.head_dim
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        pos = torch.arange(self.max_pos, dtype=torch.float64)
        freqs = torch.outer(pos, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        # rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * sign: fold the sign into sin.
        sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)]).double()
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = (emb.sin() * sign).to(self.device, self.dtype)

    # -- the cache -----------------------------------------------------------------------
    def ensure_capacity(self, length: int) -> None:
        """Grow every slot's cache to hold ``length`` positions (doubling, kept on growth)."""
        if length <= self.capacity:
            return
        new = min(self.max_pos, max(length, 2 * self.capacity, 64))
        new = min(self.max_pos, int(math.ceil(new / 64) * 64))
        shape = (self.slots, self.n_kv, new, self.head_dim)
        ks, vs = [], []
        for i in range(len(self.layers)):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k[:, :, :self.capacity] = self.k[i]
                v[:, :, :self.capacity] = self.v[i]
            ks.append(k)
            vs.append(v)
        self.k, self.v, self.capacity = ks, vs, new

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # -- forward -------------------------------------------------------------------------
    def _rot(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x * cos, torch.roll(x, self.head_dim // 2, dims=-1), sin)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.hidden,), self.norm, self.eps)
        return F.linear(x, self.lm_head).float()

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a prompt into ``slot``'s cache; the logits of its last position, [V] fp32."""
        n = len(ids)
        self.ensure_capacity(n + 1)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(torch.tensor(ids, device=self.device), self.embed)  # [n, hidden]
        cos, sin = self.cos[:n].unsqueeze(1), self.sin[:n].unsqueeze(1)  # [n, 1, D]
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), L.ln1, self.eps)
            qkv = F.linear(h, L.qkv)
            qk = self._rot(qkv[:, :(H + KV) * D].view(n, H + KV, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KV) * D:].view(n, KV, D)
            self.k[i][slot, :, :n] = k.transpose(0, 1)
            self.v[i][slot, :, :n] = v.transpose(0, 1)
            # [1, KV, group*n, D] would break causality across the group: repeat K/V once here.
            kk = k.transpose(0, 1).repeat_interleave(self.group, dim=0).unsqueeze(0)
            vv = v.transpose(0, 1).repeat_interleave(self.group, dim=0).unsqueeze(0)
            o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kk, vv, is_causal=True)
            x = x + F.linear(o[0].transpose(0, 1).reshape(n, H * D), L.o)
            h = F.rms_norm(x, (self.hidden,), L.ln2, self.eps)
            gu = F.linear(h, L.gate_up)
            x = x + F.linear(F.silu(gu[:, :self.inter]) * gu[:, self.inter:], L.down)
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
            qkv = F.linear(h, L.qkv)
            qk = self._rot(qkv[:, :(H + KV) * D].view(B, H + KV, D), cos, sin)
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, positions] = qk[:, H:]
            vc[rows, :, positions] = qkv[:, (H + KV) * D:].view(B, KV, D)
            q = qk[:, :H].reshape(B, KV, G, D)  # the G heads of a KV head as G query rows
            o = F.scaled_dot_product_attention(q, kc[:B, :, :length], vc[:B, :, :length], attn_mask=mask)
            x = x + F.linear(o.reshape(B, H * D), L.o)
            h = F.rms_norm(x, (self.hidden,), L.ln2, self.eps)
            gu = F.linear(h, L.gate_up)
            x = x + F.linear(F.silu(gu[:, :self.inter]) * gu[:, self.inter:], L.down)
        return self._logits(x)


def merged_lora(base_model: Any, adapter_dir: str) -> Any:
    """A plain copy of ``base_model`` with the LoRA adapter in ``adapter_dir`` merged in."""
    import copy

    from peft import PeftModel

    clone = copy.deepcopy(base_model)
    merged = PeftModel.from_pretrained(clone, adapter_dir).merge_and_unload()
    merged.eval()
    return merged
