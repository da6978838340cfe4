"""Fine-tuning hyperparameter defaults: the one rule, used by the local trainer and
by the cost estimate alike (they must agree on how many epochs "auto" means)."""

from __future__ import annotations

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100  # examples × epochs at least this…
MAX_TARGET_EXAMPLES = 25_000  # …and at most this
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def default_epochs(n_examples: int) -> int:
    """OpenAI's rule: 3 epochs, more for small files (examples × epochs ≥ 100, at most
    25), fewer for large ones (≤ 25,000, at least 1)."""
    if n_examples <= 0:
        return TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS
