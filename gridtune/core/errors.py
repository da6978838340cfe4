"""Errors as a person reads them: one line, never a traceback."""

from __future__ import annotations


class GridtuneError(Exception):
    """Every error gridtune expects: its message is the one line a user sees, and
    ``exit_code`` what the command line exits with (DESIGN.md: 2 bad usage or bad
    input, nothing written; 1 the work ran but something failed). The command line
    maps this class once; anything else reaching it is a bug."""

    exit_code = 2


def fold(text: str) -> str:
    """``text`` on one line: line breaks and runs of white space become one space."""
    return " ".join(text.split())


def one_line(exc: BaseException, *, with_type: bool = False, whole: bool = False) -> str:
    """The first line of ``exc``'s message (its type name when it has none).

    ``with_type`` prefixes the type name, for errors whose message alone says
    too little (a KeyError's bare key, an OSError from deep inside a library).
    ``whole`` keeps every line of the message, folded onto one (for messages
    whose later lines carry the reason, as SQLite's and a trainer's may).
    """
    if whole:
        first = fold(str(exc))
    else:
        lines = str(exc).strip().splitlines()
        first = lines[0].strip() if lines else ""
    if with_type:
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return first or type(exc).__name__
