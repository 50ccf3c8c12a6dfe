"""`extractor compare RUN_A RUN_B`: the per-head difference table and its heatmaps, written to a folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from extractor.corpus.run_folder import open_run
from extractor.heads.compare import check_same_shape, heads_difference
from extractor.presentation.plots import plot_head_metric_heatmaps


def default_output(run_a: str | Path, run_b: str | Path) -> Path:
    """RUN_B/compare_vs_<name of A>/."""
    return Path(run_b) / f"compare_vs_{open_run(run_a).name}"


def runs_difference(run_a: str | Path, run_b: str | Path) -> tuple[pd.DataFrame, str]:
    """(B − A per head and metric, a title naming both runs and models). A UserError if either folder is not a
    complete run or the runs' (n_layers, n_heads) differ."""
    a, b = open_run(run_a), open_run(run_b)
    check_same_shape(a.shape, b.shape, a.name, b.name)
    difference = heads_difference(a.heads(), b.heads())
    return difference, f"{b.name} ({b.model}) − {a.name} ({a.model})"


def compare_runs(
    run_a: str | Path, run_b: str | Path, output: str | Path | None = None
) -> tuple[pd.DataFrame, list[Path]]:
    """Write OUTPUT/heads_diff.parquet and one diverging layer × head heatmap per metric (B − A).

    Returns the difference table and the written paths (OUTPUT defaults to RUN_B/compare_vs_<name of A>/).
    """
    difference, title = runs_difference(run_a, run_b)
    folder = Path(output) if output is not None else default_output(run_a, run_b)
    folder.mkdir(parents=True, exist_ok=True)
    table_path = folder / "heads_diff.parquet"
    pq.write_table(pa.Table.from_pandas(difference, preserve_index=False), table_path)
    paths = plot_head_metric_heatmaps(difference, folder, title, diverging=True, stem_prefix="diff_")
    return difference, [table_path, *paths]
