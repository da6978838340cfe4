"""Every setting a person can give, defined once: name, type, bounds, default, help.

The command line builds its click options from these (``cli/common.setting_option``),
the settings forms parse what is typed with them, and the grid spec and the run
options check their values with them, so a bound is written in one place and
every message about it reads the same::

    GENERATION["temperature"].parse("1.5")   # 1.5
    GENERATION["temperature"].parse("3")     # OptionError: temperature must be within 0..2, not 3
    GENERATION["max_tokens"].check(0, "--max-tokens")
                                             # OptionError: --max-tokens must be at least 1, not 0

Which settings a run takes, and where they are kept: a run's model, temperature,
max tokens, limits and budget (``max_cost``) are passed per run (``GenerateOptions``,
from the command line's flags or the generate screen's form) and recorded on the
run; the grid spec's ``[generation]`` table holds the defaults a run starts from,
and changes only when a person saves it as such (the grid spec itself, or
``ctrl+s`` in the generate screen's form). ``samples`` belongs to the grid: it sets
how many completions each cell has, so it is saved with the spec, never per run.
The limits (``concurrency``, ``rpm``, ``tpm``, ``limit``) and the budget are a
run's only: the spec never holds them, so ``--save-defaults`` and ``ctrl+s`` leave
them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...core.errors import GridtuneError

NONE_WORDS = ("", "none", "-", "off", "auto")
"""What a form may hold for a setting that can be left unset."""


class OptionError(GridtuneError, ValueError):
    """A setting out of its bounds or of the wrong type; a one-line message naming it."""


@dataclass(frozen=True)
class Option:
    """One setting. ``lo``/``hi`` bound it (``lo_open``/``hi_open``: the bound itself
    is excluded); ``default`` None means it may be left unset (``unset`` says what
    that means). ``must_be`` words what a value must be where the bounds alone would
    not say it ("a positive amount in USD"); every message about it then says that."""

    name: str
    type: type  # int, float or str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""
    unset: str = ""  # what leaving it unset means, in a word or two ("auto", "none")
    must_be: str = ""  # what a value must be, in words, instead of its kind and bounds

    @property
    def flag(self) -> str:
        """The command line's name: ``--max-tokens``."""
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """The form's name: ``max tokens``."""
        return self.name.replace("_", " ")

    @property
    def optional(self) -> bool:
        return self.default is None

    def bounds(self) -> str:
        """The bounds in words: ``within 0..2``, ``at least 1``, ``positive``, ``in [0, 1)``
        (``must_be`` instead, where it is given)."""
        if self.must_be:
            return self.must_be
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.lo_open or self.hi_open:
                return f"in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
            return f"within {lo:g}..{hi:g}"
        if lo is not None:
            if self.lo_open:
                return "positive" if lo == 0 else f"more than {lo:g}"
            return "0 or more" if lo == 0 else f"at least {lo:g}"
        if hi is not None:
            return f"under {hi:g}" if self.hi_open else f"at most {hi:g}"
        return ""

    def check(self, value: Any, name: str | None = None, error: Callable[[str], GridtuneError] | None = None) -> Any:
        """``value`` if it is within bounds; else OptionError naming ``name`` (default:
        the setting's own name; the CLI passes its flag, the spec its table), or
        ``error`` with the same message where a stage raises its own error class."""
        if error is not None:
            try:
                return self.check(value, name)
            except OptionError as exc:
                raise error(str(exc)) from None
        name = name or self.name
        if self.type is str:
            if not isinstance(value, str) or not value.strip():
                raise OptionError(f"{name} must be a non-empty name, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{name} must be {self.must_be or self._kind()}, not {value!r}")
        if self.type is int and not float(value).is_integer():
            raise OptionError(f"{name} must be {self.must_be or self._kind()}, not {value!r}")
        if not self._within(value):
            raise OptionError(f"{name} must be {self.bounds()}, not {value}")
        return value

    def parse(self, text: str, name: str | None = None) -> Any:
        """A value typed in a form or on a command line, converted and checked.
        An optional setting left empty (or "none", "auto", "-") is None."""
        name = name or self.label
        raw = text.strip()
        if self.optional and raw.lower() in NONE_WORDS:
            return None
        if self.type is str:
            return self.check(raw, name)
        if not raw:
            raise OptionError(f"{name}: give {self.must_be or f'{self._kind()} ({self.bounds()})'}")
        try:
            value = int(raw) if self.type is int else float(raw)
        except ValueError:
            need = self.must_be or f"{self._kind()} {self.bounds()}"
            raise OptionError(f"{name} must be {need}, not {raw!r}") from None
        try:
            return self.check(value, name)
        except OptionError:
            raise OptionError(f"{name} must be {self.bounds()}, not {raw}") from None

    def format(self, value: Any) -> str:
        """A value as a form shows it (unset: empty, the placeholder says what it means)."""
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def _kind(self) -> str:
        return {int: "a whole number", float: "a number"}.get(self.type, "a name")

    def _within(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


def _table(*options: Option) -> Mapping[str, Option]:
    return {o.name: o for o in options}


GENERATION: Mapping[str, Option] = _table(
    # What the teacher is asked with: the spec's [generation] defaults, overridable per run.
    Option("model", str, None, "the teacher model (default: the spec's, else the backend's)",
           unset="backend default"),
    Option("temperature", float, 1.0, "sampling temperature", lo=0, hi=2),
    Option("max_tokens", int, 600, "the longest a completion may be", lo=1, unit="tokens"),
    Option("top_p", float, None, "nucleus sampling: keep the tokens within this probability mass", lo=0, hi=1),
    Option("samples", int, 1, "completions per cell (the grid's; saved with the spec)", lo=1),
    # How a run goes: per run only.
    Option("concurrency", int, None, "requests in flight at once (default: as many as the server decodes "
           "at once, else 8)", lo=1, unset="auto"),
    Option("rpm", float, None, "at most N requests in any 60 seconds", lo=0, lo_open=True, unit="requests/min",
           unset="none"),
    Option("tpm", float, None, "at most N tokens (prompt + max_tokens) in any 60 seconds", lo=0, lo_open=True,
           unit="tokens/min", unset="none"),
    Option("max_cost", float, None, "stop cleanly before the run could spend more than this many US dollars "
           "(a priced model only; unset: no budget)", lo=0, lo_open=True, unit="USD", unset="none",
           must_be="a positive amount in USD"),
    Option("limit", int, None, "generate at most N completions", lo=0, unset="all"),
    Option("timeout", float, 120.0, "seconds per request; when streaming, seconds without a new token", lo=0,
           lo_open=True, unit="s"),
    Option("max_attempts", int, 6, "tries per completion on transient errors", lo=1),
    Option("top_up", int, None, "first add samples to exactly the cells needed so every value and pair has "
           "N kept examples", lo=1),
)
"""The generation settings, by the name the spec and ``GenerateOptions`` use."""

EXPORT: Mapping[str, Option] = _table(
    Option("min_grade", int, None, "keep only completions graded at least N (0..5)", lo=0, hi=5, unset="any"),
    Option("validation_fraction", float, 0.0, "put this deterministic fraction in [0, 1) into "
           "FILE-stem.valid.jsonl", lo=0, hi=1, hi_open=True),
)
"""The export's settings (the CLI's ``export`` and the export screen's form)."""

FINETUNE: Mapping[str, Option] = _table(
    Option("epochs", int, None, "epochs (default: auto, from the number of examples)", lo=1, hi=50, unset="auto"),
)
"""The fine-tuning job's settings (``finetune`` and the export screen's form)."""

EVALUATION: Mapping[str, Option] = _table(
    Option("samples", int, 3, "answers per prompt and model", lo=1),
    Option("grade", int, 5, "the grade an answer promoted into the training data gets", lo=1, hi=5),
)
"""The evaluation's settings (``eval``, ``scaling``, ``promote`` and the screens that run them)."""

SPEC_SETTINGS = ("model", "temperature", "max_tokens", "top_p", "samples")
"""The settings a grid spec's [generation] table holds (``seed`` besides, unbounded)."""


def check_all(table: Mapping[str, Option], values: Mapping[str, Any], prefix: str = "") -> None:
    """Check every set value of ``values`` that ``table`` defines; OptionError for the
    first one out of bounds, named ``prefix + name``."""
    for name, value in values.items():
        option = table.get(name)
        if option is not None and value is not None:
            option.check(value, prefix + name)
