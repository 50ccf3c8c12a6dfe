"""`extractor plot OUTPUT_DIR` and `extractor compare RUN_A RUN_B`: figures and per-head differences of runs.

Registered on the main Typer app by the last line of cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import matplotlib
import typer

from .cli import app, user_errors

matplotlib.use("Agg")  # the command line is headless: never open a window


def _summary(paths: list[Path], folder: Path) -> str:
    return f"wrote {len(paths)} files to {folder}"


@app.command()
@user_errors
def plot(
    output_dir: Annotated[Path, typer.Argument(help="The output folder of an `extractor run`.")],
    doc: Annotated[
        int | None, typer.Option("--doc", help="Document id (default: the first document with status ok).")
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Layer (0-based; default: the sharpest head's).")
    ] = None,
    head: Annotated[
        int | None, typer.Option("--head", help="Head (0-based; default: lowest mean row entropy).")
    ] = None,
) -> None:
    """Draw a run's figures (PNG + SVG) into OUTPUT_DIR/plots/.

    Per-head metric heatmaps, the head-similarity clustermap, and for one document: one head's attention
    with token labels, the layer × head grid, and attention vs value_norm.
    """
    from .lock import FolderLock
    from .outputs import read_manifest, reading
    from .plots import write_default_plots

    read_manifest(output_dir)  # a run folder, before a lock file is made in it
    with FolderLock(output_dir), reading(output_dir):
        paths = write_default_plots(output_dir, doc_id=doc, layer=layer, head=head)
    typer.echo(_summary(paths, output_dir / "plots"))


@app.command()
@user_errors
def compare(
    run_a: Annotated[Path, typer.Argument(help="The reference run's output folder (A).")],
    run_b: Annotated[Path, typer.Argument(help="The run to compare with it (B); differences are B − A.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Folder for the results (default: RUN_B/compare_vs_<name of A>/)."
        ),
    ] = None,
) -> None:
    """Per-head metric differences (B − A) of two runs: heads_diff.parquet and heatmaps.

    Both runs' models must have the same number of layers and heads.
    """
    from .compare import compare_runs, default_output, largest_changes
    from .lock import FolderLock

    folder = output if output is not None else default_output(run_a, run_b)
    with FolderLock(output if output is not None else run_b):
        difference, paths = compare_runs(run_a, run_b, output)
    typer.echo(_summary(paths, folder))
    changes = largest_changes(difference)
    if changes:
        typer.echo("largest changes (B − A):")
        for line in changes:
            typer.echo(f"  {line}")
