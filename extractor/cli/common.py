"""What every command shares: one-line user errors, exit codes, the model and text options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from extractor.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
INTERRUPTED = 130  # the shell's exit code for a process stopped by SIGINT (128 + 2)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def user_errors(command: F) -> F:
    """Turn user mistakes into one line on stderr and exit code 2 (never a traceback), and so a write that the
    disk or the file system refused; Ctrl-C into `error: interrupted` (130)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            where = f" '{exc.filename}'" if exc.filename else ""
            raise fail(f"could not write{where} ({exc.strerror or exc})") from None
        except KeyboardInterrupt:
            # Typer would exit 130 silently; say why the command stopped, in the same one-line form.
            raise fail("interrupted", INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


ModelOption = Annotated[str, typer.Option("--model", "-m", metavar="MODEL", help="Hub id, save_pretrained folder, or 'minilm' (bundled, offline).")]
TextOption = Annotated[list[str], typer.Option("--text", "-t", metavar="TEXT", help="A text to analyse; repeat for several.")]


def checked_texts(texts: list[str]) -> list[str]:
    if not texts:
        raise UserError("give at least one --text")
    for i, text in enumerate(texts, start=1):
        if not text.strip():
            raise UserError(f"--text number {i} is empty; give a text with at least one word")
    return texts
