"""What every `gridtune` command shares: opening projects and turning problems
into one-line messages with the exit codes DESIGN.md gives.

0 success; 1 the work ran but something failed; 2 bad usage or bad input.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ..core.errors import GridtuneError
from ..pipeline.spec.options import Option, OptionError
from ..store import Store, describe_sqlite_error

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Problem(GridtuneError):
    """Bad usage or bad input: exit 2 with this message."""

    exit_code = EXIT_USAGE


class Failed(GridtuneError):
    """The work ran but something failed: exit 1 with this message."""

    exit_code = EXIT_FAILED


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"gridtune: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Map known problems to a one-line message and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GridtuneError as exc:  # every error gridtune expects: its one line, its exit code
            fail(str(exc), exc.exit_code)
        except sqlite3.Error as exc:  # locked, read-only, disk full, damaged: one line, exit 2
            fail(describe_sqlite_error(exc, kwargs.get("project")), EXIT_USAGE)
        except OSError as exc:  # a file that cannot be read or written
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}", EXIT_USAGE)
        except KeyboardInterrupt:
            click.echo("gridtune: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def open_store(path: str | Path) -> Store:
    return Store.open(path)


def emit_json(obj: dict[str, Any]) -> None:
    """Every --json output is one JSON object on stdout."""
    click.echo(json.dumps(obj, ensure_ascii=False, sort_keys=True))


def setting_option(option: Option, *decls: str, **overrides: Any) -> Callable[[F], F]:
    """A click option for a setting of ``pipeline.options``: its flag, type, default
    and help from the one definition, and its bounds checked as the spec and the
    forms check them (out of bounds: one line, exit 2). ``decls`` add short
    flags; ``overrides`` replace what this command says differently (its help)."""

    def check(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return option.check(value, option.flag)
        except OptionError as exc:
            fail(str(exc))

    bounds = f" ({option.bounds()})" if option.hi is not None else ""  # lower bounds go without saying
    kwargs: dict[str, Any] = {
        "type": option.type, "default": option.default, "help": option.help + bounds,
        "show_default": option.default is not None, "callback": check,
    }
    return click.option(option.flag, *decls, option.name, **(kwargs | overrides))
