"""`gridtune eval` on the embedded server: 64 held-out prompts × 2 models, wall time.

The demo project with stand-in completions is exported with ``--hold-out-combos 64``;
then ``gridtune eval`` asks the local default model (SmolLM2-135M) every held-out
prompt once per side — the model against itself, so both sides answer
independently and no fine-tuning is needed for the measurement (a tuned model costs
the same per request). Printed: wall time, answers/s, and the figures.

Baseline, in the same run: the same kind of request sent one at a time with the
openai client (what a plain script does), on the first ``--baseline`` prompts;
answers/s compared.

    python bench/eval.py                 # 64 prompts × 2, then a 16-request baseline
    python bench/eval.py --prompts 16    # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--baseline", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    from gridtune.pipeline.client.request_pool import PoolOptions
    from gridtune.pipeline.client.resolve import local_backend
    from gridtune.pipeline.evaluation import evaluate as ev
    from gridtune.pipeline.spec.project import load_project_spec, open_or_create_demo
    from gridtune.pipeline.training.export import export_project
    from gridtune.pipeline.training.holdout import HoldOut
    from gridtune.store import evaluation as evs

    home = Path(tempfile.mkdtemp(prefix="gridtune-bench-eval-"))
    os.environ["GRIDTUNE_HOME"] = str(home)
    os.environ.pop("OPENAI_API_KEY", None)
    os.environ.pop("OPENAI_BASE_URL", None)
    project = home / "demo.gridtune"
    store = open_or_create_demo(project)
    for item in store.pending_work():  # stand-ins: eval needs an export, not real teacher text
        store.save_done(item.completion_id, text="A short scenario. It has three sentences. It ends here.",
                        model="stand-in", params={}, prompt_tokens=1, completion_tokens=12, latency_s=0.0,
                        finish_reason="stop", attempts=1)
    export_project(store, home / "demo.jsonl", format="chat", hold_out=HoldOut(combos=args.prompts))
    spec = load_project_spec(store)
    cases = evs.cases(store)
    store.close()
    print(f"held-out prompts: {len(cases)}", flush=True)

    t0 = time.monotonic()
    backend = local_backend(start=True)
    model = backend.default_model or "SmolLM2-135M-Instruct"
    print(f"local server ready in {time.monotonic() - t0:.1f}s; model {model}", flush=True)
    info = backend.client().models.list().model_dump()["data"][0].get("gridtune", {})
    concurrency = max(4, int(info.get("max_batch") or 16))

    t0 = time.monotonic()
    report = ev.evaluate(project, ev.EvalOptions(model=model, against=model, samples=1, temperature=0.7,
                                                 max_tokens=args.max_tokens,
                                                 pool=PoolOptions(concurrency=concurrency)))
    wall = time.monotonic() - t0
    answers = 2 * len(cases)
    print(f"eval: {answers} answers ({len(cases)} prompts × 2 sides) in {wall:.1f}s = {answers / wall:.2f} answers/s "
          f"(concurrency {concurrency}, max_tokens {args.max_tokens})", flush=True)
    print(report.summary(), flush=True)

    base_rate = None
    if args.baseline:
        setup = report.setup
        client = backend.client()
        t0 = time.monotonic()
        for case in cases[: args.baseline]:
            req = setup.request(spec, model, case.values)
            client.chat.completions.create(**req.body)
        base_wall = time.monotonic() - t0
        base_rate = args.baseline / base_wall
        print(f"baseline: {args.baseline} requests one at a time (openai client) in {base_wall:.1f}s = "
              f"{base_rate:.2f} answers/s", flush=True)
        print(f"ratio eval/sequential: {answers / wall / base_rate:.2f}x", flush=True)
    print(json.dumps({"prompts": len(cases), "answers": answers, "wall_s": round(wall, 1),
                      "answers_per_s": round(answers / wall, 3),
                      "baseline_answers_per_s": round(base_rate, 3) if base_rate else None}))
    _stop(home)


def _stop(home: Path) -> None:
    import signal

    state = home / "server" / "server.json"
    try:
        pid = int(json.loads(state.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError, ProcessLookupError):
        pass


if __name__ == "__main__":
    main()
