"""The evaluation's metrics on texts whose answers are known by hand."""

from __future__ import annotations

import math

import pytest

from gridtune.pipeline.evaluation.eval_metrics import (
    Answer,
    Reference,
    compare,
    has_loop,
    mean_interval,
    mentions_values,
    score,
    shape,
    tuned_is_worse,
    wilson,
)

DATA = [
    "Oslo in 2030 is calm. Trains run on time. People plan ahead.",
    "Lima in 2040 is busy. Markets open early. Nobody sleeps late.",
    "Tokyo in 2035 is quiet. Robots sweep streets. Parks are full.",
    "Lagos in 2050 is loud. Music fills roads. Shops stay open.",
]


def test_wilson_matches_the_textbook_figure():
    # 8 of 10: Wilson 95% interval is about 0.490 .. 0.943 (Newcombe 1998, table I method 3).
    est = wilson(8, 10)
    assert est.value == 0.8 and est.n == 10
    assert est.low == pytest.approx(0.490, abs=0.001) and est.high == pytest.approx(0.943, abs=0.001)
    assert wilson(0, 5).low == 0.0 and wilson(5, 5).high == 1.0
    assert math.isnan(wilson(0, 0).value)


def test_mean_interval_narrows_with_n():
    wide, narrow = mean_interval([1, 3] * 2), mean_interval([1, 3] * 50)
    assert wide.value == narrow.value == 2
    assert (narrow.high - narrow.low) < (wide.high - wide.low)


def test_loops_are_found_and_prose_is_not():
    looping = "The city grows fast. " + "It is a city of the future. " * 4
    assert has_loop(looping)
    assert not any(has_loop(t) for t in DATA)
    assert not has_loop("Oslo in 2030. Oslo in 2030 again. And Oslo in 2030.")  # three words, not five


def test_value_mentions_are_whole_words():
    assert mentions_values("Lima, 2040: a city.", {"place": "Lima", "year": 2040})
    assert not mentions_values("A climate story of 2040.", {"place": "Lima", "year": 2040})
    assert not mentions_values("Lima only.", {"place": "Lima", "year": 2040})


def test_shape_counts_paragraphs_sentences_lists_and_a_finished_end():
    s = shape("Plan:\n- one\n- two\n\nDone. Really done.")
    assert s == {"paragraphs": 2.0, "sentences": 2.0, "list_lines": 2.0, "heading_lines": 1.0, "finished": 1.0}
    assert shape("It stopped mid")["finished"] == 0.0


def test_consistent_answers_beat_rambling_ones():
    ref = Reference.of(DATA)
    values = [{"place": p, "year": y} for p, y in (("Oslo", 2030), ("Lima", 2040), ("Tokyo", 2035), ("Lagos", 2050))]
    tuned = [Answer(t, "stop", v) for t, v in zip(DATA * 5, values * 5)]
    rambling = "and then the city went on " * 30
    base = [Answer(t + " " + rambling.strip(), "length", v) for t, v in zip(DATA * 5, values * 5)]
    st, sb = score(tuned, ref), score(base, ref)
    assert st.stop_rate.value == 1.0 and sb.stop_rate.value == 0.0
    assert st.repetition.value == 0.0 and sb.repetition.value == 1.0
    assert st.format_match.value > sb.format_match.value
    rows = {r.metric: r for r in compare(st, sb, ref)}
    assert rows["stop_rate"].better == "tuned" and rows["repetition"].better == "tuned"
    assert not tuned_is_worse(list(rows.values()))
    assert tuned_is_worse(compare(sb, st, ref))  # swapped: the gate fires


def test_a_model_against_itself_differs_by_nothing():
    ref = Reference.of(DATA)
    answers = [Answer(t, "stop", {}) for t in DATA * 3]
    rows = compare(score(answers, ref), score(answers, ref), ref)
    assert all(r.difference == 0 and r.better is None for r in rows)


def test_length_spread_is_better_only_beyond_its_noise():
    from gridtune.pipeline.evaluation.eval_metrics import cv_interval

    ref = Reference.of(["x" * 100] * 5 + ["x" * 110] * 5)  # the data: a small spread
    steady = [Answer("x" * n, "stop", {}) for n in [100, 105, 110, 102, 108] * 6]
    wild = [Answer("x" * n, "stop", {}) for n in [20, 400, 60, 300, 150] * 6]
    rows = {r.metric: r for r in compare(score(steady, ref), score(wild, ref), ref)}
    assert rows["length_cv"].better == "tuned"
    few_a = [Answer("x" * n, "stop", {}) for n in (90, 130, 100)]
    few_b = [Answer("x" * n, "stop", {}) for n in (60, 150, 100)]
    rows = {r.metric: r for r in compare(score(few_a, ref), score(few_b, ref), ref)}
    assert rows["length_cv"].better is None  # three answers each: within noise
    est = cv_interval([100, 105, 110, 102, 108] * 6)
    assert est.low <= est.value <= est.high and est == cv_interval([100, 105, 110, 102, 108] * 6)


def test_identical_scores_still_carry_their_uncertainty():
    from gridtune.pipeline.evaluation.eval_metrics import score_interval

    few = score_interval([0.6, 0.6, 0.6])
    assert few.value == pytest.approx(0.6) and few.high - few.low > 0.4  # three answers say little
    many = score_interval([0.6] * 300)
    assert many.high - many.low < 0.12


# -- every metric against answers labelled by hand (issue 21) ---------------------------
# The playground's held-out prompt, as the tuned model and its base were asked it.
PROMPT = "AGI scenario. Place: Paris. Year: 2055. Parameters: agriculture, inequality."
VALUES = {"place": "Paris", "year": 2055, "parameter_one": "agriculture", "parameter_two": "inequality"}
# (answer, finish reason, hand labels): stopped by itself, caught in a loop, share of the
# four values named in its own words, last sentence finished.
LABELLED = [
    ("In 2055, a massive AI-powered agriculture system spread across Europe. Farms ran themselves. "
     "Food grew cheap.", "stop", {"stopped": 1, "loop": 0, "share": 2 / 4, "finished": 1}),
    ("Paris in 2055: machines tend every field, and agriculture feeds all. Yet inequality grows as "
     "owners of the machines gain most.", "stop", {"stopped": 1, "loop": 0, "share": 4 / 4, "finished": 1}),
    (PROMPT, "stop", {"stopped": 1, "loop": 0, "share": 0 / 4, "finished": 1}),  # the prompt repeated back
    (PROMPT + " Paris changed slowly and then", "length",
     {"stopped": 0, "loop": 0, "share": 1 / 4, "finished": 0}),  # an echo, then Paris in its own words
    ("The farms of the future are here. " * 4 + "The end", "length",
     {"stopped": 0, "loop": 1, "share": 0 / 4, "finished": 0}),
    ("Inequality in Paris fell by 2055.", "stop", {"stopped": 1, "loop": 0, "share": 3 / 4, "finished": 1}),
]


def test_each_metric_reads_as_the_hand_labels_say():
    from gridtune.pipeline.evaluation.eval_metrics import value_share

    answers = [Answer(text, finish, VALUES, PROMPT) for text, finish, _ in LABELLED]
    labels = [lab for _, _, lab in LABELLED]
    for (text, _, lab) in LABELLED:
        assert value_share(text, VALUES, PROMPT) == pytest.approx(lab["share"]), text
        assert has_loop(text) == bool(lab["loop"]), text
        assert shape(text)["finished"] == lab["finished"], text
    s = score(answers, Reference.of(DATA))
    n = len(labels)
    assert s.stop_rate.value == pytest.approx(sum(lab["stopped"] for lab in labels) / n)
    assert s.repetition.value == pytest.approx(sum(lab["loop"] for lab in labels) / n)
    assert s.faithfulness.value == pytest.approx(sum(lab["share"] for lab in labels) / n)
    assert s.length_mean.value == pytest.approx(sum(len(t) for t, _, _ in LABELLED) / n)


def test_the_issues_case_tuned_names_its_values_and_an_echo_does_not():
    """Issue 21: a tuned answer naming two of its four values read 0%, and a base that
    repeated the prompt back read 67%. Now: 50% for the one, 0% for the echo."""
    tuned = [Answer(LABELLED[0][0], "stop", VALUES, PROMPT)] * 3
    echo = [Answer(PROMPT, "stop", VALUES, PROMPT)] * 3
    ref = Reference.of(DATA)
    assert score(tuned, ref).faithfulness.value == pytest.approx(0.5)
    assert score(echo, ref).faithfulness.value == 0.0
    # Without the prompt (an answer scored alone), the words count as they stand.
    assert Answer(PROMPT, "stop", VALUES).prompt == "" and mentions_values(PROMPT, VALUES)
