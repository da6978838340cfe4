"""The common families, each with a tiny random model built here
(llama, qwen2, qwen3, gemma2, gemma3, mistral, phi3): its own chat template is the one
prompts and training use (no ChatML leaking into a Gemma), greedy tokens served equal
HF generate's, LoRA targets the family's projections (fused on Phi-3) and lowers the
loss on a memorisation set, and the merged model answers as the adapter does; Llama,
Qwen2 and Mistral also run on the fast decoder, token for token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from gridtune.server.engine import Engine, SamplingParams, _eos_ids  # noqa: E402
from gridtune.server.model import CHATML_TEMPLATE, family_template, load_model, prepare_tokenizer  # noqa: E402
from gridtune.server.train import JobSpec, evaluate, lora_targets, run_job, tokenize_file  # noqa: E402
from tests.tiny_model import FAMILIES, make_tiny_family_model  # noqa: E402

pytestmark = pytest.mark.local
torch.set_num_threads(1)  # two cores are shared by every engineer's tests

ALL = sorted(FAMILIES)
TURN_END = {"llama": "<|im_end|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "gemma2": "<end_of_turn>",
            "gemma3": "<end_of_turn>", "mistral": "</s>", "phi3": "<|end|>"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_family_model(root / f"tiny-{f}", f) for f in ALL}


@pytest.mark.parametrize("family", ALL)
def test_own_template_prompts_and_stops(family: str, family_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(family_dirs[family]), device="cpu")
    engine = Engine(loaded, fast=False, calibrate=False, threads=1)
    ids = engine.chat_prompt(loaded.name, [{"role": "user", "content": "hello"}])
    text = loaded.tokenizer.decode(ids)
    own = FAMILIES[family][4]
    assert loaded.tokenizer.chat_template == own
    if "im_start" not in own:
        assert "<|im_" not in text and "SmolLM" not in text
    turn_end = loaded.tokenizer.convert_tokens_to_ids(TURN_END[family])
    assert turn_end in _eos_ids(loaded.model, loaded.tokenizer)  # generation stops at the family's turn end


@pytest.mark.parametrize("family", ["gemma2", "phi3", "mistral", "qwen2"])
def test_tokenizer_without_template_gets_its_family_not_smollm(family: str, tmp_path: Path) -> None:
    path = make_tiny_family_model(tmp_path / family, family, with_template=False)
    loaded = load_model(str(path), device="cpu")
    text = loaded.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hi"}],
                                                tokenize=False, add_generation_prompt=True)
    assert "SmolLM" not in text and "Be brief." in text
    if family != "qwen2":
        assert "<|im_" not in text
    marker = {"gemma2": "<start_of_turn>model\n", "phi3": "<|assistant|>\n", "mistral": "[/INST]",
              "qwen2": "<|im_start|>assistant\n"}[family]
    assert text.endswith(marker)


def test_default_model_fallback_alone_has_smollm_line(tmp_path: Path) -> None:
    path = make_tiny_family_model(tmp_path / "m", "qwen2", with_template=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = None
    assert prepare_tokenizer(tok, default_model=True).chat_template == CHATML_TEMPLATE
    tok.chat_template = None
    assert "SmolLM" not in prepare_tokenizer(tok).chat_template
    assert family_template(tok) != CHATML_TEMPLATE


def _served_greedy(loaded, prompt_ids: list[int], n: int) -> list[int]:
    engine = Engine(loaded, max_batch=2, fast=False, calibrate=False, threads=1)
    engine.start()
    try:
        async def run() -> str:
            out = ""
            async for delta in engine.generate(loaded.name, prompt_ids, SamplingParams(max_tokens=n, temperature=0)):
                out += delta.text
            return out

        return asyncio.run(run())
    finally:
        engine.close()


@pytest.mark.parametrize("family", ALL)
def test_served_greedy_equals_hf_generate(family: str, family_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(family_dirs[family]), device="cpu")
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "The capital of France is"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eos = sorted(_eos_ids(loaded.model, tok))
    with torch.no_grad():
        ref = loaded.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                    pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    ref = [t for t in ref if t not in eos]
    assert _served_greedy(loaded, ids, 12) == tok.decode(ref, skip_special_tokens=True)


MEMORISE = [{"messages": [{"role": "user", "content": f"Capital number {i}?"},
                          {"role": "assistant", "content": ["Paris", "Tokyo", "Oslo", "Lima"][i % 4]}]}
            for i in range(8)]


@pytest.mark.parametrize("family", ALL)
def test_lora_lowers_loss_and_merged_equals_adapter(family: str, family_dirs: dict[str, Path],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    monkeypatch.setenv("GRIDTUNE_TRAIN_THREADS", "1")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in MEMORISE))
    loaded = load_model(str(family_dirs[family]), device="cpu")
    expected = {"phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]}.get(
        family, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert lora_targets(loaded.model) == expected
    examples = tokenize_file(loaded.tokenizer, train).examples
    before = evaluate(loaded.model, examples, "cpu", 2048)
    spec = JobSpec(id="ftjob-fam", base_model=str(family_dirs[family]), training_file=train, n_epochs=6,
                   batch_size=4, learning_rate_multiplier=5, seed=3, device="cpu")
    result = run_job(spec, tmp_path / "job", loaded=loaded)
    config = json.loads((result.result_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == expected

    base = load_model(str(family_dirs[family]), device="cpu").model
    adapted = PeftModel.from_pretrained(base, str(result.result_dir)).eval()
    after = evaluate(adapted, examples, "cpu", 2048)
    assert after < before - 0.3, (family, before, after)  # the memorisation set's loss, base vs tuned
    ids = torch.tensor([loaded.tokenizer("Capital number 2?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        with_adapter = adapted(ids).logits
        merged = adapted.merge_and_unload()(ids).logits
    assert torch.allclose(with_adapter, merged, atol=1e-4)


def test_model_listing_says_the_decode_path(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    import httpx

    from tests.server_support import InProcessServer

    with InProcessServer(family_dirs["phi3"], tmp_path / "data") as server:
        assert server.state.engine.wait_ready(60)
        listing = httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]
    paths = {m["id"]: m["gridtune"]["decode_path"] for m in listing}
    assert paths[server.model] in ("fast", "transformers")
    assert paths[server.model] == ("fast" if server.state.engine._served[server.model].fast is not None
                                   else "transformers")


def _on_the_q4_grid(model) -> None:
    """Round every weight matrix to what the native kernels hold (Q4_1 blocks, the head's
    Q8_0), so that comparing them with fp32 measures their arithmetic, not the rounding."""
    from gridtune.server import cpukernel

    for name, p in model.named_parameters():
        if p.dim() == 2:
            if "embed" in name or "lm_head" in name:
                p.data = cpukernel.q8_0_values(cpukernel.q8_0_blocks(p.data))
            else:
                p.data = cpukernel.q4_1_values(cpukernel.q4_1_blocks(p.data))


@pytest.mark.parametrize("family", ALL)
def test_fast_path_covers_its_families_token_for_token(family: str, family_dirs: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family runs on the fast decoder: its exact mode gives HF generate's greedy
    tokens over a prompt longer than the sliding windows, and the native kernels this CPU
    runs stay within a few percent of fp32 with the family's parts (biases, q/k norms,
    Gemma's norms, GELU, soft-capping, windows, per-layer RoPE bases) in them."""
    from gridtune.server import fastlm

    loaded = load_model(str(family_dirs[family]), device="cpu")
    assert fastlm.supports(loaded.model)
    gen = torch.Generator().manual_seed(1)
    for p in loaded.model.parameters():  # biases and norms start at 0 or 1: make them count
        if p.dim() == 1:
            p.data = p.data + 0.5 * torch.randn(p.shape, generator=gen)
    if family == "gemma2":  # scores large enough for the soft-capping to change them
        for layer in loaded.model.model.layers:
            layer.self_attn.q_proj.weight.data *= 300
    _on_the_q4_grid(loaded.model)
    ids = loaded.tokenizer("The capital of France is Paris and the capital of Spain is Madrid, " * 6,
                           add_special_tokens=False)["input_ids"]
    assert len(ids) > 64 * 2  # past the tiny models' 64-position windows
    with torch.inference_mode():
        ref = loaded.model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)[0, len(ids):].tolist()
        exact = fastlm.FastLlama(loaded.model, slots=1, dtype=torch.float32)
        out = [int(exact.prefill(0, ids).argmax())]
        while len(out) < 24:
            pos = len(ids) + len(out) - 1
            out.append(int(exact.decode(torch.tensor([out[-1]]), torch.tensor([pos]), pos + 1)[0].argmax()))
        assert out == ref
        monkeypatch.delenv("GRIDTUNE_DTYPE", raising=False)  # the suite pins the exact mode
        fast = fastlm.FastLlama(loaded.model, slots=1)  # the plan for this CPU: native kernels on x86 with cc
        assert not fast.plan.exact
        exact2 = fastlm.FastLlama(loaded.model, slots=1, dtype=torch.float32)
        pairs = [(exact2.prefill(0, ids), fast.prefill(0, ids))]
        step = (torch.tensor([ids[-1]]), torch.tensor([len(ids)]), len(ids) + 1)
        pairs.append((exact2.decode(*step)[0], fast.decode(*step)[0]))
    for full, low in pairs:
        # measured 0.007-0.025; any one family part left out of the native kernel: 0.09-1.3
        assert float((full - low).norm() / full.norm()) < 0.06
