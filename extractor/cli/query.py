"""`extractor query`: DuckDB SQL over a run's tables, read-only."""

from __future__ import annotations

from typing import Annotated

import typer

from extractor.cli.common import user_errors
from extractor.errors import UserError

QUERY_FORMATS = {"table": "aligned columns", "csv": "CSV with a header", "json": "one JSON array of row objects",
                 "jsonl": "JSON Lines, one row object per line"}


@user_errors
def query(
    output_dir: Annotated[str, typer.Argument(help="A run's output folder.")],
    sql: Annotated[str, typer.Argument(help="SQL over views associations, tokens, words, documents, verification, heads, head_similarity.")],
    format: Annotated[str, typer.Option("--format", help="; ".join(f"{k}: {v}" for k, v in QUERY_FORMATS.items()) + ".")] = "table",
    max_rows: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
) -> None:
    """Query a run's Parquet outputs with DuckDB SQL (read-only: queries cannot read or write other files)."""
    from extractor.corpus.run_folder import open_run, reading

    if format not in QUERY_FORMATS:
        *others, last = QUERY_FORMATS
        raise UserError(f"--format '{format}' is not supported; choose {', '.join(others)} or {last}")
    with reading(output_dir):
        frame = open_run(output_dir).fetch(sql)
    if format == "csv":
        typer.echo(frame.to_csv(index=False), nl=False)
    elif format == "json":
        typer.echo(frame.to_json(orient="records"))
    elif format == "jsonl":
        typer.echo(frame.to_json(orient="records", lines=True), nl=False)
    else:
        typer.echo(frame.to_string(index=False, max_rows=max_rows) if len(frame) else "(no rows)")
