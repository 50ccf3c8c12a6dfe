"""User-facing errors: each carries a one-line message that names the problem and how to fix it."""

from __future__ import annotations

import reprlib

QUOTE_LIMIT = 200  # most characters of one user-given value that an error line repeats


class UserError(Exception):
    """A mistake in the user's input (file, line, field, option); the CLI prints it as one line, exit 2."""


def _bounded_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()
    bounded.maxlevel = 3
    bounded.maxdict = bounded.maxlist = bounded.maxtuple = bounded.maxset = 10
    bounded.maxstring = bounded.maxother = bounded.maxlong = QUOTE_LIMIT
    return bounded


_REPR = _bounded_repr()


def shortened(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text`, cut to `limit` characters with the full length said, so one error line stays readable."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def quoted(value: object) -> str:
    """repr(value) for an error line, at most about QUOTE_LIMIT characters. It is built piece by piece, so a
    huge value (a YAML alias bomb expands to hundreds of megabytes) is never rendered whole."""
    return shortened(_REPR.repr(value))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none, like EOFError's), for
    quoting a library's error in one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
