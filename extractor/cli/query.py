"""`extractor query`: DuckDB SQL over a run's tables, read-only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import typer

from extractor.cli.common import user_errors
from extractor.errors import UserError

QUERY_FORMATS = {"table": "aligned columns", "csv": "CSV with a header", "json": "one JSON array of row objects",
                 "jsonl": "JSON Lines, one row object per line"}


@user_errors
def query(
    output_dir: Annotated[str, typer.Argument(metavar="RUN_DIR", help="A run's output folder.")],
    sql: Annotated[str, typer.Argument(metavar="SQL", help="SQL over views associations, tokens, words, documents, verification, heads, head_similarity, agreement.")],
    format: Annotated[str, typer.Option("--format", metavar="table|csv|json|jsonl", help="; ".join(f"{k}: {v}" for k, v in QUERY_FORMATS.items()) + ".")] = "table",
    max_rows: Annotated[int, typer.Option(metavar="N", help="Rows shown in table format.")] = 50,
) -> None:
    """Query a run's Parquet outputs with DuckDB SQL (read-only: queries cannot read or write other files)."""
    from extractor.corpus.run_folder import open_run, reading

    if format not in QUERY_FORMATS:
        *others, last = QUERY_FORMATS
        raise UserError(f"--format '{format}' is not supported; choose {', '.join(others)} or {last}")
    with reading(output_dir):
        shown = print_rows(open_run(output_dir).stream(sql), format, max_rows)
    if format == "table":  # a person reads it: say how many rows there were (on stderr: stdout stays the table)
        typer.echo(f"({shown[1]:,} row{'s' if shown[1] != 1 else ''}"
                   + (f", first {shown[0]:,} shown: raise --max-rows" if shown[0] < shown[1] else "") + ")", err=True)


def print_rows(batches: Iterator[Any], format: str, max_rows: int) -> tuple[int, int]:
    """Print the result as it streams in (batch by batch; the table format keeps only its first `max_rows`
    rows); returns (rows shown, rows in the result)."""
    import pandas as pd

    total, kept = 0, []
    first = True
    if format == "json":
        typer.echo("[", nl=False)
    for batch in batches:
        frame = batch.to_pandas()
        if format == "csv":
            typer.echo(frame.to_csv(index=False, header=first), nl=False)
        elif format == "json":
            body = frame.to_json(orient="records")[1:-1]
            typer.echo(("" if first or not body else ",") + body, nl=False)
        elif format == "jsonl" and len(frame):
            typer.echo(frame.to_json(orient="records", lines=True), nl=False)
        elif format == "table" and total < max_rows:
            kept.append(frame.head(max_rows - total))
        first = first and not len(frame)
        total += len(frame)
    if format == "json":
        typer.echo("]")
    if format == "table":
        table = pd.concat(kept) if kept else pd.DataFrame()
        typer.echo(table.to_string(index=False) if len(table) else "(no rows)")
        return len(table), total
    return total, total
