"""User-facing errors: each carries a one-line message that names the problem and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, line, field, option); the CLI prints it as one line, exit 2."""
