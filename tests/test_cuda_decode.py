"""The CUDA-graph decoder (server/cuda_decode.py) decodes what the fast path decodes.

Graphs need a GPU, but what they replay does not: the batch padded up to a bucket and
the attention length rounded up, through static buffers. On a CPU that step runs
eagerly (``graphs=False``) and is held here to the plain decode, logits and greedy
tokens, through the engine with rows joining late and leaving early. Where CUDA is
present, the captured graphs are held to eager decoding too.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gridtune.server.cuda_decode import GraphedDecoder, batch_buckets, bucket, wrap  # noqa: E402
from gridtune.server.engine import Engine, SamplingParams  # noqa: E402
from gridtune.server.fastlm import FastLlama  # noqa: E402
from gridtune.server.model import load_model  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

PROMPTS = ["The capital of France is", "Count: one two", "hello",
           "Write a detailed scenario about artificial general intelligence being reached in Lagos in 2035.",
           "You are a careful futurist."]


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert [bucket(n, batch_buckets(6)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def _fill(lm, tokenizer, rows: int) -> list[int]:
    lengths = []
    for slot in range(rows):
        ids = tokenizer(PROMPTS[slot % len(PROMPTS)], add_special_tokens=False)["input_ids"]
        lm.prefill(slot, ids)
        lengths.append(len(ids))
    return lengths


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_padded_bucketed_step_equals_plain_decode(tiny_model_dir, rows):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    with torch.inference_mode():
        plain = FastLlama(loaded.model, slots=6, dtype=torch.float32, device="cpu")
        padded = GraphedDecoder(FastLlama(loaded.model, slots=6, dtype=torch.float32, device="cpu"), graphs=False)
        lengths = _fill(plain, loaded.tokenizer, rows)
        _fill(padded, loaded.tokenizer, rows)
        tokens = torch.tensor([7 + r for r in range(rows)])
        positions = torch.tensor(lengths)
        for step in range(20):
            want = plain.decode(tokens, positions, int(positions.max()) + 1)
            got = padded.decode(tokens, positions, int(positions.max()) + 1)
            assert got.shape == want.shape == (rows, loaded.model.config.vocab_size)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), step
            tokens, positions = want.argmax(-1), positions + 1
    assert padded.capacity >= 256  # the length bucket grew the wrapped cache, as ensure does


def _greedy(engine: Engine, model_id: str, budgets: list[int]) -> list[str]:
    async def one(prompt: str, n: int) -> str:
        ids = engine.text_prompt(model_id, prompt)
        params = SamplingParams(max_tokens=n, temperature=0.0)
        return "".join([d.text async for d in engine.generate(model_id, ids, params)])

    async def everything():
        return await asyncio.gather(*[one(p, n) for p, n in zip(PROMPTS, budgets, strict=True)])

    return asyncio.run(everything())


def test_engine_through_the_padded_step_gives_the_same_text(tiny_model_dir):
    """Five requests on four slots, different budgets: batches of 4, 3, 2, 1 rows, padded to 4, 4, 2, 1."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    budgets = [12, 30, 5, 21, 17]
    results = []
    for graphed in (False, True):
        engine = Engine(loaded, max_batch=4, fast=True, dtype=torch.float32, calibrate=False, threads=1)
        engine.start()
        try:
            assert engine.wait_ready(60)
            served = engine._served[loaded.name]
            assert wrap(served.fast) is served.fast  # on a CPU the engine keeps the plain FastLlama
            if graphed:
                served.fast = GraphedDecoder(served.fast, graphs=False)
            results.append(_greedy(engine, loaded.name, budgets))
        finally:
            engine.close()
    assert results[0] == results[1]
    assert sum(len(t) for t in results[0]) > 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_replay_what_eager_decoding_computes(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cuda")
    with torch.inference_mode():
        eager = GraphedDecoder(FastLlama(loaded.model, slots=8, dtype=torch.float32, device="cuda"), graphs=False)
        graphed = wrap(FastLlama(loaded.model, slots=8, dtype=torch.float32, device="cuda"))
        assert isinstance(graphed, GraphedDecoder) and graphed.graphs
        for rows in (1, 5, 8):
            lengths = _fill(eager, loaded.tokenizer, rows)
            _fill(graphed, loaded.tokenizer, rows)
            tokens = torch.tensor([7 + r for r in range(rows)], device="cuda")
            positions = torch.tensor(lengths, device="cuda")
            for _ in range(300):  # crosses a length bucket: re-capture at the new length
                want = eager.decode(tokens, positions, int(positions.max()) + 1)
                got = graphed.decode(tokens, positions, int(positions.max()) + 1)
                assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)
                tokens, positions = want.argmax(-1), positions + 1
        assert graphed.captures >= 4
