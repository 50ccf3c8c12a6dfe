"""Command line: `extractor verify | explain | run | query | plot | compare | report`.

This root only builds the Typer app and registers the commands, which live in leaf modules that never
import it (analyse, run, query, figures, report); what they share is in `common`.

User mistakes (bad model, file, field, option: every `UserError`) print one line `error: ...` on stderr and
exit 2; a verification failure exits 1; Ctrl-C prints `error: interrupted` and exits 130 (128 + SIGINT).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from extractor.cli import analyse, figures, query, report, run
from extractor.cli.common import INTERRUPTED
from extractor.version import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract, verify and compare every attention head of a pretrained transformer.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no <bool>/<list[str]> placeholders
)


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


app.command()(analyse.verify)
app.command()(analyse.explain)
app.command()(run.run)
app.command()(query.query)
app.command()(figures.plot)
app.command()(figures.compare)
app.command()(report.report)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (while parsing options)
        typer.echo("error: interrupted", err=True)
        sys.exit(INTERRUPTED)
