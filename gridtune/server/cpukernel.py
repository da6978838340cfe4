"""The native decoder for x86 CPUs with AVX2 (q4decode.c): every decode step and prompt, built at first use.

Why: on a CPU without native bf16, torch's own low-bit kernels and per-op dispatch left
one stream of the default model at a third of llama.cpp's speed (torch's int4 matmul
alone took ~21 ms a step on one EPYC core; llama.cpp's whole step ~15 ms). q4decode.c
runs a whole step (any number of rows) or a whole prompt in one call with llama.cpp's
arithmetic: Q4_1 weights (the GGUF's own blocks, so nothing is lost; Q8_0 for a matrix
whose source had more than 4 bits, see Q4_KEEPS), activations quantised per 32 to int8,
a Q8_0 head. Batches went through torch's fp16 GEMM before:
32 rows took ~170 ms a step there on one EPYC core (see bench/serve.py for now).

The library is compiled once per source version with the system C compiler into the
cache directory (about a second). No compiler, no AVX2/FMA/F16C, or a failed build:
``load()`` returns None with the reason in ``why_not`` and the decoder keeps torch's
kernels. GRIDTUNE_NATIVE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("q4decode.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
QK = 32
why_not: str | None = None
_lib: Any = None
_lock = threading.Lock()


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab",
                                            "cap")] + [
        ("eps", ctypes.c_float),
        ("embed", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p),
        ("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p), ("gu", ctypes.c_void_p), ("down", ctypes.c_void_p),
        ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p),
        ("norm", ctypes.c_void_p), ("head", ctypes.c_void_p),
        ("qkv_b", ctypes.c_void_p),  # NULL: no biases
        ("qk_norm", ctypes.c_void_p), ("post_attn", ctypes.c_void_p), ("post_ffn", ctypes.c_void_p),
        ("cos_l", ctypes.c_void_p), ("sin_l", ctypes.c_void_p), ("window", ctypes.c_void_p),
        ("act", ctypes.c_int), ("embed_scale", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("attn_softcap", ctypes.c_float), ("q8", ctypes.c_void_p),
    ]


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build() -> Any:
    from gridtune import locations

    if os.environ.get("GRIDTUNE_NATIVE", "").strip() == "0":
        raise RuntimeError("GRIDTUNE_NATIVE=0")
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        raise RuntimeError(f"the CPU lacks {', '.join(sorted(missing))}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = locations.cache_dir() / "kernels" / f"q4decode-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            part = Path(tmp) / target.name
            proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(part), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cc).name} failed: {(proc.stderr or proc.stdout).strip()[:200]}")
            os.replace(part, target)
    # torch is loaded first, so the library's libgomp.so.1 is torch's own: one OpenMP
    # runtime, one thread team, and torch.set_num_threads sizes it.
    lib = ctypes.CDLL(str(target))
    lib.gt_forward.restype = ctypes.c_int
    lib.gt_forward.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def load() -> Any:
    """The compiled library, or None (``why_not`` says why)."""
    global _lib, why_not
    with _lock:
        if _lib is None and why_not is None:
            try:
                _lib = _build()
            except Exception as exc:  # noqa: BLE001 - any failure means torch's kernels
                why_not = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _lib


def q4_1_blocks(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, K/32] Q4_1 blocks (fp16 d, fp16 m, 16 bytes of nibbles) as bytes.
    Per block: m = min, d = (max - min) / 15 in fp16, q = round((w - m) / d): exact for
    weights that came from Q4_1."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // QK, QK)
    low, high = g.amin(-1), g.amax(-1)
    d = ((high - low) / 15).half()
    m = low.half()
    safe = torch.where(d.float() > 0, d.float(), torch.ones_like(d.float()))
    q = ((g - m.float()[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([d.view(torch.uint8).view(n, k // QK, 2), m.view(torch.uint8).view(n, k // QK, 2), packed],
                     dim=-1).contiguous()


def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, K/32] Q8_0 blocks (fp16 d, 32 int8) as bytes: exact for Q8_0 weights."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // QK, QK)
    d = (g.abs().amax(-1) / 127).half()
    safe = torch.where(d.float() > 0, d.float(), torch.ones_like(d.float()))
    q = (g / safe[..., None]).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8).view(n, k // QK, 2), q.view(torch.uint8)], dim=-1).contiguous()


def q4_1_values(blocks: torch.Tensor) -> torch.Tensor:
    """The weights [N, K] that Q4_1 ``blocks`` [N, K/32, 20] hold (``q4_1_blocks``' inverse)."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    q = torch.cat([blocks[..., 4:] & 15, blocks[..., 4:] >> 4], dim=-1).float()
    return (q * d + m).flatten(-2)


def q8_0_values(blocks: torch.Tensor) -> torch.Tensor:
    """The weights [N, K] that Q8_0 ``blocks`` [N, K/32, 34] hold."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    return (blocks[..., 2:].contiguous().view(torch.int8).float() * d).flatten(-2)


# A matrix that came from 4-bit blocks (a Q4_0/Q4_1 GGUF, or such a base with a LoRA merged
# in) re-blocks into Q4_1 within ~1% of its norm; one from 5-8-bit or 16-bit weights loses
# ~8% (Gemma 3 270M's Q5_0/Q6_K GGUF in Q4_1: perplexity +20%), so it keeps 8 bits.
Q4_KEEPS = 0.02


def weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``w`` [N, K] as the native kernel's blocks: Q4_1 when that keeps it (see Q4_KEEPS),
    else Q8_0. Returns (blocks, is_q8)."""
    four = q4_1_blocks(w)
    full = w.detach().float()
    if float((q4_1_values(four) - full).norm()) <= Q4_KEEPS * float(full.norm()):
        return four, False
    return q8_0_blocks(w), True


def fits(cfg_hidden: int, inter: int, heads: int, head_dim: int) -> bool:
    return all(v % QK == 0 for v in (cfg_hidden, inter, heads * head_dim)) and head_dim % 8 == 0 and head_dim <= 512


class NativeStep:
    """q4decode.c's step over a FastLlama's weights and cache (refreshed when it grows)."""

    def __init__(self, lib: Any, lm: Any, weights: dict[str, list[torch.Tensor]], head: torch.Tensor):
        self.lib, self.lm = lib, lm
        self.keep: tuple = (weights, head)  # the block tensors the pointers point into
        n = len(lm.layers)

        def ptrs(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)

        self.arrays = {name: ptrs(ts) for name, ts in weights.items()}
        self.arrays["ln1"] = ptrs([L.ln1 for L in lm.layers])
        self.arrays["ln2"] = ptrs([L.ln2 for L in lm.layers])
        self.m = _Model(n_layers=n, hidden=lm.hidden, n_heads=lm.n_heads, n_kv=lm.n_kv, head_dim=lm.head_dim,
                        inter=lm.inter, vocab=lm.embed.shape[0], cap=0, eps=lm.eps,
                        embed=lm.embed.data_ptr(), cos=lm.cos.data_ptr(), sin=lm.sin.data_ptr(),
                        norm=lm.norm.data_ptr(), head=head.data_ptr())
        for name in ("ln1", "ln2", "qkv", "o", "gu", "down"):
            setattr(self.m, name, self.arrays[name].data_ptr())
        # The family's differences from Llama (fastlm.Arch): each layer has a part, or none does.
        layers = lm.layers
        qk = [torch.cat([L.q_norm, L.k_norm]).contiguous() for L in layers if L.q_norm is not None]
        rope = [lm.tables[L.theta] for L in layers]
        self.keep = (weights, head, qk)
        optional = {
            "qkv_b": [L.qkv_bias for L in layers] if layers[0].qkv_bias is not None else None,
            "qk_norm": qk or None,
            "post_attn": [L.post_attn for L in layers] if layers[0].post_attn is not None else None,
            "post_ffn": [L.post_ffn for L in layers] if layers[0].post_ffn is not None else None,
            "cos_l": [c for c, _ in rope] if len(lm.tables) > 1 else None,
            "sin_l": [s for _, s in rope] if len(lm.tables) > 1 else None,
        }
        for name, tensors in optional.items():
            if tensors is not None:
                self.arrays[name] = ptrs(tensors)
                setattr(self.m, name, self.arrays[name].data_ptr())
        if any(L.window for L in layers):
            self.arrays["window"] = torch.tensor([L.window for L in layers], dtype=torch.int32)
            self.m.window = self.arrays["window"].data_ptr()
        arch = lm.arch
        self.m.act = 1 if arch.act == "gelu_tanh" else 0
        self.m.embed_scale = arch.embed_scale
        self.m.attn_scale = lm.scale
        self.m.attn_softcap = arch.attn_softcap or 0.0
        self._cache_id: tuple | None = None
        self.q8_share = 0.0  # the share of the layers' matrices in Q8_0 blocks (the rest Q4_1)

    def _refresh(self) -> None:
        lm = self.lm
        cache_id = (lm.k[0].data_ptr(), lm.capacity)
        if cache_id != self._cache_id:  # ensure() grew the cache: new tensors
            self.arrays["kc"] = torch.tensor([t.data_ptr() for t in lm.k], dtype=torch.int64)
            self.arrays["vc"] = torch.tensor([t.data_ptr() for t in lm.v], dtype=torch.int64)
            self.m.kc, self.m.vc = self.arrays["kc"].data_ptr(), self.arrays["vc"].data_ptr()
            self.m.cap = lm.capacity
            self._cache_id = cache_id

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, length: int,
                heads: torch.Tensor) -> torch.Tensor:
        """Rows ``tokens`` at ``positions`` in ``slots`` (K/V written there); the logits of
        the rows in ``heads``, [len(heads), V] fp32."""
        self._refresh()
        tok = tokens.to(torch.int64).contiguous()
        pos = positions.to(torch.int64).contiguous()
        slot = slots.to(torch.int64).contiguous()
        want = heads.to(torch.int64).contiguous()
        out = torch.empty((want.shape[0], self.m.vocab), dtype=torch.float32)
        rc = self.lib.gt_forward(ctypes.byref(self.m), tok.shape[0], tok.data_ptr(), pos.data_ptr(),
                                 slot.data_ptr(), int(length), want.shape[0], want.data_ptr(), out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native decode step failed ({rc})")
        return self.lm.soft_cap(out)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One decode step: row r in slot r; logits for every row."""
        rows = torch.arange(tokens.shape[0], dtype=torch.int64)
        return self.forward(tokens, positions, rows, length, rows)

    def prefill(self, slot: int, ids: list[int], chunk: int = 256, start: int = 0) -> torch.Tensor:
        """A prompt into ``slot``: its tokens as rows at positions start..n-1 (in chunks, so
        the scratch memory stays small; positions before ``start`` already hold its prefix);
        the last position's logits, [V] fp32."""
        n = len(ids)
        if not 0 <= start < n:
            raise ValueError(f"a prefix of {start} leaves nothing of a {n}-token prompt to run")
        if not 0 <= slot < self.lm.allocated:  # the kernel trusts its slots: a wrong one writes past the cache
            raise ValueError(f"slot {slot} is not in the cache ({self.lm.allocated} allocated)")
        out: torch.Tensor | None = None
        for first in range(start, n, chunk):
            part = torch.tensor(ids[first:first + chunk], dtype=torch.int64)
            pos = torch.arange(first, first + part.shape[0], dtype=torch.int64)
            last = part.shape[0] - 1 if first + chunk >= n else None
            heads = torch.tensor([last] if last is not None else [], dtype=torch.int64)
            logits = self.forward(part, pos, torch.full_like(part, slot), first + part.shape[0], heads)
            if last is not None:
                out = logits[0]
        assert out is not None
        return out


def native_step(lm: Any, model_layers: list[dict[str, torch.Tensor]], head: torch.Tensor | None) -> NativeStep | None:
    """A NativeStep for ``lm`` from its fp32 weights, or None where it cannot run."""
    if head is None or lm.device != "cpu" or lm.kv_dtype != torch.float32 or lm.embed.dtype != torch.float32:
        return None
    if not fits(lm.hidden, lm.inter, lm.n_heads, lm.head_dim):
        return None
    lib = load()
    if lib is None:
        return None
    weights: dict[str, list[torch.Tensor]] = {"qkv": [], "o": [], "gu": [], "down": []}
    q8 = []
    for layer in model_layers:
        bits = 0
        for i, name in enumerate(weights):
            blocks, is_q8 = weight_blocks(layer[name])
            weights[name].append(blocks)
            bits |= int(is_q8) << i
        q8.append(bits)
    step = NativeStep(lib, lm, weights, q8_0_blocks(head))
    if any(q8):
        step.arrays["q8"] = torch.tensor(q8, dtype=torch.int32)
        step.m.q8 = step.arrays["q8"].data_ptr()
    step.q8_share = sum(bin(b).count("1") for b in q8) / (4 * len(q8))
    return step
