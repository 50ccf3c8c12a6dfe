"""`extractor report OUTPUT_DIR`: (re)write the run's self-contained HTML report, OUTPUT_DIR/report.html."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from extractor.cli.common import user_errors
from extractor.errors import UserError
from extractor.presentation.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_DOCS


@user_errors
def report(
    output_dir: Annotated[str, typer.Argument(metavar="RUN_DIR", help="A run's output folder.")],
    max_docs: Annotated[
        int, typer.Option("--max-docs", metavar="N", help="Most documents embedded in the page.")
    ] = DEFAULT_MAX_DOCS,
    max_mb: Annotated[
        float, typer.Option("--max-mb", metavar="MB", help="Most megabytes (10⁶ bytes) for the whole file.")
    ] = (DEFAULT_MAX_BYTES / 1e6),
) -> None:
    """Write OUTPUT_DIR/report.html: provenance, verification, head grid, token-to-token view (offline)."""
    from extractor.corpus.lock import FolderLock
    from extractor.corpus.run_folder import read_manifest, reading
    from extractor.presentation.report import write_report

    if not (math.isfinite(max_mb) and max_mb > 0):  # nan fails every comparison, so `max_mb <= 0` let it through
        raise UserError(f"--max-mb must be a number of megabytes > 0 (got {max_mb:g})")
    read_manifest(output_dir)  # a run folder, before a lock file is made in it
    with FolderLock(output_dir), reading(output_dir):
        path = write_report(output_dir, max_docs=max_docs, max_bytes=int(max_mb * 1e6))
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
