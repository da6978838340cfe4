"""A lean decoder for Llama and the families close to it: the local server's fast path.

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
read like the base. The families that differ from Llama in small ways (``Arch``:
Qwen2/3, Mistral, Phi-3, Gemma 2/3) run here too; what this cannot run (RoPE scaling,
partial rotary, other layouts) falls back to the HF path in engine.py, which is also the reference the tests compare
this decoder's greedy tokens against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Llama's layout, and the families that differ from it only in ways this decoder covers
# (see ``Arch``): Qwen2's q/k/v biases, Qwen3's q/k norms, Phi-3's fused projections,
# sliding windows (Mistral, Phi-3, Gemma), Gemma 2/3's norms, GELU, scaled embeddings,
# soft-capping and per-layer RoPE bases.
_SUPPORTED = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text"}
_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class Arch:
    """What a family changes in Llama's layer, read from its config (Llama's are the defaults)."""

    act: str = "silu"  # the MLP's gate: "silu", or "gelu_tanh" (Gemma)
    norm_offset: float = 0.0  # Gemma's norms scale by (1 + w): folded into w at load
    sandwich: bool = False  # Gemma: a norm on the attention's and on the MLP's output too
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    windows: tuple[int, ...] = ()  # per layer: a query sees its last N positions; 0: all of them
    thetas: tuple[float, ...] = ()  # per layer: the RoPE base (Gemma 3's local layers have their own)


def arch_of(cfg: Any) -> Arch | None:
    """The family's differences from Llama, or None where this decoder cannot run it."""
    kind = getattr(cfg, "model_type", None)
    if cfg is None or kind not in _SUPPORTED:
        return None
    n = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
    if len(types) != n or any(t not in ("full_attention", "sliding_attention") for t in types):
        return None
    act = _ACTS.get(getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"))
    if act is None or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return None
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return None
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    thetas = []
    for t in types:
        params = rope.get(t, rope) if isinstance(rope.get(t), dict) else rope
        if (params.get("rope_type") or params.get("type") or "default") != "default":
            return None
        thetas.append(float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    window = getattr(cfg, "sliding_window", None)
    if kind in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
        window = None  # Qwen names a window it does not use
    if not window or int(window) >= int(cfg.max_position_embeddings):
        window = 0  # a window as long as the context never applies
    # Mistral and Phi-3 apply their window to every layer; the others to their sliding layers.
    every = kind in ("mistral", "phi3")
    windows = tuple(int(window) if every or t == "sliding_attention" else 0 for t in types)
    gemma = kind in ("gemma2", "gemma3_text")
    scalar = getattr(cfg, "query_pre_attn_scalar", None) if gemma else None
    return Arch(act=act, norm_offset=1.0 if gemma else 0.0, sandwich=gemma,
                embed_scale=float(cfg.hidden_size) ** 0.5 if gemma else 1.0,
                attn_scale=float(scalar) ** -0.5 if scalar else None,
                attn_softcap=getattr(cfg, "attn_logit_softcapping", None) or None,
                final_softcap=getattr(cfg, "final_logit_softcapping", None) or None,
                windows=windows, thetas=tuple(thetas))


def supports(model: Any) -> bool:
    """Whether ``model`` (a transformers causal LM) can run on this decoder."""
    return arch_of(getattr(model, "config", None)) is not None


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (else bf16 is emulated and slower than fp32)."""
    return cpu_kind() in ("AVX512_BF16", "AMX_BF16")


def cpu_kind() -> str:
    """The widest vector ISA torch dispatches to here: AMX_BF16, AVX512_BF16, AVX512,
    AVX2, ... (``/proc/cpuinfo`` where torch does not say bf16 but the CPU has it)."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch
        cap = "DEFAULT"
    if cap == "AVX512":
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            flags = ""
        if " amx_bf16" in flags:
            return "AMX_BF16"
        if " avx512_bf16" in flags:
            return "AVX512_BF16"
    return cap


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once: a second hyperthread
    on a core shares its vector units and only adds OpenMP barrier waits."""
    import os

    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        for block in open("/proc/cpuinfo").read().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "processor" in fields and int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def exact_wanted() -> bool:
    """GRIDTUNE_DTYPE=float32 (``gridtune serve --exact`` sets it): fp32 weights, no
    low-bit kernel, answers the transformers path gives token for token."""
    import os

    return os.environ.get("GRIDTUNE_DTYPE", "").strip().lower() in ("float32", "fp32")


def pick_dtype(device: str) -> torch.dtype:
    """The activation (and residual stream) dtype: bf16 on CUDA and on CPUs with native
    bf16, else fp32; GRIDTUNE_DTYPE overrides (float32 makes decoding batch-invariant
    enough for replayable tests)."""
    import os

    wanted = os.environ.get("GRIDTUNE_DTYPE", "").strip().lower()
    if wanted in ("float32", "fp32"):
        return torch.float32
    if wanted in ("bfloat16", "bf16"):
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


@dataclass(frozen=True)
class Plan:
    """How this machine decodes, chosen once at start (see ``choose_plan``).

    ``gemm``: the weights batches (3+ rows) and prompts multiply with: "fp32", "bf16",
    "fp16" (fbgemm's fp16-weight GEMM: fp32 arithmetic, half the bytes) or NATIVE.
    ``small``: the kernel for 1-2 row steps ("int4", "int8", NATIVE or None: the GEMM).
    ``head``: the output layer's kernel for 1-2 rows (the default model's embeddings
    are 8-bit, Q8_0: 4 bits cost 4% perplexity there, so the head never takes int4).
    NATIVE in both: q4decode.c runs every step and prompt, batches included."""

    device: str
    cpu: str
    dtype: torch.dtype
    gemm: str
    small: str | None
    head: str | None
    threads: int

    @property
    def exact(self) -> bool:
        return self.gemm == "fp32" and self.small is None and self.head is None and self.dtype == torch.float32

    def describe(self) -> str:
        """One line: CPU kind, dtype, kernels, threads."""
        where = self.device if self.device != "cpu" else f"CPU {self.cpu}"
        if self.small == NATIVE:
            return (f"decoder: {where}, fast: native AVX2 kernels for every step and prompt (Q4_1 weights where "
                    f"the model's are 4-bit, else Q8_0, x int8 activations, Q8_0 head, fp32 attention), "
                    f"{self.threads} thread(s)")
        if self.small:
            small = f"{self.small} weight-only for 1-2 rows (head {self.head or self.gemm})"
        else:
            small = "no low-bit kernel"
        mode = "exact (fp32)" if self.exact else "fast"
        return (f"decoder: {where}, {mode}: activations {str(self.dtype).removeprefix('torch.')}, "
                f"{self.gemm} GEMM for batches, {small}, {self.threads} thread(s)")

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "cpu": self.cpu, "dtype": str(self.dtype).removeprefix("torch."),
                "gemm": self.gemm, "small_rows": self.small, "head": self.head or self.gemm,
                "threads": self.threads, "exact": self.exact}


def _fp16_gemm_works() -> bool:
    """fbgemm's fp16-weight linear (x86): packed once, fp32 in and out. Checked by running it."""
    try:
        w = torch.linspace(-1, 1, 64 * 64).view(64, 64)
        x = torch.linspace(-1, 1, 3 * 64).view(3, 64)
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        return bool(torch.allclose(torch.ops.quantized.linear_dynamic_fp16(x, packed), F.linear(x, w),
                                   atol=1e-2, rtol=1e-2))
    except Exception:  # noqa: BLE001 - a build without fbgemm (ARM, some wheels)
        return False


def choose_plan(device: str, *, dtype: torch.dtype | None = None, lowbit: bool | None = None,
                threads: int | None = None) -> Plan:
    """The fastest decode path on this machine whose answers stay right.

    Measured on an AVX2-only 2-core EPYC (all 121 matmuls of one SmolLM2-135M step, one
    thread): 1 row fp32 39 ms, fbgemm fp16 22, int4 (bf16 activations) 21; 32 rows fp32
    207 ms, fp16 166, int4 278. torch's int4/int8 kernels are vectorised for bf16
    activations only on AVX2 (fp32 or fp16 activations: 7-10x slower). So without native
    bf16: the native kernels (q4decode.c: Q4_1 weights, exact for the GGUF's, x int8
    activations) for every step and prompt; one thread, a whole 32-row step: 165-187 ms
    at length 10 and 210 at length 250, against the torch fp16 path's 186-214 and 300.
    Without a C compiler: fp32 activations, fp16 weights for batches, int4 for 1-2 rows.
    With native bf16 (AVX512-BF16/AMX): bf16 weights, int4 for 1-2 rows (not measured
    against the native kernels there). ``dtype=float32`` (or GRIDTUNE_DTYPE=float32) is
    the exact mode."""
    on_cpu = device == "cpu"
    n_threads = threads or (physical_cores() if on_cpu else 1)
    kind = cpu_kind() if on_cpu else device
    explicit = dtype is not None or bool(__import__("os").environ.get("GRIDTUNE_DTYPE", "").strip())
    act = dtype or pick_dtype(device)
    if not on_cpu:
        return Plan(device, kind, act, str(act).removeprefix("torch.").replace("float32", "fp32")
                    .replace("bfloat16", "bf16"), None, None, n_threads)
    if act == torch.bfloat16:
        small = None if lowbit is False else small_kernel(torch.bfloat16, "cpu")
        head = "int8" if small else None
        return Plan(device, kind, act, "bf16", small, head, n_threads)
    if explicit and lowbit is not True:  # fp32 asked for: the exact mode
        return Plan(device, kind, torch.float32, "fp32", None, None, n_threads)
    gemm = "fp16" if _fp16_gemm_works() else "fp32"
    if lowbit is False:
        return Plan(device, kind, torch.float32, gemm, None, None, n_threads)
    from . import cpukernel

    if cpukernel.load() is not None:
        return Plan(device, kind, torch.float32, NATIVE, NATIVE, "q8_0", n_threads)
    small = small_kernel(torch.bfloat16, "cpu")
    return Plan(device, kind, torch.float32, gemm, small, gemm if small else None, n_threads)


NATIVE = "q4_1-native"  # q4decode.c: a whole step or prompt in one call (cpukernel.py)


def _without_native(plan: Plan) -> Plan:
    """The plan on torch's kernels, for a model the native kernel cannot take."""
    gemm = "fp16" if _fp16_gemm_works() else "fp32"
    small = small_kernel(torch.bfloat16, "cpu")
    return dataclasses.replace(plan, gemm=gemm, small=small, head=gemm if small else None)


class _Linear:
    """A weight for the GEMM (batches, prompts), plus a low-bit copy for steps of 1-2 rows.

    One stream's decode step reads every weight once and does little else, so it is
    bound by memory bandwidth: measured on 70M parameters out of cache, one row took
    9.6 ms in bf16, 5.4 ms with torch's int8 weight-only kernel and 2.3 ms with its int4
    kernel (groups of 32 along the input, a scale and a zero each: the layout of the
    default model's own Q4_1 GGUF, whose weights it therefore holds exactly, but for
    bf16 scales). The low-bit kernels take bf16 activations: x is cast in, the result
    out. From ~4 rows on the GEMM is faster than either, so batches use it.
    """

    __slots__ = ("w", "mode", "q", "aux", "gemm", "packed", "out_dtype")

    def __init__(self, w: torch.Tensor, small: str | None, gemm: str = "native"):
        self.mode, self.q, self.aux, self.packed = None, None, None, None
        self.gemm = gemm
        self.out_dtype = w.dtype
        if small == "int4" and w.shape[1] % INT4_GROUP == 0:
            try:
                self.q, self.aux = _int4(w)  # groups found in w's own precision (Q4_1: exact)
                self.mode = "int4"
            except Exception:  # noqa: BLE001 - a shape the kernel does not take: int8 then
                small = "int8"
        if small == "int8":
            full = w.float()
            scales = (full.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
            self.q = (full / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.aux = scales.to(torch.bfloat16)
            self.mode = "int8"
        if gemm == "fp16":  # fbgemm packs its own fp16 copy; the fp32 weight is not kept
            self.packed = torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), None)
            self.w = None
        else:
            self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is not None and x.shape[0] <= SMALL_MAX_ROWS:
            xb = x.to(torch.bfloat16)
            if self.mode == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.q, INT4_GROUP, self.aux)
            else:
                y = torch.ops.aten._weight_int8pack_mm(xb, self.q, self.aux)
            return y.to(x.dtype)
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return F.linear(x, self.w)


SMALL_MAX_ROWS = 2
INT4_GROUP = 32


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, bf16 scales and zeros) for torch's CPU int4 kernel: per group of
    32 inputs, q = round((w - min) / scale) in 0..15 and w ~ (q - 8) * scale + (min + 8 * scale)."""
    n, k = w.shape
    groups = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    aux = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).contiguous().to(torch.bfloat16)
    return packed, aux


def small_kernel(dtype: torch.dtype, device: str) -> str | None:
    """The low-bit kernel for 1-2 row steps on this CPU: int4, else int8, else None.
    Both take bf16 activations (where torch vectorises them, AVX2 included). Each kernel
    is checked by running it."""
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
    """One layer's weights for torch's kernels (the linears are None where the native
    kernel holds its own copies)."""
    ln1: torch.Tensor
    qkv: Any  # _Linear [(H + 2*KVH) * D, hidden]
    qkv_bias: torch.Tensor | None  # Qwen2's q/k/v biases, in the KV cache's dtype
    o: Any
    ln2: torch.Tensor  # the norm before the MLP
    gate_up: Any  # _Linear [2 * inter, hidden]
    down: Any
    q_norm: torch.Tensor | None = None  # Qwen3/Gemma 3: per-head norms of q and k before RoPE
    k_norm: torch.Tensor | None = None
    post_attn: torch.Tensor | None = None  # Gemma: norms of the attention's and the MLP's outputs
    post_ffn: torch.Tensor | None = None
    window: int = 0  # a query sees its last ``window`` positions; 0: all of them
    theta: float = 10000.0  # RoPE base


class FastLlama:
    """Decoder weights, the slot KV cache, prefill and one batched decode step."""

    def __init__(self, model: Any, *, slots: int, dtype: torch.dtype | None = None,
                 device: str | None = None, capacity: int = 512, kv_dtype: torch.dtype | None = None,
                 lowbit: bool | None = None, plan: Plan | None = None):
        cfg = model.config
        self.device = device or str(next(model.parameters()).device)
        self.plan = plan or choose_plan(self.device, dtype=dtype, lowbit=lowbit)
        self.dtype = self.plan.dtype
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
        arch = arch_of(cfg)
        if arch is None:
            raise ValueError(f"the fast decoder does not run {getattr(cfg, 'model_type', '?')} models")
        self.arch = arch
        self.scale = arch.attn_scale or 1.0 / math.sqrt(self.head_dim)
        self.slots = slots
        self.group = self.n_heads // self.n_kv
        self.native: Any = None  # cpukernel.NativeStep: every step and prompt in one native call each
        if self.plan.small == NATIVE:
            from . import cpukernel

            if not cpukernel.fits(self.hidden, self.inter, self.n_heads, self.head_dim):  # torch's kernels then
                self.plan = _without_native(self.plan)
        self.small = self.plan.small if self.plan.small != NATIVE else None  # torch's low-bit kernel, or None
        self._raw: list[dict[str, torch.Tensor]] = []  # fp32 weights for the native step, dropped once built
        self._raw_head: torch.Tensor | None = None
        self.layers, self.norm, self.embed, self.lm_head = self._weights(model)
        self.tables = {theta: self._rope(theta) for theta in set(arch.thetas)}  # (cos, sin) per RoPE base
        self.cos, self.sin = self.tables[arch.thetas[0]]
        if self.plan.small == NATIVE:
            from . import cpukernel

            self.native = cpukernel.native_step(self, self._raw, self._raw_head)
            if self.native is None:  # cannot happen after fits() and load(); torch's kernels then
                self.plan = _without_native(self.plan)
                self.small = self.plan.small
                self.layers, self.norm, self.embed, self.lm_head = self._weights(model)
        self._raw, self._raw_head = [], None
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

        gemm = "fp16" if self.plan.gemm == "fp16" else "native"

        native = self.plan.small == NATIVE

        def lin(t: torch.Tensor) -> _Linear | None:  # the native kernel holds its own copies
            return None if native else _Linear(w(t), self.small, gemm)

        arch = self.arch

        def norm(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            return (t.detach().float() + arch.norm_offset).to(device=dev, dtype=dtype or dt).contiguous()

        layers = []
        for i, layer in enumerate(base.layers):
            att, mlp = layer.self_attn, layer.mlp
            if hasattr(att, "qkv_proj"):  # Phi-3: q, k and v in one matrix already
                qkv_w, bias = att.qkv_proj.weight, att.qkv_proj.bias
            else:
                projs = (att.q_proj, att.k_proj, att.v_proj)
                qkv_w = torch.cat([p.weight for p in projs])
                bias = (torch.cat([p.bias if p.bias is not None else torch.zeros(p.weight.shape[0]) for p in projs])
                        if any(p.bias is not None for p in projs) else None)
            if bias is not None:
                bias = bias.detach().to(device=dev, dtype=self.kv_dtype).contiguous()
            gu_w = (mlp.gate_up_proj.weight if hasattr(mlp, "gate_up_proj")  # Phi-3: gate then up, fused
                    else torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            if native:
                self._raw.append({"qkv": qkv_w.detach(), "o": att.o_proj.weight.detach(), "gu": gu_w.detach(),
                                  "down": mlp.down_proj.weight.detach()})
            q_norm, k_norm = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
            layers.append(_Layer(
                ln1=norm(layer.input_layernorm.weight),
                qkv=lin(qkv_w),
                qkv_bias=bias,
                o=lin(att.o_proj.weight),
                ln2=norm(layer.pre_feedforward_layernorm.weight if arch.sandwich
                         else layer.post_attention_layernorm.weight),
                gate_up=lin(gu_w),
                down=lin(mlp.down_proj.weight),
                q_norm=norm(q_norm.weight, self.kv_dtype) if q_norm is not None else None,
                k_norm=norm(k_norm.weight, self.kv_dtype) if k_norm is not None else None,
                post_attn=norm(layer.post_attention_layernorm.weight) if arch.sandwich else None,
                post_ffn=norm(layer.post_feedforward_layernorm.weight) if arch.sandwich else None,
                window=arch.windows[i],
                theta=arch.thetas[i],
            ))
        embed = w(base.embed_tokens.weight)
        head = model.get_output_embeddings().weight
        self._raw_head = head.detach() if native else None
        small_head = self.plan.head if self.plan.head in ("int4", "int8") else None
        lm_head = None if native else _Linear(
            embed if head.data_ptr() == base.embed_tokens.weight.data_ptr() else w(head), small_head, gemm)
        return layers, norm(base.norm.weight), embed, lm_head

    def _rope(self, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        pos = torch.arange(self.max_pos, dtype=torch.float64)
        freqs = torch.outer(pos, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        # rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * sign: fold the sign into sin.
        sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)]).double()
        return emb.cos().to(self.device, self.kv_dtype), (emb.sin() * sign).to(self.device, self.kv_dtype)

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

    def _qkv(self, L: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [n, H, D], k and v [n, KV, D] of ``h`` [n, hidden]: biases, q/k norms, RoPE."""
        n, H, KV, D = h.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = L.qkv(h).to(self.kv_dtype)
        if L.qkv_bias is not None:
            qkv = qkv + L.qkv_bias
        qk = qkv[:, :(H + KV) * D].view(n, H + KV, D)
        if L.q_norm is not None:
            qk = torch.cat([F.rms_norm(qk[:, :H], (D,), L.q_norm, self.eps),
                            F.rms_norm(qk[:, H:], (D,), L.k_norm, self.eps)], dim=1)
        qk = self._rot(qk, cos, sin)
        return qk[:, :H], qk[:, H:], qkv[:, (H + KV) * D:].view(n, KV, D)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` over ``k``/``v`` where ``allowed`` (broadcast to the scores) says."""
        cap = self.arch.attn_softcap
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (self.scale / cap)) * cap
        return torch.matmul(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), v)

    def _residual(self, x: torch.Tensor, L: _Layer, attn: torch.Tensor) -> torch.Tensor:
        """``x`` plus the attention's output ``attn`` [n, H*D], then plus the MLP's."""
        a = L.o(attn.to(self.dtype))
        if L.post_attn is not None:
            a = F.rms_norm(a, (self.hidden,), L.post_attn, self.eps)
        x = x + a
        gu = L.gate_up(F.rms_norm(x, (self.hidden,), L.ln2, self.eps))
        gate = gu[:, :self.inter]
        gate = F.silu(gate) if self.arch.act == "silu" else F.gelu(gate, approximate="tanh")
        m = L.down(gate * gu[:, self.inter:])
        if L.post_ffn is not None:
            m = F.rms_norm(m, (self.hidden,), L.post_ffn, self.eps)
        return x + m

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        return x * self.arch.embed_scale if self.arch.embed_scale != 1.0 else x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.hidden,), self.norm, self.eps)
        return self.soft_cap(self.lm_head(x).float())

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def extends(self) -> bool:
        """Whether ``prefill`` can start past a prefix already in the slot (both paths can;
        a wrapper that cannot says False)."""
        return True

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Run a prompt into ``slot``'s cache; the logits of its last position, [V] fp32.
        ``start``: positions ``0..start-1`` already hold this prompt's prefix (see ``extends``)."""
        n = len(ids)
        if not 0 <= start < n:
            raise ValueError(f"a prefix of {start} leaves nothing of a {n}-token prompt to run")
        self.ensure(slot + 1, n + 1)
        if self.native is not None:
            return self.native.prefill(slot, ids, start=start)
        m = n - start  # the tokens run here, at positions start..n-1
        x = self._embed(torch.tensor(ids[start:], device=self.device))  # [m, hidden]
        tables = {t: (c[start:n].unsqueeze(1), s[start:n].unsqueeze(1)) for t, (c, s) in self.tables.items()}
        query_at = torch.arange(start, n, device=self.device).unsqueeze(1)  # [m, 1]
        key_at = torch.arange(n, device=self.device).unsqueeze(0)  # [1, n]
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, F.rms_norm(x, (self.hidden,), L.ln1, self.eps), *tables[L.theta])
            self.k[i][slot, :, start:n] = k.transpose(0, 1)
            self.v[i][slot, :, start:n] = v.transpose(0, 1)
            # [1, KV, group*m, D] would break causality across the group: repeat K/V once here.
            keys = self.k[i][slot, :, :n] if start else k.transpose(0, 1)  # [KV, n, D]
            values = self.v[i][slot, :, :n] if start else v.transpose(0, 1)
            kk = keys.repeat_interleave(self.group, dim=0).unsqueeze(0)
            vv = values.repeat_interleave(self.group, dim=0).unsqueeze(0)
            qq = q.transpose(0, 1).unsqueeze(0)
            if not start and L.window == 0 and self.arch.attn_softcap is None:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=self.scale)
            else:
                allowed = key_at <= query_at
                if L.window:
                    allowed &= key_at > query_at - L.window
                o = self._attend(qq, kk, vv, allowed)
            x = self._residual(x, L, o[0].transpose(0, 1).reshape(m, -1))
        return self._logits(x[-1:])[0]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One step for rows in slots ``0..B-1``: ``tokens`` [B] at ``positions`` [B];
        ``length`` is one past the largest position. Returns logits [B, V] fp32."""
        B = tokens.shape[0]
        if self.native is not None:
            return self.native(tokens, positions, length)
        H, KV, D, G = self.n_heads, self.n_kv, self.head_dim, self.group
        x = self._embed(tokens)  # [B, hidden]
        tables = {t: (c[positions].unsqueeze(1), s[positions].unsqueeze(1)) for t, (c, s) in self.tables.items()}
        # Each row sees its own positions 0..pos (the last ``window`` of them in a sliding
        # layer); slots hold stale data past that.
        at = torch.arange(length, device=self.device).unsqueeze(0)
        masks = {w: ((at <= positions.unsqueeze(1)) & (at > positions.unsqueeze(1) - w if w else True))
                 .view(B, 1, 1, length) for w in {L.window for L in self.layers}}
        rows = torch.arange(B, device=self.device)
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, F.rms_norm(x, (self.hidden,), L.ln1, self.eps), *tables[L.theta])
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, positions] = k
            vc[rows, :, positions] = v
            q = q.reshape(B, KV, G, D)  # the G heads of a KV head as G query rows
            o = self._attend(q, kc[:B, :, :length], vc[:B, :, :length], masks[L.window])
            x = self._residual(x, L, o.reshape(B, H * D))
        return self._logits(x)


def merged_lora(base_model: Any, adapter_dir: str) -> Any:
    """A plain copy of ``base_model`` with the LoRA adapter in ``adapter_dir`` merged in."""
    import copy

    from peft import PeftModel

    clone = copy.deepcopy(base_model)
    merged = PeftModel.from_pretrained(clone, adapter_dir).merge_and_unload()
    merged.eval()
    return merged
