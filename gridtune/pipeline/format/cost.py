"""Prices and context lengths, read from prices.toml (the default-epochs rule is
gridtune.core.hyperparams', shared with the local trainer).

The table is data so a price change is a one-line edit, not a code change.
Imports nothing from the store or the UI.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ...core.hyperparams import default_epochs as default_epochs  # the estimate's callers find it here

PER = 1_000_000  # prices are per 1M tokens
_SNAPSHOT = re.compile(r"^(.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4})$")  # -2024-07-18 or -0125


@dataclass(frozen=True)
class ModelPrice:
    name: str  # the table's key the model resolved to
    training: float
    input: float
    output: float
    ft_input: float
    ft_output: float
    context_length: int


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    text = (resources.files(__package__) / "prices.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def default_context_length() -> int:
    return int(_table()["default_context_length"])


def _is_local(name: str) -> bool:
    return "smollm" in name or name.startswith(("local", "gridtune"))


def resolve(model: str | None) -> tuple[ModelPrice | None, bool]:
    """(price row, fine_tuned) for a model name; (None, ...) when unknown.

    Accepts dated snapshots and plain aliases, any case, and fine-tuned names
    (``ft:gpt-4o-mini-2024-07-18:org::id``) which resolve to their base model.
    """
    if not model:
        return None, False
    name = model.strip().lower()
    fine_tuned = name.startswith("ft:")
    if fine_tuned:
        name = name[3:].split(":", 1)[0]
    table = _table()
    models, aliases = table["models"], table.get("aliases", {})
    key = name if name in models else aliases.get(name)
    if key is None and _is_local(name):
        key = "local"
    if key is None and (m := _SNAPSHOT.match(name)):
        # A dated snapshot we don't list (gpt-4o-mini-2025-01-01): price it as its family.
        base = m.group(1)
        key = base if base in models else aliases.get(base)
    if key is None:
        return None, fine_tuned
    row = models[key]
    return ModelPrice(
        name=key,
        training=float(row["training"]),
        input=float(row["input"]),
        output=float(row["output"]),
        ft_input=float(row.get("ft_input", row["input"])),
        ft_output=float(row.get("ft_output", row["output"])),
        context_length=int(row.get("context_length", default_context_length())),
    ), fine_tuned


def price_for(model: str | None) -> ModelPrice | None:
    return resolve(model)[0]


def context_length(model: str | None) -> int:
    """The most tokens one training example may have for this model."""
    price = price_for(model)
    return price.context_length if price else default_context_length()


def training_cost(model: str | None, billed_tokens_per_epoch: int, epochs: int) -> float | None:
    """USD to fine-tune ``model`` on a file, None when its price is unknown."""
    price = price_for(model)
    if price is None:
        return None
    return price.training * billed_tokens_per_epoch * epochs / PER


def generation_cost(model: str | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD for calls to ``model`` (a fine-tuned model at its own rates); None if unknown."""
    price, fine_tuned = resolve(model)
    if price is None:
        return None
    rate_in, rate_out = (price.ft_input, price.ft_output) if fine_tuned else (price.input, price.output)
    return (rate_in * prompt_tokens + rate_out * completion_tokens) / PER


# -- which models a training cost line may name (issue 9) ---------------------------
CURRENT_TUNABLE_MODEL = "gpt-4o-mini-2024-07-18"  # named instead of a retired one


def prices_as_of() -> str:
    """The date of the price table's newest figures (prices.toml ``prices_as_of``)."""
    return str(_table().get("prices_as_of", "unknown date"))


def tunable(model: str | None) -> bool:
    """Whether OpenAI still takes fine-tuning jobs for ``model`` (the table's ``tunable``)."""
    price = price_for(model)
    return bool(price and _table()["models"][price.name].get("tunable", False))


def tunable_price(model: str | None) -> ModelPrice | None:
    """The price row for training ``model``: None when it is unknown or retired
    (a retired model cannot be tuned, so a cost for it would mean nothing)."""
    return price_for(model) if tunable(model) else None


def retired(model: str | None) -> bool:
    """Whether OpenAI no longer serves ``model`` (the table's ``[retired]``)."""
    return bool(model) and str(model).strip().lower() in _table().get("retired", {})


def shutdown(model: str | None) -> str | None:
    """The date OpenAI shuts ``model`` down (YYYY-MM-DD), where the table knows it."""
    price = price_for(model)
    return _table()["models"][price.name].get("shutdown") if price else None


def tunable_models() -> list[str]:
    """The snapshots OpenAI still fine-tunes, in the table's order."""
    return [name for name, row in _table()["models"].items() if row.get("tunable") and name != "local"]


def price_note(model: str | None, *, legacy_format: bool = False) -> str | None:
    """Why a training cost line has no price, or None when ``model`` is priced."""
    if tunable(model):
        return None
    price = price_for(model)
    if price is None and not retired(model):
        return f"no price known for {model}"
    if legacy_format:
        return (f"{model} is retired and no current model fine-tunes on the legacy prompt/completion "
                f"format: none can be priced (export --format chat for {CURRENT_TUNABLE_MODEL})")
    return f"{model} can no longer be fine-tuned: none priced (e.g. {CURRENT_TUNABLE_MODEL} can)"


def usd(amount: float) -> str:
    """Dollars as a person reads them: ``$5``, ``$1,234.50``, ``$0.00005`` (never ``5e-05``);
    the one formatter for a price, an estimate or a budget."""
    if amount >= 1:
        return "$" + f"{amount:,.2f}".removesuffix(".00")
    return "$" + (f"{amount:.6f}".rstrip("0").rstrip(".") if amount >= 5e-7 else "0")


def budget_text(max_cost: float, most: float, requests: int) -> str | None:
    """A run's budget in one line (80 columns): what its work could cost at most
    (``most`` for ``requests`` requests), and whether the run stops before passing
    ``max_cost``; None with no work. The generate screen shows it as is; the command
    line's ``generate.budget_line`` adds the max_tokens it assumes."""
    if not requests:
        return None
    head = f"max cost {usd(max_cost)}: up to {usd(most)} for {requests:,} request{'s' * (requests != 1)}"
    return head + (", within it" if most <= max_cost else "; stops short of it")
