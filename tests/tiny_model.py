"""A tiny random Llama model with a real offline tokenizer, for fast tests of the local server.

``make_tiny_model(path)`` writes a Hugging Face model directory in about a second:
a byte-level BPE tokenizer trained in-process on a small built-in corpus (so any text
encodes, no hub), SmolLM2's ChatML chat template and special tokens, and a 2-layer
LlamaForCausalLM with random weights. ``load_model(str(path))`` loads it.

conftest.py imports the session fixture ``tiny_model_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Same shape as SmolLM2-Instruct's template, with its default system prompt shortened.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Norway is Oslo.
Write a detailed scenario about artificial general intelligence being reached in Lagos in 2035.
It affects healthcare, education, energy, finance, employment, privacy, art and warfare.
You are a helpful assistant. You are a careful futurist. Answer briefly and clearly.
system user assistant hello world yes no maybe please thank you
What is the answer? The answer is 42. Count: one two three four five six seven eight nine ten.
0 1 2 3 4 5 6 7 8 9 10 100 2030 2040 2050 ### END -> : ; , . ! ? ( ) [ ] { } " ' \n
"""


def _train_tokenizer(vocab_size: int, specials: list[str] | None = None, roles: dict[str, str] | None = None,
                     template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials or SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    roles = roles or {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                      "pad_token": "<|endoftext|>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=specials or SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
        **roles,
    )
    if template:
        fast.chat_template = template
    return fast


def make_tiny_model(path: Path, *, vocab_size: int = 512, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM plus tokenizer to ``path`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory shared by the whole test session (treat it as read-only)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


# -- one tiny random model per family, each with its own turn markers and chat template -----

_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CHATML_ROLES = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}
# family -> (config class, model class, special tokens, their roles, chat template, config extras)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SPECIAL_TOKENS, None, CHAT_TEMPLATE, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SPECIAL_TOKENS, _CHATML_ROLES, _CHATML_TEMPLATE, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", SPECIAL_TOKENS, _CHATML_ROLES, _CHATML_TEMPLATE, {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
               {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<pad>", "pad_token": "<pad>"},
               _GEMMA_TEMPLATE, {"head_dim": 16, "sliding_window": 64, "attn_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
               {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<pad>", "pad_token": "<pad>"},
               _GEMMA_TEMPLATE, {"head_dim": 16, "sliding_window": 64,
                                 "layer_types": ["sliding_attention", "full_attention"],
                                 "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                     "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
                _MISTRAL_TEMPLATE, {"sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"],
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}, _PHI3_TEMPLATE, {}),
}


def make_tiny_family_model(path: Path, family: str, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                           with_template: bool = True) -> Path:
    """A tiny random model of ``family`` (a key of FAMILIES) with a tokenizer that has that
    family's turn markers and (``with_template``) its chat template, written to ``path``."""
    import torch
    import transformers

    config_name, model_name, specials, roles, template, extra = FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(512, specials, roles, template if with_template else None)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
