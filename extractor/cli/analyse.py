"""`extractor verify` (recompute and compare with Hugging Face) and `extractor explain` (one token's row of A)."""

from __future__ import annotations

from typing import Annotated

import typer

from extractor.attribution.measures import MEASURES
from extractor.cli.common import ModelOption, TextOption, checked_texts, user_errors
from extractor.errors import UserError


@user_errors
def verify(
    text: TextOption = [],  # noqa: B006 - typer reads the default
    model: ModelOption = "minilm",
    atol: Annotated[float | None, typer.Option("--atol", metavar="X", help="Tolerance; default 1e-5 (float32), 2e-2 (bfloat16).")] = None,
    max_length: Annotated[int | None, typer.Option(metavar="N", help="Truncate each text to this many tokens.")] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu | cuda | cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(metavar="float32|bfloat16", help="Weights and activations dtype.")] = "float32",
) -> None:
    """Rebuild Q·Kᵀ·scale, masks, softmax, A and Z from the model's weights and compare with Hugging Face."""
    from extractor.api import extract
    from extractor.core.models import load_model
    from extractor.corpus.config import default_atol

    texts = checked_texts(text)
    tolerance = atol if atol is not None else default_atol(dtype)
    loaded = load_model(model, device=device, dtype=dtype, tolerance=tolerance)
    result = extract(texts, model=loaded, measures=("attention",), atol=tolerance, max_length=max_length)
    assert result.report is not None
    typer.echo(f"model: {model} ({result.provenance['model_class']}, {result.provenance['n_layers']} layers × "
               f"{result.provenance['n_heads']} heads, {result.provenance['attn_implementation']}, "
               f"{result.provenance['dtype']})")
    typer.echo(result.report.summary())
    if not result.report.passed:
        raise typer.Exit(1)


@user_errors
def explain(
    token: Annotated[str, typer.Option("--token", metavar="TOKEN", help="The token whose row of A to show (e.g. 'it').")],
    text: TextOption = [],  # noqa: B006
    model: ModelOption = "minilm",
    layer: Annotated[int | None, typer.Option(metavar="N", help="Layer (0-based); omit to pick the sharpest heads.")] = None,
    head: Annotated[int | None, typer.Option(metavar="N", help="Head (0-based).")] = None,
    measure: Annotated[str, typer.Option(metavar="MEASURE", help="What to show: " + " | ".join(MEASURES) + ".")] = "attention",
    occurrence: Annotated[int, typer.Option(metavar="N", help="Which occurrence of the token (1 = first).")] = 1,
    level: Annotated[str, typer.Option(metavar="token|word", help="Positions: tokens, or words as typed.")] = "token",
) -> None:
    """Show token i's row of A (who it attends to, how strongly) and how Z = A·V follows from it."""
    from extractor.api import extract
    from extractor.presentation.explain import explain_token

    texts = checked_texts(text)
    if len(texts) != 1:
        raise UserError("explain takes exactly one --text")
    if level not in ("token", "word"):
        raise UserError(f"--level '{level}' is not supported; choose token or word")
    if measure not in MEASURES:
        raise UserError(f"--measure '{measure}' is not supported; choose one of: {', '.join(MEASURES)}")
    result = extract(texts, model=model, measures=tuple(dict.fromkeys(("attention", "value_norm", measure))), level=level)
    typer.echo(f"text: {texts[0]}")
    typer.echo(explain_token(result.docs[0], token, layer, head, measure, occurrence, text=texts[0]))
