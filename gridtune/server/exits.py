"""Exits: a tuned model leaves gridtune in the format the engine people serve it with loads.

``export_model(result_dir, out_dir, to=...)`` writes one of:

* ``hf``     the merged Hugging Face directory (transformers, vLLM);
* ``gguf``   one GGUF file of the merged model for llama.cpp (f16, or ``quant``: f32, bf16,
             q8_0 here; q4_0/q4_k_m/q5_k_m/q6_k through llama.cpp's own quantizer), with the
             tokenizer, special tokens and chat template, so llama.cpp prompts it as gridtune did;
* ``ollama`` that GGUF plus a Modelfile (FROM, TEMPLATE, PARAMETER stop, SYSTEM);
* ``vllm``   the PEFT adapter as vLLM loads it (``--lora-modules``), or the merged directory
             of a full fine-tune;

and returns what it wrote and the commands that run it. The GGUF is written with llama.cpp's
own ``gguf`` package (writer, tensor-name map, vocab helpers), following its
``convert_hf_to_gguf.py`` for the architectures listed in ``GGUF_ARCHS``.

A completion-format (legacy) model carries its separator and stop: ``profile`` (what the
training file looked like, see ``data_profile``) puts them into the GGUF metadata
(``gridtune.separator``, ``gridtune.stop``), the Modelfile and the printed commands.

Every refusal is a one-line ``ExportTargetError``/``ModelError`` before anything is written;
the output is built in a temp dir beside ``out_dir`` and renamed at the end, so a failure
mid-write (a full disk) leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from gridtune.core.errors import one_line

from .merge import ExportTargetError, check_target, is_adapter, merge_into, result_base, staged
from .model import ModelError

TARGETS = ("hf", "gguf", "ollama", "vllm")
# Written by the gguf package itself (the float types and Q8_0 have Python quantizers).
DIRECT_QUANTS = ("f16", "f32", "bf16", "q8_0")
# Need llama.cpp's quantizer (k-quants pick per-tensor types; llama_model_quantize does that).
LLAMA_QUANTS = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama_ftype values
# vLLM accepts these --max-lora-rank values only.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# HF architecture -> (llama.cpp architecture, undo the rotary permutation of q/k as
# convert_hf_to_gguf.py's LlamaModel does). Each is checked by tests/test_exits.py.
GGUF_ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}

# convert_hf_to_gguf.py's pre-tokenizer fingerprints (the hash of its check text's token
# ids) for the byte-level BPE tokenizers of the families above.
_PRE_BY_HASH = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
_CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
    '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
    'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= '
    'нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
    '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)


@dataclass
class Exported:
    """What an export wrote (paths relative to ``out_dir``) and how to run it."""

    target: str
    out_dir: Path
    files: list[str]
    commands: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "output_dir": str(self.out_dir), "files": self.files,
                "commands": self.commands, "notes": self.notes}


# -- what the training file looked like ---------------------------------------------------

def _common_suffix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[-1 - i] == b[-1 - i]:
        i += 1
    return a[len(a) - i:]


def _trim(common: str, known: tuple[str, ...]) -> str:
    """The marker in a common ending: the longest ``known`` one it ends with, else what
    follows the ending's last sentence punctuation (texts that all end '… and art.' make
    the completions' common ending ' and art. END' for the stop ' END'; '..' is the stop '.')."""
    hits = [k for k in known if k and common.endswith(k)]
    if hits:
        return max(hits, key=len)
    cut = max(common.rfind(c) for c in ".!?…")
    return common[cut + 1:] or common[-1:] if cut >= 0 else common


def data_profile(path: Path, *, separators: tuple[str, ...] = (), stops: tuple[str, ...] = ()) -> dict[str, Any]:
    """The format of a training file and what a served copy of its model needs: for the
    completion format the separator (the prompts' common ending) and the stop (the
    completions'), for chat the system message every example starts with (if one)."""
    fmt: str | None = None
    prompt_end: str | None = None
    completion_end: str | None = None
    system: str | None = None
    systems_agree = True
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            if isinstance(row.get("messages"), list):
                fmt = fmt or "chat"
                first = row["messages"][0] if row["messages"] else {}
                this = first.get("content") if isinstance(first, dict) and first.get("role") == "system" else None
                if system is None and systems_agree:
                    system = this
                systems_agree = systems_agree and this is not None and this == system
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                fmt = fmt or "completion"
                p, c = row["prompt"], row["completion"]
                prompt_end = p if prompt_end is None else _common_suffix(prompt_end, p)
                completion_end = c if completion_end is None else _common_suffix(completion_end, c)
    if fmt == "completion":
        return {"format": "completion", "separator": _trim(prompt_end or "", separators) or None,
                "stop": _trim(completion_end or "", stops) or None}
    return {"format": fmt or "chat", "system": system if systems_agree else None}


# -- names and commands --------------------------------------------------------------------

def model_slug(model_id: str) -> str:
    """A name Ollama and file systems accept: ``ft:Base:local:suffix:ftjob-abc…`` ->
    ``base-suffix-abc123`` (lower case, [a-z0-9._-])."""
    parts = model_id.split(":")
    if len(parts) >= 5 and parts[0] == "ft":
        pieces = [parts[1], parts[3], parts[-1].removeprefix("ftjob-")[-6:]]
    else:
        pieces = [model_id]
    slug = re.sub(r"[^a-z0-9._-]+", "-", "-".join(p for p in pieces if p).lower()).strip("-._")
    return slug[:80] or "model"


def _q(text: str) -> str:
    return shlex.quote(text)


def _ask_lines(profile: dict[str, Any], name: str, base_url: str) -> list[str]:
    """The gridtune command that prompts a served export the way the model was trained."""
    if profile.get("format") == "completion":
        prompt = "YOUR PROMPT" + (profile.get("separator") or "")
        line = f"OPENAI_BASE_URL={base_url} gridtune ask --legacy {_q(name)} {_q(prompt)}"
        if profile.get("stop"):
            line += f" --stop {_q(profile['stop'])}"
        return [line]
    return [f"OPENAI_BASE_URL={base_url} gridtune ask {_q(name)} 'YOUR PROMPT'"]


# -- GGUF ------------------------------------------------------------------------------------

def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("GGUF export needs llama.cpp's gguf package; pip install 'gridtune[local]'") from None
    return gguf


def llama_quantizer() -> Any:
    """llama.cpp's quantizer: a callable (src, dst, ftype) -> None, or None when neither
    llama-cpp-python nor a ``llama-quantize`` binary is available."""
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None and hasattr(llama_cpp, "llama_model_quantize"):
        import ctypes

        def run(src: Path, dst: Path, ftype: int) -> None:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
            if rc != 0:
                raise ModelError(f"llama.cpp's quantizer failed (code {rc})")
        return run
    binary = shutil.which("llama-quantize")
    if binary:
        import subprocess

        names = {v: k.upper() for k, v in LLAMA_QUANTS.items()}

        def run_binary(src: Path, dst: Path, ftype: int) -> None:
            proc = subprocess.run([binary, str(src), str(dst), names[ftype]], capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()
                raise ModelError(f"llama-quantize failed: {tail[-1] if tail else proc.returncode}")
        return run_binary
    return None


def _pre_tokenizer(tokenizer: Any, model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by convert_hf_to_gguf.py's
    fingerprint, else read off tokenizer.json for the two plain byte-level shapes."""
    found = _PRE_BY_HASH.get(sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest())
    if found:
        return found
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        pre = {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split, which llama.cpp's "gpt-2" implements
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split
    raise ModelError("GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows; "
                     "export --to hf and convert with llama.cpp's convert_hf_to_gguf.py")


def _write_vocab(gguf: Any, writer: Any, model_dir: Path) -> dict[str, Any]:
    """convert_hf_to_gguf.py's _set_vocab_gpt2 (byte-level BPE), with add_bos/add_eos taken
    from what the tokenizer really does, so llama.cpp tokenizes a prompt as gridtune does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")) \
        if (model_dir / "tokenizer.json").is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError("GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM, Qwen); this one is "
                         "SentencePiece-style: export --to hf and convert with llama.cpp's convert_hf_to_gguf.py")
    vocab_size = max(len(tokenizer), int(json.loads((model_dir / "config.json").read_text())["vocab_size"]))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(bos is not None and probe[:1] == [bos])
    special.add_special_token["eos"] = bool(eos is not None and probe[-1:] == [eos])
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"eos": tokenizer.eos_token, "template": special.chat_template, "tokenizer": tokenizer}


def _permute(w: Any, n_head: int) -> Any:
    """HF's rotary layout (halves) to GGML's (interleaved pairs): convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = dict(params)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def write_gguf(model_dir: Path, dest: Path, *, quant: str = "f16", name: str = "model",
               profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert the HF directory ``model_dir`` into the GGUF file ``dest`` (f16/f32/bf16/q8_0)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    gguf = _import_gguf()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in GGUF_ARCHS:
        raise ModelError(f"GGUF export knows {', '.join(sorted(GGUF_ARCHS))}, not {hf_arch}; export --to hf and "
                         "convert with llama.cpp's convert_hf_to_gguf.py")
    arch_name, undo_permute = GGUF_ARCHS[hf_arch]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    rope = _rope(config)
    if rope.get("rope_type") not in (None, "default", "linear", "llama3"):
        raise ModelError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not handled; export --to hf and "
                         "convert with llama.cpp's convert_hf_to_gguf.py")
    n_layers, n_head = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    qtypes = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    ftypes = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

    writer = gguf.GGUFWriter(str(dest), arch_name)
    try:
        writer.add_name(name)
        writer.add_block_count(n_layers)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_file_type(ftypes[quant])
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
        vocab = _write_vocab(gguf, writer, model_dir)
        profile = profile or {}
        # gridtune's own keys: how the model was trained to be prompted (llama.cpp ignores them).
        writer.add_string("gridtune.format", profile.get("format") or "chat")
        for key in ("separator", "stop", "system"):
            if profile.get(key):
                writer.add_string(f"gridtune.{key}", profile[key])

        tensor_map = gguf.get_tensor_name_map(arch, n_layers)
        tensors: list[tuple[str, Any]] = []
        if rope.get("rope_type") == "llama3":
            freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            tensors.append((freqs, _llama3_factors(rope, head_dim)))
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            raise ModelError(f"{model_dir} has no safetensors weights")
        for shard in shards:
            for key, tensor in load_file(str(shard)).items():
                if key.endswith((".rotary_emb.inv_freq", ".attention.masked_bias")):
                    continue
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                data = tensor.to(torch.float32)
                if undo_permute and key.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, n_head)
                elif undo_permute and key.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, n_kv)
                new = tensor_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ModelError(f"GGUF export: no llama.cpp name for tensor {key} of {hf_arch}")
                tensors.append((new, data.numpy()))
        for new, arr in tensors:
            arr = np.asarray(arr, dtype=np.float32)
            qtype = qtypes[quant]
            if arr.ndim <= 1 or new.endswith("_norm.weight"):
                qtype = gguf.GGMLQuantizationType.F32  # llama.cpp wants norms and 1-D tensors in f32
            try:
                data = gguf.quants.quantize(arr, qtype)
            except gguf.QuantError:  # a row not a whole number of blocks: f16, as convert does
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(arr, qtype)
            writer.add_tensor(new, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return vocab


def _llama3_factors(rope: dict[str, Any], dim: int) -> Any:
    """convert_hf_to_gguf.py's rope_freqs tensor for Llama 3.1+ rope scaling."""
    import math

    import numpy as np

    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# -- Ollama ----------------------------------------------------------------------------------

_CHATML = re.compile(r"(?:<\|im_start\|>system\n(?P<default>.*?)<\|im_end\|>\n)?"
                     r"<\|im_start\|>user\nXQ1<\|im_end\|>\n<\|im_start\|>assistant\n", re.S)
_CHATML_FULL = ("<|im_start|>system\nXS<|im_end|>\n<|im_start|>user\nXQ1<|im_end|>\n"
                "<|im_start|>assistant\nXA<|im_end|>\n<|im_start|>user\nXQ2<|im_end|>\n<|im_start|>assistant\n")


def ollama_template(tokenizer: Any) -> str | None:
    """The Go template that renders what the model's Jinja chat template renders, for the
    ChatML family (SmolLM2, Qwen), its default system prompt included; None for other
    templates (Ollama then reads the chat template from the GGUF itself)."""
    try:
        bare = tokenizer.apply_chat_template([{"role": "user", "content": "XQ1"}], tokenize=False,
                                             add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [{"role": "system", "content": "XS"}, {"role": "user", "content": "XQ1"},
             {"role": "assistant", "content": "XA"}, {"role": "user", "content": "XQ2"}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - no or unusable template: let Ollama use the GGUF's
        return None
    match = _CHATML.fullmatch(bare)
    if full != _CHATML_FULL or match is None:
        return None
    default = match.group("default")
    if default is not None and ("{{" in default or '"""' in default):
        return None
    first = ("" if default is None else
             '{{ if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n' + default + "<|im_end|>\n{{ end }}")
    return ("{{- range $i, $m := .Messages }}" + first
            + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")


def _modelfile_str(text: str) -> str:
    if '"""' in text:
        raise ModelError('a stop, separator or system message contains """, which a Modelfile cannot hold')
    return '"""' + text + '"""' if ("\n" in text or '"' in text) else '"' + text + '"'


def modelfile(gguf_name: str, profile: dict[str, Any], eos: str | None, tokenizer: Any) -> tuple[str, list[str]]:
    """The Modelfile text and notes for an exported GGUF."""
    lines = [f"FROM ./{gguf_name}"]
    notes: list[str] = []
    stops: list[str] = []
    if profile.get("format") == "completion":
        # Ollama passes a completion model's prompt through, the separator appended as in training.
        lines.append("TEMPLATE " + _modelfile_str("{{ .Prompt }}" + (profile.get("separator") or "")))
        if profile.get("stop"):
            stops.append(profile["stop"])
    else:
        template = ollama_template(tokenizer)
        if template is None:
            notes.append("the chat template is not ChatML: the Modelfile has no TEMPLATE, and Ollama "
                         "uses the chat template stored in the GGUF")
        else:
            lines.append("TEMPLATE " + _modelfile_str(template))
        if profile.get("system"):
            lines.append("SYSTEM " + _modelfile_str(profile["system"]))
    if eos:
        stops.append(eos)
    for stop in dict.fromkeys(stops):
        lines.append("PARAMETER stop " + _modelfile_str(stop))
    return "\n".join(lines) + "\n", notes


# -- the exporter ------------------------------------------------------------------------------

def _check_quant(to: str, quant: str | None) -> str:
    if quant is None:
        return "f16"
    quant = quant.lower()
    if to not in ("gguf", "ollama"):
        raise ExportTargetError(f"--quant applies to --to gguf or ollama, not {to}")
    if quant in DIRECT_QUANTS:
        return quant
    if quant in LLAMA_QUANTS:
        if llama_quantizer() is None:
            raise ExportTargetError(f"--quant {quant} needs llama.cpp's quantizer (pip install llama-cpp-python, or "
                                    "llama-quantize on PATH); --quant q8_0 or f16 work without it")
        return quant
    raise ExportTargetError(f"unknown --quant {quant}; choose one of {', '.join(DIRECT_QUANTS + tuple(LLAMA_QUANTS))}")


def export_model(result_dir: Path, out_dir: Path, *, to: str = "hf", base: str | None = None,
                 quant: str | None = None, model_id: str = "model", profile: dict[str, Any] | None = None,
                 make_parents: bool = True, base_url: str = "http://127.0.0.1:8080/v1") -> Exported:
    """Write the fine-tuning result ``result_dir`` to the new directory ``out_dir`` for ``to``.

    ``base``: the model the result was trained from (None: the one it records);
    ``model_id``: the served id (names the files and the commands); ``profile``: see data_profile.
    """
    result_dir, out_dir = Path(result_dir), Path(out_dir).absolute()
    if to not in TARGETS:
        raise ExportTargetError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    if not (result_dir / "adapter_config.json").is_file() and not (result_dir / "config.json").is_file():
        raise ModelError(f"{model_id} has no fine-tuning result to export yet")
    quant = _check_quant(to, quant)
    profile = dict(profile or {"format": "chat"})
    name = model_slug(model_id)
    check_target(out_dir, make_parents=make_parents)
    if base is None:
        base = result_base(result_dir)
    try:
        with staged(out_dir) as tmp:
            if to == "hf":
                exported = _to_hf(result_dir, base, tmp, out_dir, name, profile, base_url)
            elif to == "vllm":
                exported = _to_vllm(result_dir, base, tmp, out_dir, name, profile)
            else:
                exported = _to_gguf(result_dir, base, tmp, out_dir, name, profile, quant, to, base_url)
    except OSError as exc:
        raise ExportTargetError(f"cannot write {out_dir}: {exc.strerror or one_line(exc)}; nothing was left "
                                "behind") from None
    exported.files = sorted(exported.files)
    return exported


def _files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


def _to_hf(result_dir: Path, base: str | None, tmp: Path, out: Path, name: str, profile: dict[str, Any],
           base_url: str) -> Exported:
    merge_into(base, result_dir, tmp)
    (tmp / "gridtune.json").unlink(missing_ok=True)  # the job's notes name paths on this machine
    commands = [f"vllm serve {_q(str(out))} --served-model-name {_q(name)}",
                *_ask_lines(profile, name, base_url.replace("8080", "8000"))]
    notes = [f"transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})"]
    return Exported("hf", out, _files(tmp), commands, notes)


def _to_vllm(result_dir: Path, base: str | None, tmp: Path, out: Path, name: str, profile: dict[str, Any]) -> Exported:
    from .model import DEFAULT_MODEL, load_model

    if not is_adapter(result_dir):  # a full fine-tune: vLLM serves the merged directory itself
        exported = _to_hf(result_dir, base, tmp, out, name, profile, "http://127.0.0.1:8000/v1")
        exported.target = "vllm"
        return exported
    config = json.loads((result_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base_path = Path(base).expanduser() if base and base != DEFAULT_MODEL else None
    notes: list[str] = []
    if base_path is not None and base_path.is_dir() and (base_path / "config.json").is_file():
        base_ref = str(base_path.resolve())
    else:
        # The base came from a GGUF (the default model is one): vLLM needs it as safetensors,
        # the weights the adapter was trained on, so the export carries them.
        loaded = load_model(base, device="cpu")
        loaded.model.save_pretrained(tmp / "base", safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp / "base")
        base_ref = str(out / "base")
        notes.append("base/ holds the base model as it was trained on (dequantized from its GGUF)")
    adapter = tmp / "adapter"
    adapter.mkdir()
    config["base_model_name_or_path"] = base_ref
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = result_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{result_dir} has no adapter_model.safetensors")
    shutil.copyfile(weights, adapter / "adapter_model.safetensors")
    rank = int(config.get("r", 8))
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    command = (f"vllm serve {_q(base_ref)} --enable-lora --max-lora-rank {max_rank} "
               f"--lora-modules {_q(name + '=' + str(out / 'adapter'))}")
    return Exported("vllm", out, _files(tmp), [command, *_ask_lines(profile, name, "http://127.0.0.1:8000/v1")], notes)


def _to_gguf(result_dir: Path, base: str | None, tmp: Path, out: Path, name: str, profile: dict[str, Any],
             quant: str, to: str, base_url: str) -> Exported:
    merged = tmp / ".merged"
    merged.mkdir()
    merge_into(base, result_dir, merged)
    gguf_name = f"{name}.{quant}.gguf"
    direct = quant if quant in DIRECT_QUANTS else "f16"
    written = tmp / (gguf_name if direct == quant else f".{name}.f16.gguf")
    vocab = write_gguf(merged, written, quant=direct, name=name, profile=profile)
    if quant in LLAMA_QUANTS:
        quantizer = llama_quantizer()
        assert quantizer is not None  # checked before any work
        quantizer(written, tmp / gguf_name, LLAMA_QUANTS[quant])
        written.unlink()
    tokenizer = vocab.pop("tokenizer")
    shutil.rmtree(merged)
    notes: list[str] = []
    path = out / gguf_name
    if to == "ollama":
        text, notes = modelfile(gguf_name, profile, vocab.get("eos"), tokenizer)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        commands = [f"ollama create {_q(name)} -f {_q(str(out / 'Modelfile'))}"]
        if profile.get("format") == "completion":
            commands.append(f"ollama run {_q(name)} 'YOUR PROMPT'")
        else:
            commands.append(f"ollama run {_q(name)}")
    else:
        commands = [f"llama-server -m {_q(str(path))} --port 8080", *_ask_lines(profile, name, base_url)]
        if profile.get("format") == "completion":
            notes.append(f"a completion-format model: end each prompt with {profile.get('separator')!r} and stop "
                         f"at {profile.get('stop')!r} (both in the GGUF as gridtune.separator / gridtune.stop)")
    return Exported(to, out, _files(tmp), commands, notes)
