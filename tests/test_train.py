"""Local fine-tuning on the tiny model: the worker process, events, checkpoints, cancel,
resume, loss masks, and loading/exporting the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gridtune.server import train  # noqa: E402
from gridtune.server.merge import export_merged, load_tuned  # noqa: E402
from gridtune.server.model import load_model  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

pytestmark = pytest.mark.local
torch.set_num_threads(1)
CITIES = ["Oslo", "Lima", "Tokyo", "Lagos"]


@pytest.fixture(autouse=True)
def _one_training_thread(monkeypatch):
    monkeypatch.setenv("GRIDTUNE_TRAIN_THREADS", "1")  # run_job in-process sets torch's threads


def chat_rows(n: int = 20) -> list[dict]:
    return [
        {"messages": [
            {"role": "system", "content": "Answer with the city."},
            {"role": "user", "content": f"Where is case {i}?"},
            {"role": "assistant", "content": f"The answer is {CITIES[i % 4]}."},
        ]}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(job_dir: Path, model_dir: Path, rows: list[dict], **overrides) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "id": "ftjob-test", "base_model": str(model_dir),
        "training_file": str(write_jsonl(job_dir / "train.jsonl", rows)),
        "validation_file": None, "method": "lora",
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 5},
        "seed": 7, "suffix": "test",
    }
    job.update(overrides)
    (job_dir / "job.json").write_text(json.dumps(job))
    return job_dir


def start_worker(job_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, GRIDTUNE_TRAIN_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "gridtune.server.train_worker", str(job_dir), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError("timed out waiting for the worker")
        time.sleep(0.05)


def status(job_dir: Path) -> dict:
    return json.loads((job_dir / "status.json").read_text())


def metrics(job_dir: Path) -> list[dict]:
    return train.iter_metrics(train.read_events(job_dir))


# ------------------------------------------------------------------ a whole job in the worker


@pytest.fixture(scope="module")
def chat_job(tiny_model_dir: Path, tmp_path_factory) -> Path:
    job_dir = tmp_path_factory.mktemp("jobs") / "chat"
    rows = chat_rows()
    make_job(job_dir, tiny_model_dir, rows,
             validation_file=str(write_jsonl(job_dir.parent / "valid.jsonl", chat_rows(4))))
    code, err = finish(start_worker(job_dir))
    assert code == 0, err[-3000:]
    return job_dir


def test_job_succeeds_with_status_and_result(chat_job: Path) -> None:
    st = status(chat_job)
    assert st["status"] == "succeeded" and st["error"] is None
    assert st["trained_tokens"] > 0
    result = Path(st["result_dir"])
    assert result == chat_job / "result"
    assert (result / "adapter_config.json").is_file()
    assert json.loads((result / "gridtune.json").read_text())["method"] == "lora"
    assert not list(chat_job.glob(".*tmp*"))


def test_events_are_openai_shaped_and_loss_goes_down(chat_job: Path) -> None:
    events = train.read_events(chat_job)
    for event in events:
        assert set(event) >= {"id", "created_at", "level", "message", "type", "data"}
        assert event["type"] in ("message", "metrics")
    messages = [e["message"] for e in events if e["type"] == "message"]
    assert messages[0] == "Fine-tuning job started"
    assert "Epoch 1/3 done" in messages and "Epoch 3/3 done" in messages
    assert "New fine-tuned model created" in messages
    data = metrics(chat_job)
    total = 3 * 5  # 20 examples, batch 4, 3 epochs
    assert [d["step"] for d in data] == list(range(1, total + 1))
    assert all(d["total_steps"] == total for d in data)
    assert set(data[0]) == {"step", "total_steps", "train_loss", "valid_loss", "epoch", "tokens_per_s", "tokens",
                            "seconds"}
    assert [d["epoch"] for d in data][::5] == [1, 2, 3]
    first = next(e for e in events if e["type"] == "metrics")
    assert first["message"].startswith("Step 1/15: training loss=")
    # validation is evaluated every few steps and at every epoch end
    assert all(data[k]["valid_loss"] is not None for k in (4, 9, 14))
    assert "validation loss=" in [e for e in events if e["type"] == "metrics"][4]["message"]
    assert data[-1]["train_loss"] < data[0]["train_loss"] - 0.5
    assert data[-1]["valid_loss"] < data[4]["valid_loss"]


def test_checkpoint_per_epoch(chat_job: Path) -> None:
    for epoch in (1, 2, 3):
        ckpt = chat_job / "checkpoints" / f"epoch-{epoch}"
        state = json.loads((ckpt / "state.json").read_text())
        assert state["epoch"] == epoch and state["step"] == 5 * epoch
        assert (ckpt / "adapter" / "adapter_config.json").is_file()
        assert (ckpt / "training_state.pt").is_file()


def test_result_loads_and_generates_differently_from_base(chat_job: Path, tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    tok = loaded.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "Where is case 3?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        base_logits = loaded.model(**enc).logits
    tuned = load_tuned(loaded, chat_job / "result")
    with torch.no_grad():
        tuned_logits = tuned(**enc).logits
        out = tuned.generate(**enc, max_new_tokens=8, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "answer" in reply  # 20 examples of "The answer is …" were learnt


def test_merged_export_matches_adapter_logits(chat_job: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = export_merged(str(tiny_model_dir), chat_job / "result", tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    loaded = load_model(str(tiny_model_dir), device="cpu")
    tuned = load_tuned(loaded, chat_job / "result")
    ids = torch.tensor([loaded.tokenizer("The answer is Oslo.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    # base=None takes the base recorded in the result
    assert (export_merged(None, chat_job / "result", tmp_path / "merged2") / "config.json").is_file()


# ------------------------------------------------------------------ loss masks


def test_chat_loss_mask_covers_only_assistant_turns(tiny_model_dir: Path) -> None:
    tok = load_model(str(tiny_model_dir)).tokenizer
    record = {"messages": [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "First reply."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "Skipped reply.", "weight": 0},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "Last reply."},
    ]}
    example = train.tokenize_record(tok, record)
    assert len(example.labels) == len(example.input_ids)
    learnt = [i for i, lab in zip(example.input_ids, example.labels) if lab != -100]
    assert all(lab in (-100, i) for i, lab in zip(example.input_ids, example.labels))
    assert tok.decode(learnt) == "First reply.<|im_end|>Last reply.<|im_end|>"
    assert tok.decode(example.input_ids) == tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in record["messages"]], tokenize=False)


def test_legacy_loss_mask_covers_only_completion(tiny_model_dir: Path) -> None:
    tok = load_model(str(tiny_model_dir)).tokenizer
    example = train.tokenize_record(tok, {"prompt": "Capital of France ->", "completion": " Paris ###"})
    n_prompt = len(tok("Capital of France ->", add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [-100] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert tok.decode(example.input_ids[n_prompt:]) == " Paris ###<|im_end|>"


def test_packing_targets_stay_inside_each_example() -> None:
    a = train.Example([1, 2, 3], [-100, 2, 3])
    b = train.Example([4, 5], [-100, 5])
    c = train.Example([6], [-100])
    (rows,) = train.micro_batches([b, c, a], token_budget=100)
    assert rows == [[a], [b, c]]  # rows as long as the longest example, filled first-fit
    batch = train.pack(rows, "cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    # 1 predicts 2, 2 predicts 3, 4 predicts 5; 5 does not predict c's first token
    assert batch["keep"].tolist() == [[True, True, False], [True, False, False]]
    assert batch["targets"].tolist() == [2, 3, 5] and batch["n_tokens"] == 6
    padded = train.pack([[a], [b]], "cpu")  # a short row's tail is a segment of its own
    assert padded["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]] and padded["n_tokens"] == 5
    assert train.micro_batches([a, b, c], token_budget=3) == [[[a]], [[b, c]]]


def test_packed_loss_equals_separate_losses(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    examples = [train.tokenize_record(tok, r) for r in chat_rows(3)]
    examples += [train.tokenize_record(tok, {"prompt": f"Case {i} ->", "completion": " Oslo"}) for i in range(2)]
    (rows,) = train.micro_batches(examples, token_budget=10_000)
    assert len(rows) < len(examples)  # some row holds two examples
    with torch.no_grad():
        packed = float(train.packed_loss_sum(loaded.model, train.pack(rows, "cpu")))
        separate = sum(float(train.packed_loss_sum(loaded.model, train.pack([[e]], "cpu"))) for e in examples)
    assert packed == pytest.approx(separate, rel=1e-4)


def test_truncation_is_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = load_model(str(tiny_model_dir)).tokenizer
    rows = chat_rows(3) + [{"prompt": "x " * 300, "completion": " y"}]
    data = train.tokenize_file(tok, write_jsonl(tmp_path / "t.jsonl", rows), max_length=64)
    assert data.truncated == 1 and data.dropped == 1 and len(data.examples) == 3
    assert max(len(e.input_ids) for e in data.examples) <= 64


# ------------------------------------------------------------------ other data, methods, failures


def test_legacy_prompt_completion_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"Case {i} ->", "completion": f" {CITIES[i % 4]} ###"} for i in range(12)]
    make_job(tmp_path, tiny_model_dir, rows, hyperparameters={"n_epochs": 4, "batch_size": 4,
                                                              "learning_rate_multiplier": 5})
    spec = train.JobSpec.from_dict(json.loads((tmp_path / "job.json").read_text()))
    result = train.run_job(spec, tmp_path)
    assert result.steps == 12 and (result.result_dir / "adapter_config.json").is_file()
    assert result.losses[-1] < result.losses[0]


def test_full_fine_tuning_result_is_a_model_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    make_job(tmp_path, tiny_model_dir, chat_rows(8), method="full",
             hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20})
    spec = train.JobSpec.from_dict(json.loads((tmp_path / "job.json").read_text()))
    result = train.run_job(spec, tmp_path)
    assert (result.result_dir / "config.json").is_file() and (result.result_dir / "tokenizer.json").is_file()
    assert result.losses[-1] < result.losses[0]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-2"]  # only the newest full one
    loaded = load_model(str(tiny_model_dir))
    tuned = load_tuned(loaded, result.result_dir)
    assert tuned is not loaded.model
    out = tuned.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    copied = export_merged(None, result.result_dir, tmp_path / "export")
    assert (copied / "config.json").is_file()


def test_bad_data_fails_with_one_line_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    make_job(tmp_path, tiny_model_dir, [])
    (tmp_path / "train.jsonl").write_text('{"messages": []}\nnot json\n')
    code, _ = finish(start_worker(tmp_path))
    st = status(tmp_path)
    assert code == 1 and st["status"] == "failed"
    assert st["error"] == "train.jsonl line 2: invalid JSON (Expecting value)"
    assert train.read_events(tmp_path)[-1]["level"] == "error"


# ------------------------------------------------------------------ cancel and resume


def test_sigterm_cancels_within_seconds(tiny_model_dir: Path, tmp_path: Path) -> None:
    make_job(tmp_path, tiny_model_dir, chat_rows(), hyperparameters={"n_epochs": 25, "batch_size": 1})
    proc = start_worker(tmp_path)
    wait_for(lambda: len(metrics(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=15)
    assert code == 3, err[-2000:]
    assert status(tmp_path)["status"] == "cancelled"
    assert len(metrics(tmp_path)) < 25 * 20
    assert train.read_events(tmp_path)[-1]["message"] == "Fine-tuning job cancelled"
    assert not (tmp_path / "result").exists()


def test_sigint_interrupts_without_cancelling(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGINT is the server stopping: the job is paused for a resume, and its history does not say "cancelled"."""
    make_job(tmp_path, tiny_model_dir, chat_rows(), hyperparameters={"n_epochs": 25, "batch_size": 1})
    proc = start_worker(tmp_path)
    wait_for(lambda: len(metrics(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc, timeout=15)
    assert code == 3, err[-2000:]
    assert status(tmp_path)["status"] == "interrupted"
    last = train.read_events(tmp_path)[-1]
    assert last["message"].startswith("Training interrupted") and last["level"] == "warn"


def test_resume_after_kill_continues_from_last_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    make_job(tmp_path, tiny_model_dir, chat_rows(), hyperparameters={"n_epochs": 6, "batch_size": 1})
    proc = start_worker(tmp_path)
    wait_for(lambda: (tmp_path / "checkpoints" / "epoch-1").is_dir(), proc)
    proc.kill()  # no chance to clean up, like a server crash
    proc.communicate()
    ckpt = train.last_checkpoint(tmp_path)
    assert ckpt is not None
    done_steps = ckpt[1]["step"]
    before = len(metrics(tmp_path))
    code, err = finish(start_worker(tmp_path, "--resume"))
    assert code == 0, err[-2000:]
    assert status(tmp_path)["status"] == "succeeded"
    resumed = metrics(tmp_path)[before:]
    assert resumed[0]["step"] == done_steps + 1 > 1
    assert resumed[-1]["step"] == 6 * 20
    assert any(e["message"].startswith(f"Fine-tuning job resumed from checkpoint {ckpt[0].name}")
               for e in train.read_events(tmp_path))


def test_resumed_training_matches_uninterrupted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Same data order and optimizer state after a resume: epoch 2's losses are identical."""
    def spec_for(job_dir: Path) -> train.JobSpec:
        make_job(job_dir, tiny_model_dir, chat_rows(8), hyperparameters={"n_epochs": 2, "batch_size": 2})
        return train.JobSpec.from_dict(json.loads((job_dir / "job.json").read_text()))

    straight = train.run_job(spec_for(tmp_path / "a"), tmp_path / "a")
    b = tmp_path / "b"
    spec = spec_for(b)
    with pytest.raises(train.TrainingCancelled):
        train.run_job(spec, b, should_stop=lambda: (b / "checkpoints" / "epoch-1").is_dir())
    resumed = train.run_job(spec, b, resume=True)
    assert len(resumed.losses) == 4  # only epoch 2 ran
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
