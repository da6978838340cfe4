"""Training-memory features of server/train.py that a GPU needs, checked where they also
run on a CPU: fp32 LoRA weights over a bf16 base, gradient checkpointing (the same losses,
it only recomputes), the activation estimate that switches it on, and a 4-bit base that is
skipped with a message where bitsandbytes or CUDA is missing."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gridtune.server import train  # noqa: E402
from gridtune.server.model import load_model  # noqa: E402
from tests.test_train import chat_rows, make_job, metrics  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

pytestmark = pytest.mark.local


@pytest.fixture(autouse=True)
def _one_training_thread(monkeypatch):
    monkeypatch.setenv("GRIDTUNE_TRAIN_THREADS", "1")


def _run(job_dir, model_dir, **overrides) -> list[dict]:
    make_job(job_dir, model_dir, chat_rows(12), hyperparameters={"n_epochs": 2, "batch_size": 4}, **overrides)
    spec = train.JobSpec.from_dict(json.loads((job_dir / "job.json").read_text()))
    train.run_job(spec, job_dir)
    return metrics(job_dir)


def test_lora_weights_are_fp32_over_a_bf16_base(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    loaded.model.to(torch.bfloat16)
    spec = train.JobSpec(id="x", base_model=None, training_file=tiny_model_dir / "none.jsonl")
    model = train.build_model(spec, loaded)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, tmp_path):
    plain = _run(tmp_path / "plain", tiny_model_dir)
    ckpt = _run(tmp_path / "ckpt", tiny_model_dir, gradient_checkpointing=True)
    events = (tmp_path / "ckpt" / "events.jsonl").read_text()
    assert "Gradient checkpointing on" in events
    assert len(plain) == len(ckpt) == 6
    for a, b in zip(plain, ckpt, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-5)
        assert a["tokens"] == b["tokens"] > 0 and a["seconds"] > 0


def test_activation_estimate_switches_checkpointing_only_when_needed(tiny_model_dir):
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    assert 5 * 2**30 < train.activation_bytes(smollm2, 8192) < 30 * 2**30  # ~13 GiB for 8192 tokens
    loaded = load_model(str(tiny_model_dir), device="cpu")
    spec = train.JobSpec(id="x", base_model=None, training_file=tiny_model_dir / "none.jsonl")
    assert train.wants_checkpointing(spec, loaded.model, "cpu", 8192) is False  # only CUDA is measured
    spec.gradient_checkpointing = True
    assert train.wants_checkpointing(spec, loaded.model, "cpu", 8192) is True


def test_four_bit_base_is_skipped_cleanly_without_cuda_or_bitsandbytes(tiny_model_dir, tmp_path):
    steps = _run(tmp_path / "q", tiny_model_dir, quantize="4bit")
    assert len(steps) == 6 and steps[-1]["train_loss"] < steps[0]["train_loss"]
    events = (tmp_path / "q" / "events.jsonl").read_text()
    assert "training on the unquantized base" in events or "needs bitsandbytes" in events


def test_loss_without_the_boolean_logits_to_keep_is_the_same(tiny_model_dir, monkeypatch):
    """transformers releases whose models cannot take a boolean ``logits_to_keep`` (5.17 on the
    GPU box) get the decoder's hidden states projected at the kept positions: the same loss."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    examples = [train.tokenize_record(loaded.tokenizer, r) for r in chat_rows(6)]
    batch = train.pack(train.micro_batches(examples, 4096)[0], "cpu")
    with torch.no_grad():
        monkeypatch.setattr(train, "_KEEP_BY_MASK", True)
        own = float(train.packed_loss_sum(loaded.model, batch))
        monkeypatch.setattr(train, "_KEEP_BY_MASK", False)
        explicit = float(train.packed_loss_sum(loaded.model, batch))
    assert explicit == pytest.approx(own, rel=1e-5)
