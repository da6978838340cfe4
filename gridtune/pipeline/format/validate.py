"""Validate a fine-tuning JSONL file the way OpenAI's own tools do.

Chat files (``messages``) get every check of the cookbook notebook "Data
preparation and analysis for chat model fine-tuning": its format-error classes,
counted by name, the missing system/user warnings, the distributions of
messages, tokens and assistant tokens per example, the examples over the
context length, and the billed-token and cost estimate with the default-epochs
rule. Legacy prompt/completion files get the checks of the old
``openai tools fine_tunes.prepare_data`` (openai-python 0.x validators.py).

The file is streamed line by line: memory grows only with a few integers and a
16-byte digest per example (for the distributions and duplicate detection),
never with the text. Imports nothing from the store or the UI: the embedded
server uses this module too.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import GridtuneError
from . import cost, tokens
from .cost import usd

CHAT, COMPLETION, UNKNOWN = "chat", "completion", "unknown"
DEFAULT_CHAT_MODEL = "gpt-4o-mini-2024-07-18"
DEFAULT_COMPLETION_MODEL = "babbage-002"
MAX_ERROR_LINES = 5

# The notebook's allowed message keys and roles, plus the newer tool-calling ones
# the fine-tuning API also accepts.
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id"})
ROLES = frozenset({"system", "user", "assistant", "function", "tool"})
COMPLETION_KEYS = ("prompt", "completion")

# Candidates, in prepare_data's order, for a prompt separator and a completion
# stop that appear nowhere in the data, with its last-resort fallbacks.
SEPARATOR_OPTIONS = (" ->", "\n\n###\n\n", "\n\n===\n\n", "\n\n---\n\n", "\n\n===>\n\n", "\n\n--->\n\n")
SEPARATOR_FALLBACK = "\n\n### =>\n\n"
STOP_OPTIONS = ("\n", ".", " END", "***", "+++", "&&&", "$$$", "@@@", "%%%")
STOP_FALLBACK = " [END]"

MAX_LINE_BYTES = 8 * 1024 * 1024  # one example's line; far above any model's context, far below memory
LONG_EXAMPLE_CHARS = 10_000  # prepare_data's "very long" threshold
MIN_EXAMPLES = 100  # prepare_data recommends at least a few hundred
MIN_API_EXAMPLES = 10  # the fine-tuning API refuses fewer
# An answer that ends with none of these (after closing quotes, brackets and
# markdown emphasis) ends mid-sentence: most often it was cut off at max tokens.
SENTENCE_ENDS = frozenset(".!?…。！？")
_CLOSERS = "\"'”’»)]}*_`"
TAIL_CHARS = 32  # how much of each legacy completion's end is kept for that check


def _valid_weight(value: Any) -> bool:
    """OpenAI takes a message weight of 0 or 1 only (an integer: not 2, 0.5, NaN or true)."""
    return type(value) is int and value in (0, 1)


def ends_mid_sentence(text: str) -> bool:
    """Whether ``text`` stops without sentence-ending punctuation (a heuristic: a
    list or a code block may end that way too; a cut-off answer nearly always does)."""
    tail = text.rstrip().rstrip(_CLOSERS).rstrip()
    return bool(tail) and tail[-1] not in SENTENCE_ENDS


def mid_sentence_warning(n: int, total: int) -> str:
    return (f"{n:,} of {total:,} example(s) ({n / max(total, 1):.0%}) end mid-sentence (no . ! or ? at "
            f"the end): likely cut off at max tokens; the model would learn to stop mid-sentence")


class ValidationInputError(GridtuneError, ValueError):
    """The file cannot be validated at all: missing, unreadable or empty."""


def show(s: str) -> str:
    """A separator or stop as a person reads it (newlines visible)."""
    return s.replace("\n", "\\n")


def _quantile(sorted_values: array, q: float) -> float:
    # Linear interpolation, as numpy.quantile's default.
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: Iterable[int]) -> dict[str, float] | None:
    data = array("q", sorted(values))
    if not data:
        return None
    return {
        "min": data[0],
        "max": data[-1],
        "mean": round(sum(data) / len(data), 2),
        "median": _quantile(data, 0.5),
        "p5": round(_quantile(data, 0.05), 2),
        "p95": round(_quantile(data, 0.95), 2),
    }


def _digest(*parts: str) -> bytes:
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(), digest_size=16).digest()


# What a line of a report is, for whoever styles it (the TUI colours errors red).
TITLE, OK, ERROR, WARNING, NOTE, FIGURE = "title", "ok", "error", "warning", "note", "figure"


@dataclass(frozen=True)
class ReportLine:
    """One line of a report as text, with its kind; ``heading`` marks the line that
    opens a section ("2 error(s):", "Warnings:")."""

    kind: str
    text: str
    heading: bool = False


@dataclass
class ValidationReport:
    path: str | None
    format: str
    model: str
    n_examples: int = 0
    n_lines: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_lines: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def add_error(self, kind: str, line: int | None = None) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if line is not None:
            lines = self.error_lines.setdefault(kind, [])
            if len(lines) < MAX_ERROR_LINES and line not in lines:
                lines.append(line)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "model": self.model,
            "ok": self.ok,
            "n_examples": self.n_examples,
            "n_lines": self.n_lines,
            "errors": dict(self.errors),
            "error_lines": {k: list(v) for k, v in self.error_lines.items()},
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ValidationReport | None:
        """A report back from ``to_dict`` (as an export records it); None when unreadable."""
        if not isinstance(data, dict):
            return None
        try:
            report = cls(path=data.get("path"), format=str(data.get("format") or UNKNOWN),
                         model=str(data.get("model") or ""))
            report.n_examples, report.n_lines = int(data.get("n_examples") or 0), int(data.get("n_lines") or 0)
            report.errors = {str(k): int(v) for k, v in (data.get("errors") or {}).items()}
            report.error_lines = {str(k): list(v) for k, v in (data.get("error_lines") or {}).items()}
            report.warnings = [str(w) for w in data.get("warnings") or []]
            report.notes = [str(n) for n in data.get("notes") or []]
            report.stats = dict(data.get("stats") or {})
        except (TypeError, ValueError, AttributeError):
            return None
        return report

    def lines(self) -> list[ReportLine]:
        """The report as lines that say what they are (a title, an error, a warning,
        a figure...): ``render_text`` prints them, the TUI styles them by kind."""
        s = self.stats
        head = f"{self.path}: " if self.path else ""
        out = [ReportLine(TITLE, f"{head}{self.format} format, {self.n_examples:,} example(s); "
                                 f"tokens counted for {self.model} ({s.get('encoding', '?')})")]
        if self.errors:
            out.append(ReportLine(ERROR, f"{sum(self.errors.values()):,} error(s):", heading=True))
            for kind, count in sorted(self.errors.items()):
                lines = self.error_lines.get(kind)
                where = f" (line {', '.join(map(str, lines))}{', ...' if count > len(lines) else ''})" if lines else ""
                out.append(ReportLine(ERROR, f"  {kind}: {count:,}{where}"))
        else:
            out.append(ReportLine(OK, "No errors found."))
        if self.warnings:
            out.append(ReportLine(WARNING, "Warnings:", heading=True))
            out.extend(ReportLine(WARNING, f"  - {w}") for w in self.warnings)
        out.extend(ReportLine(NOTE, f"  * {n}") for n in self.notes)
        for key, label in (
            ("messages_per_example", "messages per example"),
            ("tokens_per_example", "tokens per example"),
            ("assistant_tokens_per_example", "assistant tokens per example"),
        ):
            d = s.get(key)
            if d:
                out.append(ReportLine(FIGURE,
                    f"{label}: min {d['min']:,} / max {d['max']:,}, mean {d['mean']:,} / "
                    f"median {d['median']:,}, p5 {d['p5']:,} / p95 {d['p95']:,}"
                ))
        if s.get("validation_file"):
            # Scored during training, never trained on: no epochs and no charge to show.
            out.append(ReportLine(FIGURE, "a validation file: the job scores the model on it; it is not trained on"))
        elif "billed_tokens_per_epoch" in s:
            out.append(ReportLine(FIGURE,
                f"{s['n_over_context']:,} example(s) over the {s['context_length']:,}-token limit; "
                f"~{s['billed_tokens_per_epoch']:,} billed tokens per epoch"
            ))
            price = s.get("estimated_cost_usd")
            money = (f", about {usd(price)} for {s['price_model']}" if price is not None
                     else f" ({s.get('price_note') or 'no price known for this model'})")
            out.append(ReportLine(FIGURE,
                f"{s['epochs']} epoch(s) by default -> ~{s['billed_tokens_total']:,} tokens charged{money}"
            ))
        return out

    def render_text(self) -> str:
        return "\n".join(line.text for line in self.lines())


class _Checker:
    """Accumulates one file's checks, one example at a time."""

    def __init__(self, report: ValidationReport, model: str | None):
        self.report = report
        self.model_arg = model
        self.enc: Any = None
        self.total_tokens = array("q")
        self.over_context = 0
        self.over_lines: list[int] = []
        self.ctx = 0

    def start(self, fmt: str) -> None:
        r = self.report
        r.format = fmt
        r.model = self.model_arg or (DEFAULT_CHAT_MODEL if fmt == CHAT else DEFAULT_COMPLETION_MODEL)
        self.enc = tokens.get_encoding(r.model)
        self.ctx = cost.context_length(r.model)

    def ntok(self, value: Any) -> int:
        return len(self.enc.encode(value, disallowed_special=())) if isinstance(value, str) else 0

    def add_total(self, n: int, line: int) -> None:
        self.total_tokens.append(n)
        if n > self.ctx:
            self.over_context += 1
            if len(self.over_lines) < MAX_ERROR_LINES:
                self.over_lines.append(line)

    def finish_common(self) -> None:
        r, s = self.report, self.report.stats
        s["encoding"] = self.enc.name if self.enc else tokens.encoding_name_for_model(r.model)
        s["tokens_per_example"] = distribution(self.total_tokens)
        s["context_length"] = self.ctx or cost.context_length(r.model)
        s["n_over_context"] = self.over_context
        billed = sum(min(self.ctx, n) for n in self.total_tokens)
        epochs = cost.default_epochs(r.n_examples)
        price = cost.tunable_price(r.model)  # None for a retired model: it cannot be tuned, so no price
        if r.format == COMPLETION and price is not None and price.name != "local":
            # Every model OpenAI still tunes takes chat only: this file would be refused for it
            # (the local backend trains either format).
            r.add_error("completion_format_not_tuned_by_model")
            r.warnings.append(f"{r.model} fine-tunes on the chat format only, and no current model on the "
                              f"legacy prompt/completion format: export --format chat for it")
            price = None
        s["billed_tokens_per_epoch"] = billed
        s["epochs"] = epochs
        s["billed_tokens_total"] = billed * epochs
        s["price_model"] = price.name if price else None
        s["estimated_cost_usd"] = cost.training_cost(r.model, billed, epochs) if price else None
        s["price_note"] = cost.price_note(r.model, legacy_format=r.format == COMPLETION) or (
            f"{r.model} does not fine-tune on this format: none priced" if price is None else None)
        if self.over_context:
            r.warnings.append(
                f"{self.over_context:,} example(s) over the {self.ctx:,}-token limit of {r.model}, "
                f"truncated in training (line {', '.join(map(str, self.over_lines))})"
            )
        if r.format == CHAT and 0 < r.n_examples < MIN_API_EXAMPLES:
            r.warnings.append(
                f"only {r.n_examples} example(s): OpenAI's fine-tuning API needs at least {MIN_API_EXAMPLES}"
            )


class _ChatChecker(_Checker):
    def __init__(self, report: ValidationReport, model: str | None):
        super().__init__(report, model)
        self.n_messages = array("q")
        self.assistant_tokens = array("q")
        self.missing_system = 0
        self.missing_user = 0
        self.mid_sentence = 0

    def feed(self, ex: dict[str, Any], line: int) -> None:
        r = self.report
        messages = ex.get("messages")
        if not messages or not isinstance(messages, list):
            r.add_error("missing_messages_list", line)
            return
        total, assistant = 3, 0
        roles: set[Any] = set()
        last_answer: Any = None
        for message in messages:
            if not isinstance(message, dict):
                r.add_error("message_missing_key", line)
                continue
            if "role" not in message or "content" not in message:
                r.add_error("message_missing_key", line)
            if any(k not in MESSAGE_KEYS for k in message):
                r.add_error("message_unrecognized_key", line)
            if "weight" in message and not _valid_weight(message["weight"]):
                r.add_error("invalid_weight", line)
            role = message.get("role")
            roles.add(role if isinstance(role, str) else None)
            if role not in ROLES:
                r.add_error("unrecognized_role", line)
            content = message.get("content")
            calls = message.get("function_call") or message.get("tool_calls")
            if not (isinstance(content, str) and content) and not (calls and content is None):
                r.add_error("missing_content", line)
            total += 3
            for key, value in message.items():
                total += self.ntok(value)
                if key == "name":
                    total += 1
            if role == "assistant":
                assistant += self.ntok(content)
                last_answer = content
        if "assistant" not in roles:
            r.add_error("example_missing_assistant_message", line)
        self.mid_sentence += isinstance(last_answer, str) and ends_mid_sentence(last_answer)
        self.missing_system += "system" not in roles
        self.missing_user += "user" not in roles
        self.n_messages.append(len(messages))
        self.assistant_tokens.append(assistant)
        self.add_total(total, line)

    def finish(self, rerun: Callable[[], Iterator[tuple[int, Any]]] | None) -> None:
        r, s = self.report, self.report.stats
        if self.missing_system:
            r.warnings.append(f"{self.missing_system:,} example(s) missing a system message")
        if self.missing_user:
            r.warnings.append(f"{self.missing_user:,} example(s) missing a user message")
        s["n_mid_sentence"] = self.mid_sentence
        if self.mid_sentence:
            r.warnings.append(mid_sentence_warning(self.mid_sentence, r.n_examples))
        s["n_missing_system"] = self.missing_system
        s["n_missing_user"] = self.missing_user
        s["messages_per_example"] = distribution(self.n_messages)
        s["assistant_tokens_per_example"] = distribution(self.assistant_tokens)
        self.finish_common()


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def _common_suffix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return a[len(a) - i:]


def marker(common: str) -> str:
    """The separator or stop in a common ending: what follows its last sentence
    punctuation. Prompts that all end '… art.\n\n###\n\n' share the ending
    '.\n\n###\n\n' for the separator '\n\n###\n\n', and completions that all end
    '… done. END' the ending ' done. END' (or '. END') for the stop ' END'; an ending
    that is only punctuation ('.') is its own marker."""
    cut = max(common.rfind(c) for c in ".!?…")
    return (common[cut + 1:] or common) if cut >= 0 else common


class _CompletionChecker(_Checker):
    """The legacy prepare_data checks, computed in one streaming pass."""

    def __init__(self, report: ValidationReport, model: str | None):
        super().__init__(report, model)
        self.first: tuple[str, str] | None = None
        self.prompt_suffix = self.prompt_prefix = ""
        self.completion_suffix = self.completion_prefix = ""
        self.same_prompts = self.same_completions = True
        self.pairs: set[bytes] = set()
        self.completions: set[bytes] = set()
        self.duplicates, self.long, self.empty_prompts = 0, 0, 0
        self.duplicate_lines: list[int] = []
        self.long_lines: list[int] = []
        self.empty_prompt_lines: list[int] = []
        self.no_space = 0
        self.prompt_chars = 0
        self.upper = {"prompt": 0, "completion": 0}
        self.lower = {"prompt": 0, "completion": 0}
        self.any_newline_in_prompt = False
        self.separator_seen = {s: False for s in SEPARATOR_OPTIONS}
        self.stop_seen = {s: False for s in STOP_OPTIONS}
        self.tails: list[str] = []  # each completion's last TAIL_CHARS characters (mid-sentence check)

    def feed(self, ex: dict[str, Any], line: int) -> None:
        r = self.report
        bad = False
        for key in COMPLETION_KEYS:
            if key not in ex:
                r.add_error(f"missing_{key}", line)
                bad = True
            elif not isinstance(ex[key], str):
                r.add_error(f"{key}_not_a_string", line)
                bad = True
        if any(k not in COMPLETION_KEYS for k in ex):
            r.add_error("unrecognized_key", line)
        if bad:
            return
        prompt, completion = ex["prompt"], ex["completion"]
        if completion == "":
            r.add_error("empty_completion", line)
        if prompt == "":
            self.empty_prompts += 1
            if len(self.empty_prompt_lines) < MAX_ERROR_LINES:
                self.empty_prompt_lines.append(line)
        if self.first is None:
            self.first = (prompt, completion)
            self.prompt_suffix = self.prompt_prefix = prompt
            self.completion_suffix = self.completion_prefix = completion
        else:
            self.same_prompts &= prompt == self.first[0]
            self.same_completions &= completion == self.first[1]
            self.prompt_suffix = _common_suffix(self.prompt_suffix, prompt)
            self.prompt_prefix = _common_prefix(self.prompt_prefix, prompt)
            self.completion_suffix = _common_suffix(self.completion_suffix, completion)
            self.completion_prefix = _common_prefix(self.completion_prefix, completion)
        pair = _digest(prompt, completion)
        if pair in self.pairs:
            self.duplicates += 1
            if len(self.duplicate_lines) < MAX_ERROR_LINES:
                self.duplicate_lines.append(line)
        else:
            self.pairs.add(pair)
        self.completions.add(_digest(completion))
        self.tails.append(completion[-TAIL_CHARS:])
        if len(prompt) + len(completion) > LONG_EXAMPLE_CHARS:
            self.long += 1
            if len(self.long_lines) < MAX_ERROR_LINES:
                self.long_lines.append(line)
        if not completion.startswith(" "):
            self.no_space += 1
        self.prompt_chars += len(prompt)
        for key, text in (("prompt", prompt), ("completion", completion)):
            self.upper[key] += sum(1 for c in text if c.isupper())
            self.lower[key] += sum(1 for c in text if c.islower())
        self.any_newline_in_prompt |= "\n" in prompt
        for option, seen in self.separator_seen.items():
            if not seen and option in prompt:
                self.separator_seen[option] = True
        for option, seen in self.stop_seen.items():
            if not seen and option in completion:
                self.stop_seen[option] = True
        self.add_total(self.ntok(prompt) + self.ntok(completion), line)

    def suggested_separator(self) -> str:
        for option in SEPARATOR_OPTIONS:
            if option == " ->" and self.any_newline_in_prompt:
                continue
            if not self.separator_seen[option]:
                return option
        return SEPARATOR_FALLBACK

    def suggested_stop(self) -> str:
        return next((o for o in STOP_OPTIONS if not self.stop_seen[o]), STOP_FALLBACK)

    def task_type(self) -> str:
        # prepare_data's infer_task_type.
        if self.prompt_chars == 0:
            return "open-ended generation"
        if len(self.completions) < self.report.n_examples / 3:
            return "classification"
        return "conditional generation"

    def finish(self, rerun: Callable[[], Iterator[tuple[int, Any]]] | None) -> None:
        r, s = self.report, self.report.stats
        n = r.n_examples
        kind = self.task_type() if self.first else None
        s["task_type"] = kind
        if n < MIN_EXAMPLES:
            r.warnings.append(
                f"only {n:,} prompt-completion pair(s); at least a few hundred are recommended "
                f"(performance tends to rise with every doubling)"
            )
        if self.duplicates:
            r.warnings.append(
                f"{self.duplicates:,} duplicated prompt-completion pair(s) (line "
                f"{', '.join(map(str, self.duplicate_lines))})"
            )
        if self.long:
            r.warnings.append(
                f"{self.long:,} very long example(s) over {LONG_EXAMPLE_CHARS:,} characters "
                f"(line {', '.join(map(str, self.long_lines))})"
            )
        if self.empty_prompts and kind != "open-ended generation":
            r.warnings.append(
                f"{self.empty_prompts:,} empty prompt(s) (line {', '.join(map(str, self.empty_prompt_lines))})"
            )
        for key in COMPLETION_KEYS:
            if self.upper[key] * 2 > self.lower[key] and self.upper[key]:
                r.warnings.append(f"more than a third of the letters in the {key}s are uppercase")
        if self.first is not None and n > 1:
            if self.same_prompts and kind != "open-ended generation":
                r.add_error("all_prompts_identical")
            if self.same_completions:
                r.add_error("all_completions_identical")
        separator, stop = self.suggested_separator(), self.suggested_stop()
        s["suggested_separator"], s["suggested_stop"] = separator, stop
        s["common_prompt_suffix"] = self.prompt_suffix if self.first else ""
        s["common_completion_suffix"] = self.completion_suffix if self.first else ""
        if self.first is not None and kind != "open-ended generation":
            self._ending_checks(rerun, separator, stop)
        stop_suffix = self.completion_suffix if self.first is not None and not self.same_completions else ""
        # Mid-sentence with and without a stop (the common ending, or a usual stop sequence that
        # some completions lack): "done. END" is fine, "and so END" and "and so" are not.
        stops = tuple(x for x in (stop_suffix, *STOP_OPTIONS, STOP_FALLBACK, " STOP") if x.strip())
        mid = sum(ends_mid_sentence(t) and all(ends_mid_sentence(t.removesuffix(x)) for x in stops if t.endswith(x))
                  for t in self.tails)
        s["n_mid_sentence"] = mid
        if mid and kind != "classification":
            r.warnings.append(mid_sentence_warning(mid, n))
        self.tails = []
        if self.first is not None and self.no_space:
            r.warnings.append(
                f"{self.no_space:,} completion(s) do not start with a space; "
                f"a leading space tokenizes better"
            )
        self.finish_common()

    def _ending_checks(self, rerun: Callable[[], Iterator[tuple[int, Any]]] | None,
                       separator: str, stop: str) -> None:
        r = self.report
        if len(self.prompt_prefix) > 12 and not self.same_prompts:
            r.warnings.append(
                f"all prompts start with `{show(self.prompt_prefix[:40])}`; fine-tuning needs no "
                f"instruction in the prompt, only the input data"
            )
        if len(self.completion_prefix) >= 5 and not self.same_completions:
            r.warnings.append(
                f"all completions start with `{show(self.completion_prefix[:40])}`; "
                f"put only the output in the completion"
            )
        # The markers, as the export names them: not the text's last words before them.
        psuf, csuf = marker(self.prompt_suffix), marker(self.completion_suffix)
        if psuf and not self.same_prompts:
            r.notes.append(f"all prompts end with the separator `{show(psuf)}`")
            if len(psuf) > 10:
                r.warnings.append(f"the common prompt ending `{show(psuf)}` is long; "
                                  f"a short separator such as `{show(separator)}` is better")
        elif not self.same_prompts:
            r.warnings.append(
                f"no common separator at the end of the prompts; append one such as `{show(separator)}`"
            )
        if csuf and not self.same_completions:
            r.notes.append(f"all completions end with the stop `{show(csuf)}`")
        elif self.task_type() != "classification" and not self.same_completions:
            r.warnings.append(
                f"no common ending (stop sequence) on the completions; append one such as `{show(stop)}`"
            )
        if rerun is None or not (psuf or csuf):
            return
        # A separator or stop met inside the text would cut examples short: a second pass.
        twice = {"prompt": 0, "completion": 0}
        for _line, ex in rerun():
            if isinstance(ex, dict):
                p, c = ex.get("prompt"), ex.get("completion")
                if psuf and isinstance(p, str) and psuf in p[: -len(psuf)]:
                    twice["prompt"] += 1
                if csuf and isinstance(c, str) and csuf in c[: -len(csuf)]:
                    twice["completion"] += 1
        if twice["prompt"]:
            r.warnings.append(f"{twice['prompt']:,} prompt(s) contain the separator `{show(psuf)}` more than once")
        if twice["completion"]:
            r.warnings.append(f"{twice['completion']:,} completion(s) contain the stop `{show(csuf)}` more than once")


def _detect(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return CHAT
    if "prompt" in obj or "completion" in obj:
        return COMPLETION
    return CHAT


def _run(items: Iterable[tuple[int, Any]], *, path: str | None, model: str | None,
         rerun: Callable[[], Iterator[tuple[int, Any]]] | None = None) -> ValidationReport:
    """items: (line number, parsed object or a _BadJson marker)."""
    report = ValidationReport(path=path, format=UNKNOWN, model=model or DEFAULT_CHAT_MODEL)
    checker: _ChatChecker | _CompletionChecker | None = None
    for line, obj in items:
        report.n_lines += 1
        if isinstance(obj, _BadJson):
            report.add_error("invalid_json", line)
            continue
        if isinstance(obj, _TooLong):
            if "line_too_long" not in report.errors:
                report.warnings.append(
                    f"line {line} is longer than {MAX_LINE_BYTES:,} bytes, more than any example "
                    f"can be; it was skipped unread")
            report.add_error("line_too_long", line)
            continue
        if checker is None and (fmt := _detect(obj)):
            checker = (_ChatChecker if fmt == CHAT else _CompletionChecker)(report, model)
            checker.start(fmt)
        if not isinstance(obj, dict):
            report.add_error("data_type", line)
            continue
        report.n_examples += 1
        checker.feed(obj, line)  # type: ignore[union-attr]
    if checker is None:
        checker = _ChatChecker(report, model)
        checker.start(CHAT)
        report.format = UNKNOWN
    checker.finish(rerun)
    return report


class _BadJson:
    __slots__ = ()


_BAD = _BadJson()


class _TooLong:
    __slots__ = ()


_TOO_LONG = _TooLong()
_SKIP_CHUNK = 1024 * 1024


def _lines(fh: Any) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of each line, never holding more than MAX_LINE_BYTES of
    one: a longer line is read past in chunks and given as None."""
    lineno = 0
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            del raw
            while (rest := fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None
            continue
        yield lineno, raw


def _iter_file(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in _lines(fh):
            if raw is None:
                yield lineno, _TOO_LONG
                continue
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not examples
            try:
                yield lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
                yield lineno, _BAD


def _has_content(fh: Any) -> bool:
    """Whether a file has any non-blank byte, read in chunks (one huge line is fine)."""
    while chunk := fh.read(64 * 1024):
        if chunk.strip():
            return True
    return False


def validate_file(path: str | Path, model: str | None = None) -> ValidationReport:
    """Validate a JSONL file in constant memory; ValidationInputError when the
    file is missing, unreadable or has no lines at all."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ValidationInputError(f"{path}: is a directory, not a JSONL file")
        with path.open("rb") as fh:
            if not _has_content(fh):
                raise ValidationInputError(f"{path}: file is empty")
    except FileNotFoundError:
        raise ValidationInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValidationInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _run(_iter_file(path), path=str(path), model=model, rerun=lambda: _iter_file(path))


def validate_examples(examples: Iterable[Any], model: str | None = None) -> ValidationReport:
    """Validate already-parsed examples (e.g. an upload the server holds in memory).
    Examples are numbered from 1 as if they were lines."""
    seq = examples if isinstance(examples, (list, tuple)) else None
    rerun = (lambda: iter(enumerate(seq, start=1))) if seq is not None else None
    return _run(enumerate(examples, start=1), path=None, model=model, rerun=rerun)
