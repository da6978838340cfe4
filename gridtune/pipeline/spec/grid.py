"""The grid: a prompt template with {variables}, each with a list of values.

Parsing and checking a spec, rendering prompts, and expanding the cartesian
product. Cells are identified by their variable values (``cell_key``), never by
position, so an edited grid keeps every completion whose cell still exists.
"""

from __future__ import annotations

import itertools
import json
import math
import string
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...core.chat import chat_messages
from ...core.errors import GridtuneError
from .options import GENERATION, SPEC_SETTINGS, OptionError, check_all

DEFAULT_MAX_CELLS = 100_000  # completions (cells x samples) a spec may have unless max_cells says more
MAX_COMPLETIONS = 1_000_000  # the hard ceiling: max_cells cannot lift a grid past it

Value = str | int | float


class GridError(GridtuneError, ValueError):
    """A spec problem, with a one-line message that names the culprit."""


@dataclass
class GenerationSettings:
    """The spec's [generation] defaults (bounds and help: ``options.GENERATION``)."""

    model: str | None = GENERATION["model"].default  # None: the backend's default model
    temperature: float = GENERATION["temperature"].default
    max_tokens: int = GENERATION["max_tokens"].default
    samples: int = GENERATION["samples"].default
    top_p: float | None = GENERATION["top_p"].default
    seed: int | None = None


@dataclass
class GridSpec:
    name: str
    generation: str
    variables: dict[str, list[Value]]
    training: str | None = None  # None: same as generation
    system: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    max_cells: int = DEFAULT_MAX_CELLS

    # -- templates -------------------------------------------------------
    @property
    def training_template(self) -> str:
        return self.training if self.training else self.generation

    def templates(self) -> dict[str, str]:
        out = {"generation": self.generation, "training": self.training_template}
        if self.system:
            out["system"] = self.system
        return out

    @property
    def cell_count(self) -> int:
        return math.prod(len(v) for v in self.variables.values()) if self.variables else 1

    def check(self) -> None:
        """Raise GridError naming the first problem, or return None."""
        if not self.name or not str(self.name).strip():
            raise GridError("spec: name is empty")
        if not self.generation or not self.generation.strip():
            raise GridError("spec: [prompt] generation template is empty")
        used: set[str] = set()
        for which, template in self.templates().items():
            for name in placeholders(template, which):
                if name not in self.variables:
                    raise GridError(
                        f"{which} template: placeholder {{{name}}} has no variable "
                        f"(variables: {', '.join(self.variables) or 'none'})"
                    )
                used.add(name)
        for var, values in self.variables.items():
            if not var.isidentifier():
                raise GridError(f"variable {var!r}: name must be an identifier")
            if var not in used:
                raise GridError(f"variable {var!r} is used by no template")
            if not isinstance(values, list):
                raise GridError(f"variable {var!r}: values must be a list")
            if not values:
                raise GridError(f"variable {var!r} has an empty value list")
            seen: dict[str, Value] = {}
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise GridError(
                        f"variable {var!r}: value {value!r} must be a string or a number"
                    )
                text = render_value(value)
                if text in seen:
                    raise GridError(f"variable {var!r}: duplicate value {value!r}")
                seen[text] = value
        s = self.settings
        try:  # the bounds every form and flag of these settings shares
            check_all(GENERATION, {k: getattr(s, k) for k in SPEC_SETTINGS}, prefix="[generation] ")
        except OptionError as exc:
            raise GridError(str(exc)) from None
        limit = min(self.max_cells, MAX_COMPLETIONS)
        size = self.cell_count * s.samples  # exact integers: no overflow, and nothing is expanded
        if size > limit:
            what = (f"{self.cell_count:,} cells" if s.samples == 1 else
                    f"{self.cell_count:,} cells x {s.samples:,} samples = {size:,} completions")
            how = ("set max_cells in the spec to raise it" if limit < MAX_COMPLETIONS else
                   "this is the hard ceiling; split the grid into several projects")
            raise GridError(f"grid has {what}, over the limit of {limit:,} "
                            f"({how}, up to {MAX_COMPLETIONS:,} completions)")

    # -- cells -------------------------------------------------------------
    def cells(self) -> Iterator[dict[str, Value]]:
        names = list(self.variables)
        for combo in itertools.product(*(self.variables[n] for n in names)):
            yield dict(zip(names, combo, strict=True))

    def render(self, values: dict[str, Value]) -> RenderedPrompt:
        return RenderedPrompt(
            system=render(self.system, values) if self.system else None,
            generation=render(self.generation, values),
            training=render(self.training_template, values),
        )

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridSpec:
        data = dict(data)
        settings = GenerationSettings(**data.pop("settings", {}))
        return cls(settings=settings, **data)

    @classmethod
    def from_json(cls, text: str) -> GridSpec:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class RenderedPrompt:
    system: str | None
    generation: str
    training: str

    def generation_messages(self) -> list[dict[str, str]]:
        """What the generating model is sent."""
        return chat_messages(self.generation, self.system)

    def training_messages(self) -> list[dict[str, str]]:
        """What a tuned model sees: its training examples' (and the playground's) prompt."""
        return chat_messages(self.training, self.system)


def render_value(value: Value) -> str:
    return value if isinstance(value, str) else str(value)


def placeholders(template: str, which: str = "template") -> list[str]:
    """The variable names a template uses, in order; GridError on bad syntax."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # "Single '}' encountered in format string", ...
        raise GridError(f"{which} template: unbalanced braces ({exc}); "
                        f"write {{{{ or }}}} for a literal brace") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "":
            raise GridError(f"{which} template: empty placeholder {{}}; name a variable")
        if not name.isidentifier():
            raise GridError(f"{which} template: placeholder {{{name}}} is not a variable name")
        if spec or conversion:
            raise GridError(f"{which} template: placeholder {{{name}}} may not have a format or conversion")
        names.append(name)
    return names


def render(template: str, values: dict[str, Value]) -> str:
    # str.format never re-reads substituted text, so braces inside values survive.
    return template.format_map({k: render_value(v) for k, v in values.items()})


def cell_key(values: dict[str, Value]) -> str:
    """The identity of a cell: its variable values, canonical JSON."""
    return json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


_SPEC_KEYS = {"name", "prompt", "variables", "generation", "max_cells"}
_PROMPT_KEYS = {"system", "generation", "training"}
_GEN_KEYS = {"model", "temperature", "max_tokens", "samples", "top_p", "seed"}


def parse_spec(text: str, source: str = "spec") -> GridSpec:
    """Parse and check a TOML grid spec; GridError with a one-line message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise GridError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    prompt = data.get("prompt")
    if not isinstance(prompt, dict) or not prompt.get("generation"):
        raise GridError(f"{source}: [prompt] needs a generation template")
    unknown = set(prompt) - _PROMPT_KEYS
    if unknown:
        raise GridError(f"{source}: unknown key(s) in [prompt]: {', '.join(sorted(unknown))}")
    for key in _PROMPT_KEYS & set(prompt):
        if not isinstance(prompt[key], str):
            raise GridError(f"{source}: [prompt] {key} must be a string")
    variables = data.get("variables")
    if not isinstance(variables, dict) or not variables:
        raise GridError(f"{source}: [variables] needs at least one variable")
    gen = data.get("generation", {})
    if not isinstance(gen, dict):
        raise GridError(f"{source}: [generation] must be a table")
    unknown = set(gen) - _GEN_KEYS
    if unknown:
        raise GridError(f"{source}: unknown key(s) in [generation]: {', '.join(sorted(unknown))}")

    def setting(key: str, kind: type, default: Any) -> Any:
        if key not in gen:
            return default
        value = gen[key]
        if kind is str:
            ok, need = isinstance(value, str) and bool(value.strip()), "a model name (a string)"
        elif kind is int:  # 1.5 samples or `true` max_tokens is a mistake, not a 1
            ok, need = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        else:
            ok, need = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        if not ok:
            raise GridError(f"{source}: [generation] {key} must be {need}, not {value!r}")
        return float(value) if kind is float else value

    settings = GenerationSettings(
        model=setting("model", str, None),
        temperature=setting("temperature", float, GENERATION["temperature"].default),
        max_tokens=setting("max_tokens", int, GENERATION["max_tokens"].default),
        samples=setting("samples", int, GENERATION["samples"].default),
        top_p=setting("top_p", float, None),
        seed=setting("seed", int, None),
    )
    max_cells = data.get("max_cells", DEFAULT_MAX_CELLS)
    if not isinstance(max_cells, int) or isinstance(max_cells, bool) or max_cells < 1:
        raise GridError(f"{source}: max_cells must be a positive integer")
    if max_cells > MAX_COMPLETIONS:
        raise GridError(f"{source}: max_cells {max_cells:,} is over the hard limit of {MAX_COMPLETIONS:,} "
                        f"completions a project can hold")
    spec = GridSpec(
        name=str(data.get("name") or Path(source).stem),
        system=prompt.get("system") or None,
        generation=prompt["generation"],
        training=prompt.get("training") or None,
        variables={str(k): v for k, v in variables.items()},
        settings=settings,
        max_cells=max_cells,
    )
    spec.check()
    return spec


def load_spec(path: str | Path) -> GridSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GridError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"{path}: cannot read spec: {exc}") from None
    return parse_spec(text, str(path))


def demo_spec() -> GridSpec:
    """The recipe's 4x4x4x4 AGI-scenario grid, used for the demo project.

    Sized for the default local model on a 2-core CPU: a short, three-sentence scenario
    at temperature 0.7 makes SmolLM2-135M-Instruct end its answers on its own (through the
    local server, 62 of 64 cells stopped by themselves, median 94 tokens, mean 103), so
    max_tokens 300 is a bound that seldom cuts, and the 256 cells are ~30k tokens: minutes,
    not hours. (The recipe's "detailed scenario" at temperature 1 ran to max_tokens in 14
    of 16 cells.)
    """
    return GridSpec(
        name="agi-scenarios",
        system="You are a careful futurist. Keep every answer under 80 words.",
        generation=(
            "Write a short scenario, three sentences long: artificial general intelligence is reached "
            "in {place} in {year}. Say how it changes {parameter_one}, then how it changes {parameter_two}."
        ),
        training="AGI scenario. Place: {place}. Year: {year}. Parameters: {parameter_one}, {parameter_two}.",
        variables={
            "place": ["Tokyo", "Lagos", "Oslo", "Lima"],
            "year": [2030, 2035, 2040, 2050],
            "parameter_one": ["healthcare", "education", "energy", "finance"],
            "parameter_two": ["employment", "privacy", "art", "warfare"],
        },
        settings=GenerationSettings(temperature=0.7, max_tokens=300, samples=1),
    )


def is_number(v: Value) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coerce_values(spec: GridSpec, raw: dict[str, str]) -> dict[str, Value]:
    """Typed text back into grid values: a number where the variable's values are
    numbers and the text parses as one, else the text (stripped)."""
    out: dict[str, Value] = {}
    for name, values in spec.variables.items():
        text = (raw.get(name) or "").strip()
        value: Value = text
        if text and values and all(is_number(v) for v in values):
            try:
                value = int(text) if all(isinstance(v, int) for v in values) else float(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        out[name] = value
    return out
