"""The fast decode path gives the tokens the transformers path gives.

Speed work must not silently change what the model writes: greedy decoding on the
fast path (fp32) is held to the reference HF path token for token, for a batch of
prompts of different lengths whose rows finish at different steps (slot moves), for
a merged LoRA adapter against PEFT's own forward, and bf16 stays close to fp32.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gridtune.server.engine import Engine, SamplingParams  # noqa: E402
from gridtune.server.model import load_model  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

PROMPTS = [
    "The capital of France is",
    "Write a detailed scenario about artificial general intelligence being reached in Lagos in 2035.",
    "Count: one two",
    "You are a careful futurist. Answer briefly and clearly. What is the answer?",
    "hello",
]


def _engine(loaded, *, fast: bool, dtype=None) -> Engine:
    return Engine(loaded, max_batch=4, fast=fast, dtype=dtype, calibrate=False, threads=1)


async def _greedy(engine: Engine, model_id: str, max_tokens: list[int]) -> list[tuple[list[int], str]]:
    tok = engine.tokenizer_for(model_id)

    async def one(prompt: str, n: int):
        ids = engine.text_prompt(model_id, prompt)
        parts, reason = [], None
        async for delta in engine.generate(model_id, ids, SamplingParams(max_tokens=n, temperature=0.0)):
            parts.append(delta.text)
            reason = delta.finish_reason or reason
        return tok("".join(parts), add_special_tokens=False)["input_ids"], reason

    # Five prompts on four slots with different budgets: rows join late and leave early.
    return list(await asyncio.gather(*[one(p, n) for p, n in zip(PROMPTS, max_tokens)]))


def _run(engine: Engine, model_id: str, max_tokens: list[int]):
    engine.start()
    try:
        return asyncio.run(_greedy(engine, model_id, max_tokens))
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_fast_path_greedy_tokens_equal_the_reference(tiny):
    budgets = [12, 30, 5, 21, 17]
    fast = _engine(tiny, fast=True, dtype=torch.float32)
    got = _run(fast, tiny.name, budgets)
    assert fast.stats()["decoder"] == "fast"
    ref_engine = _engine(tiny, fast=False)
    ref = _run(ref_engine, tiny.name, budgets)
    assert ref_engine.stats()["decoder"] == "transformers"
    assert got == ref
    assert sum(len(t) for t, _ in got) > 40  # real decoding happened, not an empty match


def test_fast_path_matches_generate_step_by_step(tiny):
    """Same greedy tokens as transformers' own generate for one prompt, 40 steps."""
    from gridtune.server.fastlm import FastLlama

    ids = tiny.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        ref = tiny.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                  min_new_tokens=40)[0, len(ids):].tolist()
        lm = FastLlama(tiny.model, slots=2, dtype=torch.float32, capacity=16)  # grows past 16 on the way
        out = [int(lm.prefill(1, ids).argmax())]
        lm.move(1, 0, len(ids))  # decode from slot 0 after a slot move
        pos = len(ids)
        while len(out) < 40:
            logits = lm.decode(torch.tensor([out[-1]]), torch.tensor([pos]), pos + 1)
            out.append(int(logits[0].argmax()))
            pos += 1
    assert out == ref


@pytest.mark.parametrize("lowbit", [False, True])
def test_bf16_logits_stay_close_to_fp32(tiny, lowbit):
    """bf16 weights, and the low-bit (int4, else int8) copies used for 1-2 row steps,
    stay close to fp32 in prefill (its last-row logits are a 1-row matmul) and in a
    1-row decode step."""
    from gridtune.server.fastlm import FastLlama, small_kernel

    if lowbit and small_kernel(torch.bfloat16, "cpu") is None:
        pytest.skip("torch's low-bit weight-only matmuls are not available here")
    ids = tiny.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        exact = FastLlama(tiny.model, slots=1, dtype=torch.float32)
        approx = FastLlama(tiny.model, slots=1, dtype=torch.bfloat16, lowbit=lowbit)
        assert (approx.small is not None) is lowbit
        if lowbit:
            assert approx.small in ("int4", "int8") and approx.layers[0].qkv.mode == approx.small
        pairs = [(exact.prefill(0, ids), approx.prefill(0, ids))]
        step = (torch.tensor([ids[-1]]), torch.tensor([len(ids)]), len(ids) + 1)
        pairs.append((exact.decode(*step)[0], approx.decode(*step)[0]))
    for full, half in pairs:
        assert (torch.softmax(full, -1) - torch.softmax(half, -1)).abs().max() < 0.02


def test_merged_lora_decodes_like_peft(tiny, tmp_path):
    """A tuned model on the fast path (LoRA merged into a copy) = PEFT's unmerged forward."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random B: the adapter really changes the output
    peft_model = get_peft_model(copy.deepcopy(tiny.model), config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    budgets = [10, 10, 10, 10, 10]

    fast = _engine(tiny, fast=True, dtype=torch.float32)
    fast.register_tuned("ft:tiny:test", adapter)
    got = _run(fast, "ft:tiny:test", budgets)
    ref_engine = _engine(copy.copy(tiny), fast=False)
    ref_engine.base.model = copy.deepcopy(tiny.model)  # PEFT wraps (mutates) the base it is given
    ref_engine._served[ref_engine.base_id].module = ref_engine.base.model
    ref_engine.register_tuned("ft:tiny:test", adapter)
    ref = _run(ref_engine, "ft:tiny:test", budgets)
    base = _run(_engine(tiny, fast=True, dtype=torch.float32), tiny.name, budgets)
    assert got == ref
    assert got != base  # the adapter is really applied


def test_a_cancelled_request_leaves_the_batch_within_a_step(tiny):
    engine = _engine(tiny, fast=True, dtype=torch.float32)
    engine.start()
    assert engine.wait_ready(60)
    engine._served[tiny.name].eos = set()  # a random model may end a row early; this one must run on

    async def scenario():
        ids = engine.text_prompt(tiny.name, PROMPTS[0])
        gen = engine.generate(tiny.name, ids, SamplingParams(max_tokens=4000, temperature=1.0))
        await gen.__anext__()
        for _ in range(200):
            if engine.stats()["decoding"] == 1:
                break
            await asyncio.sleep(0.005)
        assert engine.stats()["decoding"] == 1
        before = engine.generated_tokens
        await gen.aclose()  # the client went away
        for _ in range(400):
            if engine.stats()["decoding"] == 0 and engine.load == 0:
                break
            await asyncio.sleep(0.005)
        return engine.stats(), engine.generated_tokens - before

    try:
        stats, after = asyncio.run(scenario())
    finally:
        engine.close()
    assert stats["decoding"] == 0 and stats["in_flight"] == 0
    assert after <= 2  # at most the step already under way when it was cancelled


def test_kv_memory_budget_shrinks_the_batch_not_the_answers(tiny):
    """With room in the KV budget for one row only, requests decode one after another
    (never two rows at once) and every one still finishes, with the same tokens."""
    budgets = [12, 30, 5, 21, 17]
    roomy = _engine(tiny, fast=True, dtype=torch.float32)
    expected = _run(roomy, tiny.name, budgets)
    tight = _engine(tiny, fast=True, dtype=torch.float32)
    tight.kv_budget = 1  # byte: only the "an empty batch takes one row" rule admits anything
    peak = []

    from gridtune.server import engine as engine_mod

    step = engine_mod._FastBatch.step

    def spy(self):
        peak.append(len(self.rows))
        return step(self)

    engine_mod._FastBatch.step = spy
    try:
        got = _run(tight, tiny.name, budgets)
    finally:
        engine_mod._FastBatch.step = step
    assert got == expected
    assert peak and max(peak) == 1


@pytest.mark.parametrize("max_batch", [1, 2, 5])
def test_the_engine_measures_its_speed_at_start(tiny, max_batch):
    """Calibration fills every slot (memory grows lazily) and reports real figures."""
    engine = Engine(tiny, max_batch=max_batch, fast=True, dtype=torch.float32, threads=1)
    engine.start()
    try:
        assert engine.wait_ready(60)
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["decoder"] == "fast"
    assert stats["stream_tokens_per_s"] > 0 and stats["batch_tokens_per_s"] > 0
    assert stats["prefill_tokens_per_s"] > 0


def test_thread_tuner_keeps_the_count_that_is_faster_now():
    """Quiet machine: every core wins; cores taken by other work: one thread wins; and it
    keeps checking, so it goes back when the machine is quiet again."""
    from gridtune.server.engine import _ThreadTuner

    class Recording(_ThreadTuner):
        def __init__(self, most):
            super().__init__(most)
            self.set_to = []

        def _set(self, threads):
            self.set_to.append(threads)

    tuner = Recording(2)
    cost = {2: 0.004, 1: 0.010}  # seconds a row: quiet machine

    def run(steps):
        for _ in range(steps):
            threads = tuner.set_to[-1] if tuner.set_to else tuner.current
            tuner.after_step(8, cost[threads] * 8)

    run(_ThreadTuner.EVERY * 3)
    assert tuner.current == 2 and 1 in tuner.set_to  # it tried one thread and went back
    cost = {2: 0.030, 1: 0.012}  # another process holds a core
    run(_ThreadTuner.EVERY * 2)
    assert tuner.current == 1
    cost = {2: 0.004, 1: 0.010}  # quiet again
    run(_ThreadTuner.EVERY * 2)
    assert tuner.current == 2 and tuner.switches == 2
    assert Recording(1).most == 1  # one core: nothing to choose
