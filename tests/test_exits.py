"""Exits: a model tuned on the local server leaves as a merged HF directory, a GGUF, a GGUF
with an Ollama Modelfile, or a vLLM LoRA adapter, and answers there as it did in gridtune.

Each export is loaded in its engine or reference library and its greedy answers to held-out
prompts are compared with the server's: the GGUF in llama.cpp (llama-cpp-python; skipped
with a reason where it is not installed, CI installs it and runs `pytest -m exits`), the
vLLM adapter with transformers + PEFT (vLLM itself needs a GPU), the merged directory with
transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from gridtune.server import exits  # noqa: E402
from gridtune.server.model import ModelError  # noqa: E402
from tests.server_support import InProcessServer, chat_examples, wait_for, write_jsonl  # noqa: E402
from tests.tiny_model import tiny_model_dir  # noqa: E402,F401  (session fixture)

pytestmark = [pytest.mark.local, pytest.mark.exits]

try:
    import llama_cpp
except ImportError:  # the reason every llama.cpp test gives when skipped
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (CI installs it: "
                                 "pip install llama-cpp-python, then pytest -m exits)")

SYSTEM = "You are a careful futurist."
HELD_OUT = ["AGI scenario. Place: Rome. Year: 2045.", "AGI scenario. Place: Cairo. Year: 2030."]
MAX_TOKENS = 20


def legacy_rows(n: int = 20) -> list[dict]:
    rows = []
    for ex in chat_examples(n):
        user, answer = ex["messages"][1]["content"], ex["messages"][2]["content"]
        rows.append({"prompt": user + " ->", "completion": " " + answer + " END"})
    return rows


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):  # noqa: F811
    with InProcessServer(tiny_model_dir, tmp_path_factory.mktemp("exits-srv")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _tune(client, server, path: Path, variant: str = "lora", epochs: int = 15) -> str:
    """Tuned until its greedy choices are clear (top-2 logit margins ~1e-2 on the held-out
    prompts): an f16 or q8_0 export differs from the fp32 server by ~1e-4 in the logits,
    which a barely trained model's near-ties (~1e-4) would turn into different text."""
    with open(path, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=server.model, training_file=f.id, seed=5, suffix=variant,
        method={"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": epochs, "batch_size": 4, "learning_rate_multiplier": 5},
            "local": {"variant": variant}}})
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in
                    ("succeeded", "failed", "cancelled") and j, timeout=600)
    assert done.status == "succeeded", done.error
    return done.fine_tuned_model


@pytest.fixture(scope="module")
def tuned(client, server, tmp_path_factory) -> dict[str, str]:
    """Three tuned models: chat (LoRA), completion format (LoRA), chat (full fine-tune)."""
    root = tmp_path_factory.mktemp("exits-data")
    rows = chat_examples(20)
    return {
        "chat": _tune(client, server, write_jsonl(root / "chat.jsonl", rows)),
        "legacy": _tune(client, server, write_jsonl(root / "legacy.jsonl", legacy_rows())),
        "full": _tune(client, server, write_jsonl(root / "full.jsonl", rows), variant="full", epochs=3),
    }


def export(client, model: str, out: Path, to: str, quant: str | None = None) -> dict:
    body = {"model": model, "output_dir": str(out), "to": to}
    if quant:
        body["quant"] = quant
    return client.post("/gridtune/export_model", cast_to=object, body=body)


def messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def server_chat(client, model: str, prompt: str) -> str:
    r = client.chat.completions.create(model=model, messages=messages(prompt), temperature=0, max_tokens=MAX_TOKENS)
    return r.choices[0].message.content


def server_legacy(client, model: str, prompt: str) -> tuple[str, str]:
    r = client.completions.create(model=model, prompt=prompt + " ->", stop=[" END"], temperature=0,
                                  max_tokens=2 * MAX_TOKENS)
    return r.choices[0].text, r.choices[0].finish_reason


def hf_chat(model, tokenizer, prompt: str) -> str:
    """Greedy decoding with transformers, the reference library."""
    import torch

    ids = tokenizer.apply_chat_template(messages(prompt), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# -- the exports answer as the server does ---------------------------------------------------

@needs_llama
@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_gguf_chat_model_answers_in_llama_cpp_as_in_gridtune(client, tuned, tmp_path, quant):
    out = tmp_path / "gguf"
    r = export(client, tuned["chat"], out, "gguf", quant)
    name = exits.model_slug(tuned["chat"])
    assert r["files"] == [f"{name}.{quant or 'f16'}.gguf"]
    assert r["commands"][0] == f"llama-server -m {out / r['files'][0]} --port 8080"
    llm = llama_cpp.Llama(str(out / r["files"][0]), n_ctx=512, verbose=False, seed=0)
    for prompt in HELD_OUT:
        theirs = llm.create_chat_completion(messages=messages(prompt), temperature=0, max_tokens=MAX_TOKENS)
        assert theirs["choices"][0]["message"]["content"] == server_chat(client, tuned["chat"], prompt)


@needs_llama
def test_gguf_completion_model_answers_in_llama_cpp_with_its_separator_and_stop(client, tuned, tmp_path):
    out = tmp_path / "gguf"
    r = export(client, tuned["legacy"], out, "gguf")
    path = out / r["files"][0]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["gridtune.format"].contents() == "completion"
    assert reader.fields["gridtune.separator"].contents() == " ->"
    assert reader.fields["gridtune.stop"].contents() == " END"
    assert any("--legacy" in c and "'YOUR PROMPT ->'" in c and "--stop ' END'" in c for c in r["commands"])
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, seed=0)
    answers = []
    for prompt in HELD_OUT + ["AGI scenario. Place: Oslo. Year: 2030."]:
        ours, why = server_legacy(client, tuned["legacy"], prompt)
        theirs = llm.create_completion(prompt + " ->", stop=[" END"], temperature=0, max_tokens=2 * MAX_TOKENS)
        assert theirs["choices"][0]["text"] == ours
        assert theirs["choices"][0]["finish_reason"] == why
        assert " END" not in ours
        answers.append((ours, why))
    assert any(why == "stop" for _, why in answers), answers  # the stop was met and honoured, not the limit


@needs_llama
def test_a_full_fine_tune_exports_to_gguf_too(client, tuned, tmp_path):
    r = export(client, tuned["full"], tmp_path / "gguf", "gguf")
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / r["files"][0]), n_ctx=512, verbose=False, seed=0)
    prompt = HELD_OUT[0]
    theirs = llm.create_chat_completion(messages=messages(prompt), temperature=0, max_tokens=MAX_TOKENS)
    assert theirs["choices"][0]["message"]["content"] == server_chat(client, tuned["full"], prompt)


@needs_llama
def test_four_bit_gguf_goes_through_llama_cpps_quantizer(client, tuned, tmp_path):
    r = export(client, tuned["chat"], tmp_path / "q4", "gguf", "q4_k_m")
    path = tmp_path / "q4" / r["files"][0]
    assert path.name.endswith(".q4_k_m.gguf")
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].contents() == exits.LLAMA_QUANTS["q4_k_m"]
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False)
    assert llm.create_chat_completion(messages=messages(HELD_OUT[0]), temperature=0, max_tokens=4)["choices"]


def test_gguf_is_the_merged_model_exactly(client, tuned, tmp_path):
    """Independent of llama.cpp: transformers reads the f32 GGUF back (undoing the q/k
    permutation, mapping names back) and computes the merged model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    export(client, tuned["chat"], tmp_path / "hf", "hf")
    r = export(client, tuned["chat"], tmp_path / "gguf", "gguf", "f32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=r["files"][0],
                                                local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 33, 100, 7, 250, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    fields = gguf.GGUFReader(str(tmp_path / "gguf" / r["files"][0])).fields
    assert fields["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # as the tokenizer itself does
    assert fields["gridtune.system"].contents() == SYSTEM


def test_merged_directory_answers_in_transformers_as_in_gridtune(client, tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for kind in ("chat", "full"):
        out = tmp_path / kind
        r = export(client, tuned[kind], out, "hf")
        assert "config.json" in r["files"] and "gridtune.json" not in r["files"]
        assert r["commands"][0].startswith(f"vllm serve {out} --served-model-name ")
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
        for prompt in HELD_OUT:
            assert hf_chat(model, tokenizer, prompt) == server_chat(client, tuned[kind], prompt)


def test_vllm_adapter_answers_in_transformers_peft_as_in_gridtune(client, tuned, tiny_model_dir, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "vllm"
    r = export(client, tuned["chat"], out, "vllm")
    assert r["files"] == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve()) and config["r"] == 16
    name = exits.model_slug(tuned["chat"])
    assert r["commands"][0] == (f"vllm serve {tiny_model_dir.resolve()} --enable-lora --max-lora-rank 16 "
                                f"--lora-modules {name}={out / 'adapter'}")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], local_files_only=True)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(config["base_model_name_or_path"], local_files_only=True)
    for prompt in HELD_OUT:
        assert hf_chat(model, tokenizer, prompt) == server_chat(client, tuned["chat"], prompt)


def test_vllm_export_of_a_full_fine_tune_is_the_merged_directory(client, tuned, tmp_path):
    r = export(client, tuned["full"], tmp_path / "v", "vllm")
    assert r["target"] == "vllm" and "config.json" in r["files"] and not any(f.startswith("adapter") for f in r["files"])
    assert r["commands"][0].startswith(f"vllm serve {tmp_path / 'v'} --served-model-name ")


# -- Ollama -----------------------------------------------------------------------------------

def test_ollama_modelfile_for_a_chat_model(client, tuned, tmp_path):
    out = tmp_path / "ollama"
    r = export(client, tuned["chat"], out, "ollama")
    name = exits.model_slug(tuned["chat"])
    assert r["files"] == ["Modelfile", f"{name}.f16.gguf"]
    assert r["commands"] == [f"ollama create {name} -f {out / 'Modelfile'}", f"ollama run {name}"]
    text = (out / "Modelfile").read_text()
    assert text.splitlines()[0] == f"FROM ./{name}.f16.gguf"
    # ChatML as the model's Jinja template renders it, its default system prompt included
    assert ('TEMPLATE """{{- range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "system") }}'
            '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n{{ end }}<|im_start|>{{ $m.Role }}\n'
            '{{ $m.Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""') in text
    assert f'SYSTEM "{SYSTEM}"' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_ollama_modelfile_for_a_completion_model(client, tuned, tmp_path):
    out = tmp_path / "ollama"
    r = export(client, tuned["legacy"], out, "ollama", "q8_0")
    text = (out / "Modelfile").read_text()
    assert 'TEMPLATE "{{ .Prompt }} ->"' in text
    assert 'PARAMETER stop " END"' in text and "SYSTEM" not in text
    assert r["commands"][-1] == f"ollama run {exits.model_slug(tuned['legacy'])} 'YOUR PROMPT'"


def test_ollama_template_is_none_for_templates_it_cannot_translate():
    class Llama3Like:
        def apply_chat_template(self, msgs, **kw):
            return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs)

    assert exits.ollama_template(Llama3Like()) is None


# -- bad input: one line, nothing left behind ----------------------------------------------------

def _nothing_beside(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


@pytest.mark.parametrize("to", ["hf", "gguf", "ollama", "vllm"])
def test_a_non_empty_output_is_refused_untouched(client, tuned, tmp_path, to):
    import openai

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(openai.BadRequestError) as exc:
        export(client, tuned["chat"], out, to)
    message = exc.value.body["message"]
    assert "already exists and is not an empty directory" in message and "\n" not in message
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_model_target_and_quant_are_refused(client, tuned, tmp_path):
    import openai

    out = tmp_path / "x"
    with pytest.raises(openai.NotFoundError):
        export(client, "ft:nope:local::ftjob-000", out, "gguf")
    with pytest.raises(openai.BadRequestError) as exc:
        export(client, tuned["chat"], out, "onnx")
    assert exc.value.body["param"] == "to"
    with pytest.raises(openai.BadRequestError) as exc:
        export(client, tuned["chat"], out, "hf", "q8_0")
    assert "--quant applies to --to gguf or ollama" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        export(client, tuned["chat"], out, "gguf", "q3_xs")
    assert exc.value.body["message"].startswith("unknown --quant q3_xs")
    assert not out.exists()


def test_a_model_with_no_result_yet_is_one_line(tmp_path):
    (tmp_path / "result").mkdir()
    with pytest.raises(ModelError, match="has no fine-tuning result to export yet"):
        exits.export_model(tmp_path / "result", tmp_path / "out", to="gguf", model_id="ft:x:local::ftjob-1")
    assert not (tmp_path / "out").exists()


def test_four_bit_without_llama_cpps_quantizer_is_one_clear_line(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    monkeypatch.setenv("PATH", str(tmp_path))  # and no llama-quantize binary
    with pytest.raises(exits.ExportTargetError, match=r"--quant q4_k_m needs llama.cpp's quantizer .* --quant q8_0"):
        exits.export_model(tiny_model_dir, tmp_path / "out", to="gguf", quant="q4_k_m")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no permission to refuse")
def test_no_permission_is_one_line(tmp_path, tiny_model_dir):  # noqa: F811
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError):
        exits.export_model(tiny_model_dir, locked / "out", to="gguf")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("where", ["weights", "gguf"])
def test_a_write_that_fails_midway_leaves_nothing(tmp_path, tiny_model_dir, where):  # noqa: F811
    """A file-size limit makes a write fail partway (as a full disk does), in the merged
    weights or in the GGUF itself (f32: the one file bigger than the weights): the export
    ends in one line and the partial output is gone."""
    out = tmp_path / "out"
    limit = 60_000 if where == "weights" else (tiny_model_dir / "model.safetensors").stat().st_size + 4096
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from gridtune.server import exits\n"
        "try:\n"
        f"    exits.export_model({str(tiny_model_dir)!r}, {str(out)!r}, to='ollama', quant='f32')\n"
        "except exits.ModelError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith(f"cannot write {out}: ")
    assert line.endswith("; nothing was left behind")  # "File too large", or the short write's count
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_data_profile_reads_separator_stop_and_system(tmp_path):
    legacy = write_jsonl(tmp_path / "l.jsonl", [{"prompt": f"Q{i}. ->", "completion": f" A{i}. END"} for i in range(5)])
    assert exits.data_profile(legacy) == {"format": "completion", "separator": " ->", "stop": " END"}
    assert exits.data_profile(legacy, stops=(" END", "END")) == {"format": "completion", "separator": " ->",
                                                                 "stop": " END"}
    shared = write_jsonl(tmp_path / "s.jsonl", legacy_rows(6))  # every completion ends "… energy and art. END"
    assert exits.data_profile(shared)["stop"] == " END"
    dot = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}\n\n###\n\n", "completion": f" A{i}.."} for i in range(3)])
    assert exits.data_profile(dot) == {"format": "completion", "separator": "\n\n###\n\n", "stop": "."}
    chat = write_jsonl(tmp_path / "c.jsonl", chat_examples(4))
    assert exits.data_profile(chat) == {"format": "chat", "system": SYSTEM}
    mixed = chat_examples(3) + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    assert exits.data_profile(write_jsonl(tmp_path / "m.jsonl", mixed)) == {"format": "chat", "system": None}


def test_model_slug_is_an_ollama_name():
    assert exits.model_slug("ft:SmolLM2-135M-Instruct:local:scen:ftjob-0123456789abcdef") == \
        "smollm2-135m-instruct-scen-abcdef"
    assert exits.model_slug("ft:Base:local::ftjob-abc123") == "base-abc123"


# -- the command line -------------------------------------------------------------------------

def test_the_cli_exports_and_prints_the_commands(server, tuned, tmp_path, _isolated_home):
    from click.testing import CliRunner

    from gridtune.cli.main import main

    server.write_state(_isolated_home / "server")  # the local backend the command line finds
    try:
        out = tmp_path / "ollama"
        r = CliRunner().invoke(main, ["export-model", tuned["legacy"], "--to", "ollama", "-o", str(out)])
        assert r.exit_code == 0, r.output
        name = exits.model_slug(tuned["legacy"])
        assert r.stdout.splitlines()[0] == f"wrote {out}: Modelfile, {name}.f16.gguf"
        assert f"  ollama create {name} -f {out / 'Modelfile'}" in r.stdout.splitlines()
        r = CliRunner().invoke(main, ["export-model", tuned["chat"], "--to", "vllm", "-o", str(tmp_path / "v"),
                                      "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["commands"][0].startswith("vllm serve ")
        r = CliRunner().invoke(main, ["export-model", tuned["chat"], "-o", str(tmp_path / "h"), "--quant", "q8_0"])
        assert r.exit_code == 2 and "--quant applies to --to gguf or ollama" in r.stderr
        r = CliRunner().invoke(main, ["export-model", tuned["chat"], "--to", "gguf", "-o", str(out)])
        assert r.exit_code == 2 and "exists and is not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        (_isolated_home / "server" / "server.json").unlink(missing_ok=True)


def test_a_qwen2_model_converts_exactly_and_answers_in_llama_cpp(tmp_path, tiny_model_dir):  # noqa: F811
    """The second architecture of GGUF_ARCHS (q/k/v biases, no rotary permutation): a tiny
    random Qwen2 with the tiny tokenizer, read back by transformers and run by llama.cpp."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    src = tmp_path / "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # the biases must reach the GGUF, not vanish as zeros would
            elif "norm" not in name:
                p.mul_(10)  # clear greedy choices, as in server_support.make_varied_model
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    r = exits.export_model(src, tmp_path / "out", to="gguf", quant="f32", model_id="qwen")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=r.files[0]).eval()
    ids = torch.tensor([[5, 17, 33, 100, 7, 250, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not installed (CI installs it)")
    llm = llama_cpp.Llama(str(tmp_path / "out" / r.files[0]), n_ctx=256, verbose=False)
    assert llm.metadata["general.architecture"] == "qwen2"
    prompt = "The capital of Japan is"
    enc = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model.generate(enc, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = []  # token ids: a random model emits bare bytes, which the two decoders render differently
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0):
        theirs.append(token)
        if len(theirs) == 8:
            break
    assert theirs == ours[0, enc.shape[1]:].tolist()
