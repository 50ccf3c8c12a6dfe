"""Command line: `extractor verify | explain | run | query | plot | compare | report`.

User mistakes (bad model, file, field, option) print one line `error: ...` on stderr and exit 2;
a verification failure exits 1.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from .adapters import UnsupportedModelError
from .errors import UserError
from .models import ModelLoadError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract, verify and compare every attention head of a pretrained transformer.",
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
USER_ERRORS = (UserError, ModelLoadError, UnsupportedModelError)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def user_errors(command: F) -> F:
    """Turn user mistakes into one line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


ModelOption = Annotated[str, typer.Option("--model", "-m", help="Hub id, save_pretrained folder, or 'minilm' (bundled, offline).")]
TextOption = Annotated[list[str], typer.Option("--text", "-t", help="A text to analyse; repeat for several.")]
AtolOption = Annotated[float, typer.Option("--atol", help="Absolute tolerance for pass/fail (float32).")]


def _texts(texts: list[str]) -> list[str]:
    if not texts:
        raise UserError("give at least one --text")
    for i, text in enumerate(texts, start=1):
        if not text.strip():
            raise UserError(f"--text number {i} is empty; give a text with at least one word")
    return texts


@app.command()
@user_errors
def verify(
    text: TextOption = [],  # noqa: B006 - typer reads the default
    model: ModelOption = "minilm",
    atol: AtolOption = 1e-5,
    max_length: Annotated[int | None, typer.Option(help="Truncate each text to this many tokens.")] = None,
) -> None:
    """Rebuild Q·Kᵀ·scale, masks, softmax, A and Z from the model's weights and compare with Hugging Face."""
    from .api import extract

    result = extract(_texts(text), model=model, measures=("attention",), atol=atol, max_length=max_length)
    assert result.report is not None
    typer.echo(f"model: {model} ({result.provenance['model_class']}, {result.provenance['n_layers']} layers × "
               f"{result.provenance['n_heads']} heads, {result.provenance['attn_implementation']}, "
               f"{result.provenance['dtype']})")
    typer.echo(result.report.summary())
    if not result.report.passed:
        raise typer.Exit(1)


@app.command()
@user_errors
def explain(
    token: Annotated[str, typer.Option("--token", help="The token whose row of A to show (e.g. 'it').")],
    text: TextOption = [],  # noqa: B006
    model: ModelOption = "minilm",
    layer: Annotated[int | None, typer.Option(help="Layer (0-based); omit to pick the sharpest heads.")] = None,
    head: Annotated[int | None, typer.Option(help="Head (0-based).")] = None,
    measure: Annotated[str, typer.Option(help="attention | value_norm | rollout: what to sort by / show.")] = "attention",
    occurrence: Annotated[int, typer.Option(help="Which occurrence of the token (1 = first).")] = 1,
    level: Annotated[str, typer.Option(help="token or word.")] = "token",
) -> None:
    """Show token i's row of A (who it attends to, how strongly) and how Z = A·V follows from it."""
    from .api import extract
    from .explain import explain_token

    texts = _texts(text)
    if len(texts) != 1:
        raise UserError("explain takes exactly one --text")
    if level not in ("token", "word"):
        raise UserError(f"--level '{level}' is not supported; choose token or word")
    result = extract(texts, model=model, measures=("attention", "value_norm", "rollout"), level=level)
    typer.echo(f"text: {texts[0]}")
    typer.echo(explain_token(result.docs[0], token, layer, head, measure, occurrence))


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
