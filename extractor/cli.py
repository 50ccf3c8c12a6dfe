"""Command line: `extractor verify | explain | run | query | plot | compare | report`.

User mistakes (bad model, file, field, option: every `UserError`) print one line `error: ...` on stderr and
exit 2; a verification failure exits 1; Ctrl-C prints `error: interrupted` and exits 130 (128 + SIGINT).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract, verify and compare every attention head of a pretrained transformer.",
    pretty_exceptions_enable=False,
)

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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"attention-extractor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Extract, verify and compare every attention head of a pretrained transformer."""


ModelOption = Annotated[str, typer.Option("--model", "-m", help="Hub id, save_pretrained folder, or 'minilm' (bundled, offline).")]
TextOption = Annotated[list[str], typer.Option("--text", "-t", help="A text to analyse; repeat for several.")]


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
    atol: Annotated[float | None, typer.Option("--atol", help="Tolerance; default 1e-5 (float32), 2e-2 (bfloat16).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate each text to this many tokens.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16.")] = "float32",
) -> None:
    """Rebuild Q·Kᵀ·scale, masks, softmax, A and Z from the model's weights and compare with Hugging Face."""
    from .api import extract
    from .config import default_atol
    from .models import load_model

    texts = _texts(text)
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


@app.command()
@user_errors
def run(
    config: Annotated[str | None, typer.Argument(help="YAML run config (see configs/default.yaml).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a config key: key=value (repeatable).")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option(help="Hub id, save_pretrained folder, or 'minilm'.")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Corpus: .txt .jsonl .csv .tsv .parquet or '-'.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output folder.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Most documents per forward pass.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Most tokens per document (window).")] = None,
    storage: Annotated[str | None, typer.Option(help="topk | dense | threshold | summary.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keys kept per query row and head (storage topk).")] = None,
    level: Annotated[str | None, typer.Option(help="token | word.")] = None,
    measures: Annotated[str | None, typer.Option(help="Comma-separated: attention,value_norm,layer_value_norm,rollout.")] = None,
    limit: Annotated[int | None, typer.Option(help="Read at most this many records.")] = None,
    verify: Annotated[str | None, typer.Option(help="on | off | every:N.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16.")] = None,
    engine: Annotated[str | None, typer.Option(help="local | ray.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray: auto or ray://HOST:PORT.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray: worker actors.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run in the same output folder.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is in the output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Extract, verify and store every head's associations over a corpus (streamed, resumable)."""
    from .config import load_config, parse_set
    from .run import run_extraction

    sets = parse_set(set_)
    flags = {"model": model, "input": input, "output": output, "batch_size": batch_size, "max_length": max_length,
             "storage": storage, "top_k": top_k, "level": level, "limit": limit, "verify": verify, "device": device,
             "dtype": dtype, "engine": engine, "address": address, "workers": workers,
             "measures": [m.strip() for m in measures.split(",") if m.strip()] if measures is not None else None}
    settings = load_config(config, flags, sets)
    manifest = run_extraction(settings, resume=resume, overwrite=overwrite, quiet=quiet)
    if manifest.get("verification", {}).get("passed") is False:
        failing = ", ".join(manifest["verification"]["failing_heads"])
        raise fail(f"verification failed for {failing} (see verification.parquet)", code=1)


QUERY_FORMATS = {"table": "aligned columns", "csv": "CSV with a header", "json": "one JSON array of row objects",
                 "jsonl": "JSON Lines, one row object per line"}


@app.command()
@user_errors
def query(
    output_dir: Annotated[str, typer.Argument(help="A run's output folder.")],
    sql: Annotated[str, typer.Argument(help="SQL over views associations, tokens, words, documents, verification, heads, head_similarity.")],
    format: Annotated[str, typer.Option("--format", help="; ".join(f"{k}: {v}" for k, v in QUERY_FORMATS.items()) + ".")] = "table",
    max_rows: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
) -> None:
    """Query a run's Parquet outputs with DuckDB SQL (read-only: queries cannot read or write other files)."""
    from .outputs import reading
    from .query import run_query

    if format not in QUERY_FORMATS:
        *others, last = QUERY_FORMATS
        raise UserError(f"--format '{format}' is not supported; choose {', '.join(others)} or {last}")
    with reading(output_dir):
        frame = run_query(output_dir, sql)
    if format == "csv":
        typer.echo(frame.to_csv(index=False), nl=False)
    elif format == "json":
        typer.echo(frame.to_json(orient="records"))
    elif format == "jsonl":
        typer.echo(frame.to_json(orient="records", lines=True), nl=False)
    else:
        typer.echo(frame.to_string(index=False, max_rows=max_rows) if len(frame) else "(no rows)")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (while parsing options)
        typer.echo("error: interrupted", err=True)
        sys.exit(INTERRUPTED)


# Commands defined in their own modules register themselves on `app` when imported.
from . import cli_figures, cli_report  # noqa: E402,F401
