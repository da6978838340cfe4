"""How long a generation run will take on this backend, said before it starts.

The embedded local server (and any ``gridtune serve``, e.g. on a GPU box) says what it
can do on each model object of ``GET /v1/models``::

    "gridtune": {"max_batch": 32, "context_length": 8192, "in_flight": 0, "decoding": 0,
                 "stream_tokens_per_s": 60.0, "batch_tokens_per_s": 230.0, "generated_tokens": 0}

``server_info`` reads it (None from a server that does not say: OpenAI, vLLM, ...).
From it the runner takes its default concurrency (``resolve_concurrency``), and
``estimate_run`` turns the decode speed and the work (requests x expected tokens) into
a duration. For other backends only rpm/tpm limits bound the time; without them we
say that we cannot estimate.

    info = server_info(backend, model)
    estimate = estimate_run(requests=256, max_tokens=300, mean_tokens=None, ...)
    print(estimate.text)  # about 6 min on the local server (≈ 230 tok/s with 16 at once; ...)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from .progress import format_duration

DEFAULT_CONCURRENCY = 8  # when the backend does not say how many requests it batches
OVERSUBSCRIBE = 2  # an explicit --concurrency above this many times max_batch is capped there
PROBE_TIMEOUT_S = 3.0
SERVER_START_NOTE = "starting the local server (first start fetches the model, ~1 min)"


@dataclass(frozen=True)
class ServerInfo:
    """What a gridtune server advertises about its engine (any field may be None)."""

    max_batch: int | None = None
    context_length: int | None = None
    in_flight: int | None = None
    decoding: int | None = None
    stream_tokens_per_s: float | None = None
    batch_tokens_per_s: float | None = None
    generated_tokens: int | None = None
    prefill_tokens_per_s: float | None = None  # prompt tokens/s, when the server says
    train_tokens_per_s: float | None = None  # trained tokens/s, when the server has measured it

    @classmethod
    def from_dict(cls, data: Any) -> ServerInfo | None:
        if not isinstance(data, dict):
            return None

        def num(key: str, kind: type) -> Any:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            if not math.isfinite(value) or value < 0:
                return None
            return kind(value)

        info = cls(max_batch=num("max_batch", int), context_length=num("context_length", int),
                   in_flight=num("in_flight", int), decoding=num("decoding", int),
                   stream_tokens_per_s=num("stream_tokens_per_s", float) or None,
                   batch_tokens_per_s=num("batch_tokens_per_s", float) or None,
                   generated_tokens=num("generated_tokens", int),
                   prefill_tokens_per_s=num("prefill_tokens_per_s", float) or None,
                   train_tokens_per_s=num("train_tokens_per_s", float) or None)
        if info.max_batch is not None and info.max_batch < 1:
            info = cls(**{**info.__dict__, "max_batch": None})
        return info

    def tokens_per_s(self, concurrency: int) -> float | None:
        """Total decode speed with ``concurrency`` streams: the measured one-stream and
        full-batch figures, interpolated linearly in between (batching gains are
        roughly linear in the batch size on a CPU until the batch is full)."""
        one, full, batch = self.stream_tokens_per_s, self.batch_tokens_per_s, self.max_batch
        if one is None and full is None:
            return None
        if full is None or not batch:
            return one if concurrency <= 1 or full is None else full
        if one is None:
            return full * min(concurrency, batch) / batch
        c = min(max(concurrency, 1), batch)
        if batch == 1:
            return full
        return one + (full - one) * (c - 1) / (batch - 1)


def server_info(backend: Any, model: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> ServerInfo | None:
    """The ``gridtune`` field of ``model`` (else of the first model that has one) on the
    backend's GET /models; None when the server does not advertise it or does not answer.
    OpenAI is never asked (it has no such field; one request less per run)."""
    if getattr(backend, "kind", None) == "openai":
        return None
    try:
        with backend.client(timeout=timeout, max_retries=0) as client:
            data = client.get("/models", cast_to=object)
    except Exception:  # noqa: BLE001 - no answer is no information, never an error here
        return None
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    found = [m for m in models if isinstance(m, dict) and isinstance(m.get("gridtune"), dict)]
    chosen = next((m for m in found if m.get("id") == model), found[0] if found else None)
    return ServerInfo.from_dict(chosen["gridtune"]) if chosen else None


def resolve_concurrency(requested: int | None, info: ServerInfo | None) -> tuple[int, str | None]:
    """The concurrency a run uses, and a note when it differs from what was asked.

    Default: what the server decodes at once (``max_batch``), else 8. An explicit value
    wins, but one far above ``max_batch`` is capped at OVERSUBSCRIBE x max_batch: the
    rest would only wait in the server's queue (and meet its queue limit, 429)."""
    batch = info.max_batch if info else None
    if requested is None:
        return (batch or DEFAULT_CONCURRENCY), None
    if batch and requested > OVERSUBSCRIBE * batch:
        cap = OVERSUBSCRIBE * batch
        return cap, (f"concurrency {requested} is far above what the server decodes at once ({batch}); "
                     f"using {cap}")
    return requested, None


@dataclass(frozen=True)
class Estimate:
    """How long a run should take; ``seconds`` None when it cannot be estimated."""

    seconds: float | None
    text: str  # one line for the screen and the command line
    max_seconds: float | None = None  # every completion running to max_tokens
    tokens_per_s: float | None = None
    requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "max_seconds": self.max_seconds, "tokens_per_s": self.tokens_per_s,
                "requests": self.requests, "text": self.text}


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{max(5, int(round(seconds / 5.0)) * 5)} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{int(round(minutes))} min"
    return format_duration(seconds)


def estimate_run(*, requests: int, max_tokens: int, mean_tokens: float | None, prompt_tokens: float = 0,
                 concurrency: int, backend_kind: str, backend_label: str = "",
                 info: ServerInfo | None = None, rpm: float | None = None, tpm: float | None = None) -> Estimate:
    """The time ``requests`` completions take.

    With a server that advertises its speed: decode time of ``requests x tokens`` at the
    speed for ``concurrency`` streams, where tokens is ``mean_tokens`` (the mean of the
    project's finished completions) when known, else ``max_tokens`` (an upper bound);
    the prompts' prefill at the server's ``prefill_tokens_per_s`` when it says, else at a
    tenth of a decoded token each. Otherwise
    rpm/tpm limits give a lower bound on the time; without them there is no estimate.
    """
    where = "on the local server" if backend_kind == "local" else f"on {backend_label or backend_kind}"
    if requests <= 0:
        return Estimate(0.0, "nothing left to generate", 0.0, requests=0)
    concurrency = max(1, min(concurrency, requests))  # a short run never has more at once than requests
    speed = info.tokens_per_s(concurrency) if info else None
    if speed:
        at_once = min(concurrency, info.max_batch or concurrency) if info else concurrency

        prefill = info.prefill_tokens_per_s if info else None
        prefill_s = requests * prompt_tokens / prefill if prefill else requests * prompt_tokens / 10 / speed

        def seconds(tokens: float) -> float:
            return requests * tokens / speed + prefill_s

        upper = seconds(max_tokens)
        how = f"≈ {speed:,.0f} tok/s with {at_once} at once"
        if mean_tokens:
            expected = seconds(min(mean_tokens, max_tokens))
            text = (f"about {_minutes(expected)} {where} ({how}; {requests:,} × ~{mean_tokens:,.0f} tokens, "
                    f"at most {_minutes(upper)} if all run to {max_tokens:,})")
            return Estimate(round(expected, 1), text, round(upper, 1), speed, requests)
        text = f"up to about {_minutes(upper)} {where} ({how}; up to {requests:,} × {max_tokens:,} tokens)"
        return Estimate(round(upper, 1), text, round(upper, 1), speed, requests)
    if info is not None and info.max_batch:
        return Estimate(None, f"no estimate yet: the server has not measured its speed ({requests:,} requests, "
                              f"{info.max_batch} at once)", requests=requests)
    bounds = []
    if rpm:
        bounds.append((requests / rpm * 60, f"{rpm:g} rpm"))
    if tpm:
        bounds.append((requests * (prompt_tokens + max_tokens) / tpm * 60, f"{tpm:g} tpm"))
    if bounds:
        secs, why = max(bounds)
        return Estimate(round(secs, 1), f"at least {_minutes(secs)} {where} (limited by {why}; "
                                        f"{requests:,} requests)", requests=requests)
    return Estimate(None, f"no time estimate {where}: it does not say its speed (set --rpm/--tpm to bound it); "
                          f"{requests:,} requests", requests=requests)


def work_to_do(store: Any, limit: int | None = None) -> tuple[int, float | None]:
    """(completions a run would generate now, mean completion tokens of the finished ones)."""
    counts = store.status_counts()
    requests = counts.pending + counts.failed + counts.running
    if limit is not None:
        requests = min(requests, limit)
    mean = None
    if counts.done:
        total = store.usage_totals().get("completion_tokens") or 0
        mean = total / counts.done if total else None
    return requests, mean


def mean_prompt_tokens(spec: Any, sample: int = 8) -> float:
    """About how many tokens a cell's generation prompt is (chars / 4, a few cells)."""
    import itertools

    texts = []
    try:
        for values in itertools.islice(spec.cells(), sample):
            texts.append(" ".join(m["content"] for m in spec.render(values).generation_messages()))
    except Exception:  # noqa: BLE001 - an estimate, not a check
        return 0.0
    return sum(len(t) for t in texts) / len(texts) / 4 + 8 if texts else 0.0


def local_server_phase(started_at: float, now: float | None = None) -> str:
    """What a run waiting for the local server to start shows: the phase the server
    writes in its state file when it does, else the generic note with the time so far."""
    now = time.time() if now is None else now
    elapsed = format_duration(max(now - started_at, 0))
    phase = _server_phase()
    if phase:
        return f"{phase} · {elapsed}"
    return f"{SERVER_START_NOTE} · {elapsed}"


def _server_phase() -> str | None:
    """The ``phase`` a starting server may write in its state file (server.json)."""
    from ... import locations
    from ...core import serverstate

    return serverstate.phase(serverstate.read_state(locations.server_dir()))


def local_server_starting() -> bool:
    """Whether a run started now would first have to start the local server (no
    OPENAI_* settings, and no local server answering)."""
    import os

    if os.environ.get("OPENAI_BASE_URL", "").strip() or os.environ.get("OPENAI_API_KEY", "").strip():
        return False
    from ..client.local_service import running_backend

    try:
        return running_backend() is None
    except Exception:  # noqa: BLE001 - e.g. a server wanting a key: it is there, not starting
        return False


# -- what training the exported file costs, on the backend in use (issue 9) -----------
# A training step is a forward and a backward pass over the tokens: about three times
# the work of the forward pass alone (the usual 6N vs 2N FLOPs per token), and the
# forward pass over a whole example is what the server measures as its prompt
# (prefill) speed. But that speed is measured on generation's prompts, a few hundred
# tokens at a time between decode steps, and a training step's large batched matmuls
# run faster per token: with a third of it, the demo's first job was estimated at
# 25 min and took 13 m 51 s (issue 21), i.e. about 1.7 x the prefill cost, not 3 x.
# Read it as "about", never as a promise; the job pane measures the ETA from the
# job's own steps once it runs, and says what it took.
TRAIN_COST_FACTOR = 1.7


@dataclass(frozen=True)
class TrainingEstimate:
    seconds: float | None
    tokens_per_s: float | None
    basis: str  # "measured" | "prefill" (divided by TRAIN_COST_FACTOR) | "unknown"


def estimate_training(tokens_total: int, info: ServerInfo | None) -> TrainingEstimate:
    """How long training ``tokens_total`` tokens (all epochs) takes on a gridtune server."""
    if info is not None and info.train_tokens_per_s:
        speed, basis = info.train_tokens_per_s, "measured"
    elif info is not None and info.prefill_tokens_per_s:
        speed, basis = info.prefill_tokens_per_s / TRAIN_COST_FACTOR, "prefill"
    else:
        return TrainingEstimate(None, None, "unknown")
    return TrainingEstimate(round(tokens_total / speed, 1), round(speed, 1), basis)


def training_cost_line(*, backend_kind: str, model: str | None, tokens_total: int, epochs: int,
                       legacy_format: bool = False, info: ServerInfo | None = None,
                       backend_label: str = "") -> str:
    """One line on what fine-tuning on the exported file costs where it would run.

    The local server: no charge, and the training time on this machine (measured or
    rough, said which). OpenAI: the price of a model it still tunes (the given one,
    else the current default), with the price table's date; a retired model is never
    priced, and the legacy prompt/completion format can be priced for none. Another
    compatible server: its price is its own.
    """
    from ..format import cost

    if backend_kind == "local":
        est = estimate_training(tokens_total, info)
        head = "no charge: the local server trains on this machine"
        if est.seconds is None:
            return (f"{head}; training time unknown until the server has measured its speed "
                    f"(~{tokens_total:,} tokens over {epochs} epoch(s))")
        how = ("its measured training speed" if est.basis == "measured"
               else f"rough: its measured prompt speed / {TRAIN_COST_FACTOR:g}, for forward + backward")
        return (f"{head}; about {_minutes(est.seconds)} for ~{tokens_total:,} tokens over {epochs} epoch(s) "
                f"at ~{est.tokens_per_s:,.0f} tokens/s ({how})")
    if backend_kind == "openai":
        if legacy_format:
            return "cost: " + (cost.price_note(model or "babbage-002", legacy_format=True) or "")
        name = model if cost.tunable(model) else cost.CURRENT_TUNABLE_MODEL
        price = cost.tunable_price(name)
        assert price is not None
        usd = price.training * tokens_total / cost.PER
        note = "" if name == model or model is None else f" ({cost.price_note(model)})"
        return (f"about ${usd:,.2f} to fine-tune {price.name} on OpenAI (~{tokens_total:,} tokens over "
                f"{epochs} epoch(s), prices as of {cost.prices_as_of()}){note}")
    return (f"the price of training on {backend_label or 'this server'} is its own: none estimated "
            f"(~{tokens_total:,} tokens over {epochs} epoch(s))")


def backend_for_costs() -> tuple[str, str, ServerInfo | None]:
    """(kind, label, server info) of the backend in use, without starting the local
    server: one that is not running is still the local backend, its speed unknown."""
    from ..client.backend import BackendError
    from ..client.resolve import resolve_backend

    try:
        backend = resolve_backend(start_local=False)
    except BackendError:
        return "local", "the local server", None
    return backend.kind, backend.label, server_info(backend)
