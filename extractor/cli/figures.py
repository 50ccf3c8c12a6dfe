"""`extractor plot OUTPUT_DIR` and `extractor compare RUN_A RUN_B`: figures and per-head differences of runs.

Registered on the Typer app by extractor.cli.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from extractor.cli.common import user_errors


def _summary(paths: list[Path], folder: Path) -> str:
    return f"wrote {len(paths)} files to {folder}"


@user_errors
def plot(
    output_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The output folder of an `extractor run`.")],
    doc: Annotated[
        int | None, typer.Option("--doc", metavar="ID", help="Document id (default: the first document with status ok).")
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", metavar="N", help="Layer (0-based; default: the sharpest head's).")
    ] = None,
    head: Annotated[
        int | None, typer.Option("--head", metavar="N", help="Head (0-based; default: lowest mean row entropy).")
    ] = None,
    format: Annotated[
        str, typer.Option("--format", metavar="png,svg", help="Figure formats, comma-separated.")
    ] = "png,svg",
) -> None:
    """Draw a run's figures (PNG + SVG by default) into OUTPUT_DIR/plots/.

    Per-head metric heatmaps, the head-similarity clustermap, and for one document: one head's attention
    with token labels, the layer × head grid, and attention vs value_norm.
    """
    import matplotlib

    matplotlib.use("Agg")  # the command line is headless: never open a window
    from extractor.corpus.config import comma_separated
    from extractor.corpus.lock import FolderLock
    from extractor.corpus.run_folder import read_manifest, reading
    from extractor.presentation.plots import figure_formats, write_default_plots

    read_manifest(output_dir)  # a run folder, before a lock file is made in it
    with figure_formats(comma_separated(format)), FolderLock(output_dir), reading(output_dir):
        paths = write_default_plots(output_dir, doc_id=doc, layer=layer, head=head)
    typer.echo(_summary(paths, output_dir / "plots"))


@user_errors
def compare(
    run_a: Annotated[Path, typer.Argument(metavar="RUN_A", help="The reference run's output folder (A).")],
    run_b: Annotated[Path, typer.Argument(metavar="RUN_B", help="The run to compare with it (B); differences are B − A.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="DIR", help="Folder for the results (default: RUN_B/compare_vs_<name of A>/)."
        ),
    ] = None,
) -> None:
    """Per-head metric differences (B − A) of two runs: heads_diff.parquet and heatmaps.

    Both runs' models must have the same number of layers and heads.
    """
    from extractor.corpus.lock import FolderLock
    from extractor.heads.compare import largest_changes
    from extractor.presentation.compare import compare_runs, default_output

    folder = output if output is not None else default_output(run_a, run_b)
    with FolderLock(output if output is not None else run_b):
        difference, paths = compare_runs(run_a, run_b, output)
    typer.echo(_summary(paths, folder))
    typer.echo("largest changes per metric (A → B, B − A):")
    for line in largest_changes(difference):
        typer.echo(f"  {line}")
