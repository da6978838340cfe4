"""What makes a tuned model's answers *consistent*, measured: the numbers `gridtune eval`
reports per model, each with its uncertainty, compared against the kept training data.

Every metric is a plain function of texts (and finish reasons), so the same code scores
a base model, a tuned one and the training completions themselves:

- stop rate: the share of answers that ended on their own (the stop sequence or the
  end of turn), not at max tokens — the seed's own observation is that an untuned
  model runs on and repeats itself;
- length: mean, and the coefficient of variation (spread / mean), next to the
  training data's — consistency is a small spread near the data's;
- format match: how closely an answer's shape (paragraphs, sentences, list and heading
  lines, a finished last sentence) sits inside the training data's usual range;
- repetition: the share of answers caught in a loop (a word n-gram said again and again);
- faithfulness ("mentions its values"): how many of its prompt's variable values an answer
  names in its own words, as a share, averaged over the answers; an answer that repeats the
  prompt back gets no credit for the values inside the copy.

Proportions get a Wilson interval; means a normal interval on the standard error.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Z95 = 1.959964  # two-sided 95%

# A repetition loop: some run of LOOP_N words said LOOP_TIMES times or more. Five words
# thrice is rare in fluent prose even on one topic (a place name and a year recur, but
# not inside the same five-word run), and what small untuned models do when they loop.
LOOP_N = 5
LOOP_TIMES = 3

_WORD = re.compile(r"\w+(?:['’]\w+)?", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?…](?:[\"'”’)\]]*)(?=\s|$)")
_LIST_LINE = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+")
_HEADING_LINE = re.compile(r"^\s*(?:#{1,6}\s+\S|[A-Z][^.!?\n]{0,60}:\s*$)")
_ENDS_FINISHED = re.compile(r"[.!?…][\"'”’)\]]*\s*$")


# -- intervals -------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% interval and the number of answers it rests on."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """As JSON allows: no NaN (an estimate on no answers is null)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def wilson(successes: int, n: int) -> Estimate:
    """A proportion with its Wilson score interval (sound at 0, 1 and small n)."""
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def mean_interval(values: Sequence[float]) -> Estimate:
    """A mean with a normal interval on its standard error."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    half = Z95 * statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def score_interval(scores: Sequence[float]) -> Estimate:
    """The mean of scores in [0, 1] with a Wilson interval on n (the mean read as a
    proportion). A normal interval has zero width when every answer scores the same,
    which would call three identical answers a certain difference."""
    n = len(scores)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(scores)
    est = wilson(round(mean * n), n)
    return Estimate(mean, min(est.low, mean), max(est.high, mean), n)


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Spread relative to size: stdev / mean (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean else math.inf


BOOTSTRAP_RESAMPLES = 400


def cv_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Estimate:
    """The coefficient of variation with a 95% percentile-bootstrap interval (seeded:
    the same answers give the same interval)."""
    import random

    n = len(values)
    cv = coefficient_of_variation(values)
    if n < 2:
        return Estimate(cv, cv, cv, n)
    rng = random.Random(seed)
    draws = sorted(coefficient_of_variation([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    finite = [d for d in draws if math.isfinite(d)] or [cv]
    return Estimate(cv, _percentile(finite, 0.025), _percentile(finite, 0.975), n)


# -- per answer ----------------------------------------------------------------------
def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def has_loop(text: str, n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """Whether some run of ``n`` words occurs ``times`` times or more."""
    ws = words(text)
    if len(ws) < n * times:
        return False
    counts = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    return max(counts.values()) >= times


def mentions_values(text: str, values: Mapping[str, Any]) -> bool:
    """Whether ``text`` names every one of the prompt's variable values."""
    return value_share(text, values) == 1.0


# Words copied from the prompt in a run this long are an echo, not an answer: "Place:
# Oslo. Year: 2040" is three words of "AGI scenario. Place: Oslo. Year: 2040. ...",
# while prose that names the values ("in Oslo in 2040") does not copy three in a row.
ECHO_RUN = 3


def without_echo(text: str, prompt: str, run: int = ECHO_RUN) -> str:
    """``text`` with every run of ``run`` or more words copied from ``prompt`` blanked
    (case and punctuation aside), so what is left is the answer's own words."""
    if not prompt:
        return text
    said = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]
    prompt_runs = {tuple(g) for g in _ngrams(words(prompt), run)}
    echoed = [False] * len(said)
    for i in range(len(said) - run + 1):
        if tuple(w for _, _, w in said[i:i + run]) in prompt_runs:
            echoed[i:i + run] = [True] * run
    out, last = [], 0
    for (start, end, _), echo in zip(said, echoed, strict=True):
        if echo:
            out.append(text[last:start] + " ")
            last = end
    return "".join(out) + text[last:]


def _ngrams(ws: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    return (ws[i:i + n] for i in range(len(ws) - n + 1))


def value_share(text: str, values: Mapping[str, Any], prompt: str = "") -> float:
    """The share of the prompt's variable values that ``text`` names (as rendered,
    case-insensitive, on word boundaries: "Lima" is not found in "climate"), outside
    any echo of ``prompt``. 1.0 for a prompt without values."""
    needles = [str(v).strip().lower() for v in values.values() if str(v).strip()]
    if not needles:
        return 1.0
    low = without_echo(text, prompt).lower()
    found = sum(1 for needle in needles if re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", low))
    return found / len(needles)


SHAPE_FEATURES = ("paragraphs", "sentences", "list_lines", "heading_lines", "finished")


def shape(text: str) -> dict[str, float]:
    """The countable shape of a text: what "the same format every time" is made of."""
    stripped = text.strip()
    lines = [ln for ln in stripped.splitlines() if ln.strip()]
    paragraphs = [p for p in re.split(r"\n\s*\n", stripped) if p.strip()]
    return {
        "paragraphs": float(len(paragraphs)),
        "sentences": float(len(_SENTENCE_END.findall(stripped))),
        "list_lines": float(sum(1 for ln in lines if _LIST_LINE.match(ln))),
        "heading_lines": float(sum(1 for ln in lines if _HEADING_LINE.match(ln))),
        "finished": 1.0 if _ENDS_FINISHED.search(stripped) else 0.0,
    }


@dataclass(frozen=True)
class ShapeProfile:
    """The training data's usual range (10th to 90th percentile) of each shape feature."""

    ranges: dict[str, tuple[float, float]]
    n: int

    @classmethod
    def of(cls, texts: Iterable[str]) -> ShapeProfile:
        shapes = [shape(t) for t in texts]
        ranges: dict[str, tuple[float, float]] = {}
        for name in SHAPE_FEATURES:
            values = sorted(s[name] for s in shapes)
            ranges[name] = (_percentile(values, 0.10), _percentile(values, 0.90)) if values else (0.0, 0.0)
        return cls(ranges, len(shapes))

    def match(self, text: str) -> float:
        """The share of shape features of ``text`` inside the usual range (0..1)."""
        s = shape(text)
        inside = sum(1 for name in SHAPE_FEATURES if self.ranges[name][0] <= s[name] <= self.ranges[name][1])
        return inside / len(SHAPE_FEATURES)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- per model -----------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    values: Mapping[str, Any] = field(default_factory=dict)
    prompt: str = ""  # what the model was asked: values it merely repeats back do not count


STOPPED = frozenset({"stop", "end_turn", "stop_sequence", "eos"})


@dataclass(frozen=True)
class ModelScores:
    """One model's figures on the held-out prompts."""

    stop_rate: Estimate
    length_mean: Estimate
    length_cv: float
    length_cv_spread: Estimate  # the 95% bootstrap interval of length_cv
    format_match: Estimate
    repetition: Estimate
    faithfulness: Estimate
    n: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "length_cv": self.length_cv if math.isfinite(self.length_cv) else None,
                               "length_cv_interval": self.length_cv_spread.to_dict()}
        for name in ("stop_rate", "length_mean", "format_match", "repetition", "faithfulness"):
            out[name] = getattr(self, name).to_dict()
        return out


@dataclass(frozen=True)
class Reference:
    """What the kept training completions look like: the target of consistency."""

    length_mean: float
    length_cv: float
    profile: ShapeProfile

    @classmethod
    def of(cls, texts: Sequence[str]) -> Reference:
        lengths = [float(len(t)) for t in texts]
        return cls(statistics.fmean(lengths) if lengths else math.nan, coefficient_of_variation(lengths),
                   ShapeProfile.of(texts))


def score(answers: Sequence[Answer], reference: Reference) -> ModelScores:
    lengths = [float(len(a.text)) for a in answers]
    return ModelScores(
        stop_rate=wilson(sum(1 for a in answers if (a.finish_reason or "") in STOPPED), len(answers)),
        length_mean=mean_interval(lengths),
        length_cv=coefficient_of_variation(lengths),
        length_cv_spread=cv_interval(lengths),
        format_match=score_interval([reference.profile.match(a.text) for a in answers]),
        repetition=wilson(sum(1 for a in answers if has_loop(a.text)), len(answers)),
        faithfulness=score_interval([value_share(a.text, a.values, a.prompt) for a in answers]),
        n=len(answers),
    )


# -- base vs tuned -------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """One metric, two models: the difference and which is better (None: a tie
    within the intervals, or nothing to compare)."""

    metric: str
    tuned: float
    base: float
    difference: float
    better: str | None


HIGHER_IS_BETTER = {"stop_rate": True, "format_match": True, "faithfulness": True, "repetition": False}


def compare(tuned: ModelScores, base: ModelScores, reference: Reference) -> list[Comparison]:
    """Metric by metric. A proportion or mean is better only when the intervals do not
    overlap; the length spread is better when it is nearer the training data's."""
    rows: list[Comparison] = []
    for metric, higher in HIGHER_IS_BETTER.items():
        t, b = getattr(tuned, metric), getattr(base, metric)
        better: str | None = None
        if t.n and b.n and not (t.low <= b.high and b.low <= t.high):
            better = "tuned" if (t.value > b.value) == higher else "base"
        rows.append(Comparison(metric, t.value, b.value, t.value - b.value, better))
    # Consistency of length: how far each model's spread is from the data's, with the
    # spread's own bootstrap interval; better only when the distance intervals part.
    def distance(est: Estimate) -> tuple[float, float]:
        lo, hi = est.low - reference.length_cv, est.high - reference.length_cv
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))

    better_cv: str | None = None
    if tuned.n > 1 and base.n > 1 and math.isfinite(reference.length_cv):
        (t_lo, t_hi), (b_lo, b_hi) = distance(tuned.length_cv_spread), distance(base.length_cv_spread)
        if t_hi < b_lo:
            better_cv = "tuned"
        elif b_hi < t_lo:
            better_cv = "base"
    rows.append(Comparison("length_cv", tuned.length_cv, base.length_cv, tuned.length_cv - base.length_cv,
                           better_cv))
    return rows


def tuned_is_worse(rows: Sequence[Comparison]) -> bool:
    """The gate of `gridtune eval`: worse than its base on stop rate or consistency."""
    return any(r.better == "base" for r in rows if r.metric in ("stop_rate", "length_cv", "format_match"))
