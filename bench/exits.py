"""Exits at full size: a model tuned on the local server answers the same in llama.cpp.

The default model (SmolLM2-135M-Instruct, or ``--model PATH``) is LoRA-tuned on the
server (in-process, fp32) on scenario prompts in the chat and the completion format;
each tuned model is exported to GGUF (f16 and q8_0) and loaded in llama.cpp
(llama-cpp-python); held-out prompts (places and years not in the training data) are
answered greedily by both. Printed per format and quantization: how many answers are
identical, the first difference, and the export's time and size.

    python bench/exits.py                     # the default model, both formats
    python bench/exits.py --prompts 4 --format chat
    python bench/exits.py --format chat --prompts 2 --examples 10 --epochs 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GRIDTUNE_DTYPE", "float32")  # the server's reference answers, exact
SYSTEM = "You are a careful futurist."
PLACES = ["Tokyo", "Lagos", "Oslo", "Lima", "Paris", "Quito", "Hanoi", "Perth"]
YEARS = [2030, 2035, 2040, 2050]
HELD_PLACES = ["Rome", "Cairo", "Seoul", "Bergen", "Dakar", "Lyon", "Kyoto", "Denver"]
HELD_YEARS = [2045, 2032, 2060, 2038]


def rows(fmt: str) -> list[dict]:
    out = []
    for i, place in enumerate(PLACES):
        for year in YEARS:
            prompt = f"AGI scenario. Place: {place}. Year: {year}."
            answer = (f"In {year}, {place} reached AGI. Its hospitals changed first; "
                      f"schools followed within {2 + i % 3} years.")
            if fmt == "chat":
                out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}]})
            else:
                out.append({"prompt": prompt + "\n\n###\n\n", "completion": " " + answer + " END"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the default model)")
    parser.add_argument("--format", choices=["chat", "completion", "both"], default="both")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=32, help="training examples per format (at most 32)")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    import llama_cpp

    from tests.server_support import InProcessServer, wait_for, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="gridtune-bench-exits-"))
    os.environ["GRIDTUNE_HOME"] = str(work / "home")
    model_dir = Path(args.model) if args.model else None
    held = [f"AGI scenario. Place: {p}. Year: {y}." for p, y in zip(HELD_PLACES, HELD_YEARS * 2)][:args.prompts]
    formats = ["chat", "completion"] if args.format == "both" else [args.format]
    with InProcessServer(model_dir, work / "srv") as srv, srv.client(timeout=3600) as client:
        print(f"base {srv.model}; {len(held)} held-out prompts, {args.max_tokens} tokens, greedy")
        for fmt in formats:
            with open(write_jsonl(work / f"{fmt}.jsonl", rows(fmt)[:args.examples]), "rb") as fh:
                f = client.files.create(file=fh, purpose="fine-tune")
            t0 = time.perf_counter()
            job = client.fine_tuning.jobs.create(model=srv.model, training_file=f.id, seed=1, suffix=fmt[:4],
                                                 hyperparameters={"n_epochs": args.epochs})
            done = wait_for(lambda j=job: (x := client.fine_tuning.jobs.retrieve(j.id)).status in
                            ("succeeded", "failed", "cancelled") and x, timeout=7200)
            if done.status != "succeeded":
                sys.exit(f"{fmt}: the job {done.status}: {done.error}")
            tuned = done.fine_tuned_model
            print(f"\n{fmt}: tuned {tuned} in {time.perf_counter() - t0:.0f} s")
            ours = []
            for prompt in held:
                if fmt == "chat":
                    r = client.chat.completions.create(
                        model=tuned, temperature=0, max_tokens=args.max_tokens,
                        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
                    ours.append(r.choices[0].message.content)
                else:
                    r = client.completions.create(model=tuned, prompt=prompt + "\n\n###\n\n", stop=[" END"],
                                                  temperature=0, max_tokens=args.max_tokens)
                    ours.append(r.choices[0].text)
            for quant in ("f16", "q8_0"):
                out = work / f"{fmt}-{quant}"
                t0 = time.perf_counter()
                result = client.post("/gridtune/export_model", cast_to=object,
                                     body={"model": tuned, "output_dir": str(out), "to": "gguf", "quant": quant})
                took = time.perf_counter() - t0
                path = out / result["files"][0]
                llm = llama_cpp.Llama(str(path), n_ctx=1024, verbose=False, seed=0)
                same, first = 0, None
                for prompt, mine in zip(held, ours):
                    if fmt == "chat":
                        theirs = llm.create_chat_completion(
                            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                            temperature=0, max_tokens=args.max_tokens)["choices"][0]["message"]["content"]
                    else:
                        theirs = llm.create_completion(prompt + "\n\n###\n\n", stop=[" END"], temperature=0,
                                                       max_tokens=args.max_tokens)["choices"][0]["text"]
                    same += theirs == mine
                    if theirs != mine and first is None:
                        first = (prompt, mine, theirs)
                del llm
                print(f"  gguf {quant}: {same}/{len(held)} answers identical to gridtune's "
                      f"(export {took:.0f} s, {path.stat().st_size / 1e6:.0f} MB)")
                if first:
                    print(f"    first difference, {first[0]!r}:\n      gridtune  {first[1]!r}\n"
                          f"      llama.cpp {first[2]!r}")
            print(f"  e.g. {held[0]!r} -> {ours[0]!r}")
            print(f"  commands: {' | '.join(result['commands'])}")


if __name__ == "__main__":
    main()
