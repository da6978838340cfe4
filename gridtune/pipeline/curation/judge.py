"""LLM-as-judge: a model grades finished completions 1-5 against a rubric the person
keeps in the project; calibration measures its agreement with the person's grades.

- The rubric is a project setting (``judge.rubric``); DEFAULT_RUBRIC until set.
- Grades are stored with source ``judge:<model>``. The store's current grade is a
  person's grade first, so a judge never overrides a person; among automatic
  grades the newest counts (a dedup rejection excepted: it stays).
- The grade is the first digit 1-5 standing alone in the reply ("4", "Grade: 4/5");
  a reply without one is recorded as a failed judgement, never a crash.
- Resumable: a completion that ``model`` has graded is not sent again; failures are.
  Completions already rejected (grade 0) are not judged.
- ``calibrate`` compares the judge's newest grades with a person's on the completions
  both graded (1-5): Spearman's rho, Cohen's quadratic-weighted kappa, exact
  agreement, with the count; stored so the review can show it.

The requests go through ``request_pool.Pool``: the generation runner's rate limits,
retry policy and error classification, without its run lock (see that module).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import GridtuneError
from ...store import Store, curation as cur
from ..client.backend import Backend
from ..client.ratelimit import MINUTE
from ..client.replies import Reply
from ..client.request_pool import Pool, PoolOptions, Request
from ..client.resolve import resolve_backend
from ..spec.options import GENERATION
from ..spec.project import open_with_spec

RUBRIC_KEY = "judge.rubric"
SOURCE_PREFIX = "judge:"
DEFAULT_RUBRIC = """\
5: complete and detailed: answers every part of the prompt with specific, concrete detail, and ends properly.
4: complete, with some detail; a part is thin or generic.
3: answers the prompt but stays general, or leaves a part out.
2: mostly generic or off the point, or stops before it is finished.
1: empty, wrong, repetitive, or does not answer the prompt."""

SYSTEM = ("You grade responses that will become training data for fine-tuning a model. "
          "Grade the response to the prompt from 1 (worst) to 5 (best) using this rubric:\n\n{rubric}\n\n"
          "Reply with the grade only: a single digit from 1 to 5.")
USER = "Prompt:\n{prompt}\n\nResponse:\n{response}\n\nGrade (1-5):"

_GRADE = re.compile(r"(?<![\d.])[1-5](?![\d.]\d)(?!\d)")


class JudgeError(GridtuneError, ValueError):
    """Bad options or a project the judge cannot work on; a one-line message."""


def source_for(model: str) -> str:
    return SOURCE_PREFIX + model


# -- the rubric ------------------------------------------------------------------------
def get_rubric(store: Store) -> str:
    """The project's rubric, or DEFAULT_RUBRIC when the person has not written one."""
    return cur.get_setting(store, RUBRIC_KEY) or DEFAULT_RUBRIC


def set_rubric(store: Store, text: str | None) -> None:
    """Keep ``text`` as the project's rubric (None or blank: back to the default)."""
    text = (text or "").strip()
    if len(text) > 20_000:
        raise JudgeError(f"the rubric is {len(text):,} characters; keep it under 20,000")
    cur.set_setting(store, RUBRIC_KEY, text or None)


def read_rubric_file(path: str | Path) -> str:
    """A rubric from a text file (JudgeError if it is empty or not text)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JudgeError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise JudgeError(f"{path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise JudgeError(f"{path}: the rubric is empty")
    return text


# -- prompts and replies -----------------------------------------------------------------
def judge_messages(rubric: str, prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM.format(rubric=rubric.strip())},
            {"role": "user", "content": USER.format(prompt=prompt, response=response)}]


def parse_grade(reply: str | None) -> int | None:
    """The first digit 1-5 that stands alone in ``reply`` (not part of 10, 3.5 or
    2024); None when there is none."""
    if not reply:
        return None
    match = _GRADE.search(reply)
    return int(match.group()) if match else None


# -- the pass -------------------------------------------------------------------------------
@dataclass
class JudgeOptions:
    model: str
    concurrency: int = 4
    rpm: float | None = None
    tpm: float | None = None
    limit: int | None = None  # at most this many judge calls in this pass
    only_person_graded: bool = False  # calibration: judge just what a person graded 1-5
    max_tokens: int = 16
    temperature: float = 0.0
    timeout_s: float = 120.0
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    rate_period_s: float = MINUTE

    def check(self) -> None:
        if not self.model or not self.model.strip():
            raise JudgeError("--model must name the judge model")
        for name in ("concurrency", "rpm", "tpm", "limit", "max_tokens", "max_attempts"):  # as a run's
            if getattr(self, name) is not None:
                GENERATION[name].check(getattr(self, name), GENERATION[name].flag, JudgeError)


@dataclass
class JudgeResult:
    model: str
    candidates: int  # finished, not rejected, not yet graded by this model
    judged: int = 0
    failed: int = 0
    already: int = 0  # graded by this model in an earlier pass
    grades: dict[str, int] = field(default_factory=lambda: {str(g): 0 for g in range(1, 6)})
    failures: list[tuple[int, str]] = field(default_factory=list)  # the first few (id, reason)
    stopped: str | None = None  # why the pass stopped early (a permanent error)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.stopped else 0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "source": source_for(self.model), "candidates": self.candidates,
                "judged": self.judged, "failed": self.failed, "already_judged": self.already,
                "grades": self.grades, "failures": [{"id": i, "error": e} for i, e in self.failures],
                "stopped": self.stopped, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        bands = ", ".join(f"{g}: {n}" for g, n in self.grades.items())
        line = (f"judge {self.model}: graded {self.judged:,} of {self.candidates:,} completion(s) "
                f"({self.already:,} graded before, skipped; {self.failed:,} failed) in {self.seconds:.1f} s; "
                f"grades: {bands}. A person's grade always stays the current one.")
        for cid, error in self.failures[:3]:
            line += f"\n  #{cid}: {error}"
        if self.stopped:
            line += f"\n  stopped early: {self.stopped}"
        return line


MAX_FAILURES_LISTED = 20


async def run_judge(store_path: str | Path, options: JudgeOptions, *, backend: Backend | None = None,
                    on_progress: Callable[[int, int, int], Any] | None = None,
                    stop_event: asyncio.Event | None = None) -> JudgeResult:
    """Judge the project's finished completions not yet graded by ``options.model``.

    Each outcome is committed as it arrives. ``on_progress(judged, failed, total)``
    after each. Setting ``stop_event`` stops after the requests in flight. Raises
    JudgeError / BackendError / StoreError before any request on bad input.
    """
    options.check()
    started = time.monotonic()
    with open_with_spec(store_path, JudgeError) as (store, spec):
        backend = backend or resolve_backend()
        rubric = get_rubric(store)
        done = cur.judged_ids(store, options.model)
        rows = [r for r in cur.finished_rows(store) if r.grade != 0]
        if options.only_person_graded:
            person = cur.person_grades(store)
            rows = [r for r in rows if r.id in person]
        todo = [r for r in rows if r.id not in done]
        result = JudgeResult(options.model, candidates=len(todo), already=len(rows) - len(todo))
        if options.limit is not None:
            todo = todo[:options.limit]
        if not todo:
            result.seconds = time.monotonic() - started
            return result

        def messages(row: cur.CurationRow) -> list[dict[str, str]]:
            prompt = spec.render(json.loads(row.values)).generation
            return judge_messages(rubric, prompt, row.text)

        source = source_for(options.model)

        def request(row: cur.CurationRow) -> Request:
            msgs = messages(row)
            body = {"model": options.model, "messages": msgs, "max_tokens": options.max_tokens,
                    "temperature": options.temperature}
            # Never under the provider's count: a token is rarely under 3 characters.
            return Request("/chat/completions", body, sum(len(m["content"]) for m in msgs) // 3 + options.max_tokens)

        async def record(row: cur.CurationRow, reply: Reply | None, error: str | None, _latency: float) -> None:
            grade = parse_grade(reply.text) if reply is not None else None
            if reply is not None and grade is None:
                error = f"no grade 1-5 in the reply: {' '.join(reply.text.split())[:120]!r}"
            text = None if reply is None else reply.text[:2000]
            await asyncio.to_thread(cur.record_judgement, store, row.id, options.model, grade=grade,
                                    reply=text, error=error, source=source)
            if grade is None:
                result.failed += 1
                if len(result.failures) < MAX_FAILURES_LISTED:
                    result.failures.append((row.id, error or "no grade"))
            else:
                result.judged += 1
                result.grades[str(grade)] += 1
            if on_progress is not None:
                on_progress(result.judged, result.failed, len(todo))

        pool: Pool[cur.CurationRow] = Pool(backend, PoolOptions(
            concurrency=options.concurrency, rpm=options.rpm, tpm=options.tpm, max_attempts=options.max_attempts,
            backoff_initial_s=options.backoff_initial_s, backoff_max_s=options.backoff_max_s,
            timeout_s=options.timeout_s, rate_period_s=options.rate_period_s))
        await pool.run(todo, request, record, stop_event)
        result.stopped = pool.stopped
        result.seconds = time.monotonic() - started
        return result


def judge(store_path: str | Path, options: JudgeOptions, *, backend: Backend | None = None,
          on_progress: Callable[[int, int, int], Any] | None = None) -> JudgeResult:
    """``run_judge`` for a caller without an event loop (the CLI)."""
    return asyncio.run(run_judge(store_path, options, backend=backend, on_progress=on_progress))


# -- calibration ------------------------------------------------------------------------------
def quadratic_weighted_kappa(a: Sequence[int], b: Sequence[int], lo: int = 1, hi: int = 5) -> float | None:
    """Cohen's kappa with quadratic weights (i - j)^2 / (hi - lo)^2 on grades lo..hi:
    1 - sum(W * observed) / sum(W * expected), expected from the two raters' own
    grade shares. None when undefined (no pairs, or both raters gave one same grade)."""
    if len(a) != len(b):
        raise ValueError("two raters must grade the same items")
    n, k = len(a), hi - lo + 1
    if n == 0:
        return None
    observed = [[0] * k for _ in range(k)]
    for x, y in zip(a, b, strict=True):
        observed[x - lo][y - lo] += 1
    rows = [sum(r) for r in observed]
    cols = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    weight = [[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)] for i in range(k)]
    num = sum(weight[i][j] * observed[i][j] for i in range(k) for j in range(k))
    den = sum(weight[i][j] * rows[i] * cols[j] / n for i in range(k) for j in range(k))
    if den == 0:
        return None
    return 1 - num / den


def spearman(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Spearman's rho (scipy.stats.spearmanr, ties averaged); None when undefined
    (fewer than two pairs, or one rater gave every item the same grade)."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if rho is None or math.isnan(rho) else float(rho)


@dataclass
class Calibration:
    model: str
    n: int
    spearman: float | None
    kappa: float | None
    exact: float | None  # share of identical grades

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "n": self.n, "spearman": _round(self.spearman), "kappa": _round(self.kappa),
                "exact_agreement": _round(self.exact)}

    def summary(self) -> str:
        if self.n == 0:
            return (f"judge {self.model}: no completion is graded by both a person and the judge yet; "
                    f"grade some by hand, then run `judge --calibrate` again")

        def fmt(v: float | None) -> str:
            return "undefined" if v is None else f"{v:.2f}"

        return (f"judge {self.model} vs the person's grades on n={self.n} completion(s): "
                f"Spearman {fmt(self.spearman)}, weighted kappa {fmt(self.kappa)}, "
                f"exact agreement {fmt(None if self.exact is None else self.exact * 100)}%")


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def calibrate(store: Store, model: str) -> Calibration:
    """Agreement of ``model``'s newest grades with a person's current grades (1-5) on
    the completions both graded; stored (when n > 0) for the review to show."""
    person = cur.person_grades(store)
    judged = cur.latest_grades_by_source(store, source_for(model))
    both = sorted(set(person) & set(judged))
    a = [person[i] for i in both]
    b = [judged[i] for i in both]
    result = Calibration(model, len(both), spearman(a, b), quadratic_weighted_kappa(a, b),
                         sum(x == y for x, y in zip(a, b, strict=True)) / len(both) if both else None)
    if both:
        cur.record_calibration(store, model, n=result.n, spearman=result.spearman, kappa=result.kappa,
                               exact=result.exact)
    return result


def latest_calibration(store: Store, model: str | None = None) -> Calibration | None:
    """The newest stored calibration (of ``model``, or of any judge), for the review."""
    row = cur.latest_calibration(store, model)
    if row is None:
        return None
    return Calibration(row["model"], row["n"], row["spearman"], row["kappa"], row["exact"])
