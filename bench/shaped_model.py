"""A model with a real model's shape and random weights, as a Q4_1 GGUF, for speed benches.

Why: decode speed depends on a model's shape (layers, widths, heads, vocabulary) and
the kernels, not on its weights' values. No second family's real weights can be fetched
here (no Hub access; no such wheel on the registry), so bench/serve.py measures a second
family on one of these instead:

    python bench/shaped_model.py --like qwen2.5-0.5b -o /tmp/qwen-shaped
    python bench/serve.py --model /tmp/qwen-shaped/qwen2.5-0.5b-shaped.Q4_1.gguf --no-train

The tokenizer is the default model's (SmolLM2: a byte-level BPE llama.cpp knows), padded
to the shape's vocabulary; the weights are the family's own random initialisation. Both
engines then read the same Q4_1 blocks (llama.cpp's quantizer writes them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # Qwen/Qwen2.5-0.5B-Instruct's config.json
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    # Qwen/Qwen3-0.6B's config.json
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("-o", "--out", type=Path, required=True, help="a directory for the HF model and the GGUF")
    args = parser.parse_args()

    import torch
    import transformers

    from gridtune.server import exits
    from gridtune.server.model import ensure_default_model

    config_name, model_name, shape = SHAPES[args.like]
    hf = args.out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    source = ensure_default_model() / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, hf / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    config = getattr(transformers, config_name)(bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    model.save_pretrained(hf)
    f16 = args.out / f"{args.like}-shaped.f16.gguf"
    exits.write_gguf(hf, f16, quant="f16", name=f"{args.like}-shaped")
    quantize = exits.llama_quantizer()
    if quantize is None:
        raise SystemExit("llama.cpp's quantizer is needed: pip install llama-cpp-python")
    q4 = args.out / f"{args.like}-shaped.Q4_1.gguf"
    quantize(f16, q4, 3)  # LLAMA_FTYPE_MOSTLY_Q4_1
    f16.unlink()
    print(q4)


if __name__ == "__main__":
    main()
