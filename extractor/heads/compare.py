"""What changed per head between two runs: B − A of two heads tables (`extractor.presentation.compare` reads the
run folders, writes the table and draws it).

Two models (or a model before and after fine-tuning, or one model on two corpora).

Differences are B − A for every metric of heads.parquet, one row per (layer, head); both runs must have the
same number of layers and heads.
"""

from __future__ import annotations

import pandas as pd

from extractor.errors import UserError
from extractor.heads.names import METRICS, head_label


def check_same_shape(shape_a: tuple[int, int], shape_b: tuple[int, int], name_a: str, name_b: str) -> None:
    """Refuse, in one line, to compare runs whose (n_layers, n_heads) differ."""
    if shape_a != shape_b:
        raise UserError(
            f"cannot compare '{name_a}' ({shape_a[0]} layers × {shape_a[1]} heads) with '{name_b}' "
            f"({shape_b[0]} layers × {shape_b[1]} heads): per-head differences need models of the same shape"
        )


def heads_difference(heads_a: pd.DataFrame, heads_b: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, head): every metric as B − A (NaN where either is NaN), plus n_rows_a and n_rows_b, then
    each metric's A and B values (`<metric>_a`, `<metric>_b`).

    Both tables are heads.parquet frames of the same (layer, head) set.
    """
    keys = ["layer", "head"]
    metrics = [m for m in METRICS if m in heads_a.columns and m in heads_b.columns]
    a = heads_a.set_index(keys).sort_index()
    b = heads_b.set_index(keys).sort_index()
    if not a.index.equals(b.index):
        raise UserError(
            "the two runs' heads.parquet list different (layer, head) pairs; "
            "rerun them with the same tool version"
        )
    frame = (b[metrics] - a[metrics]).astype("float64")
    frame.insert(0, "n_rows_b", b["n_rows"].astype("int64"))
    frame.insert(0, "n_rows_a", a["n_rows"].astype("int64"))
    for metric in metrics:
        frame[f"{metric}_a"] = a[metric].astype("float64")
        frame[f"{metric}_b"] = b[metric].astype("float64")
    frame = frame.reset_index()
    return frame.astype({"layer": "int16", "head": "int16"})


def largest_changes(difference: pd.DataFrame, count: int = 3) -> list[str]:
    """The CLI summary: per metric (metrics have different units, so heads are ranked within each), the heads
    whose value changed most, as `metric: LxHy A → B (B − A)`; one line saying so when nothing changed."""
    lines = []
    for metric in [m for m in METRICS if m in difference.columns]:
        change = difference[metric].dropna()
        change = change[change.abs() > 1e-12]
        if change.empty:
            continue
        top = difference.loc[change.abs().sort_values(ascending=False).index[:count]]
        heads = ", ".join(
            f"{head_label(int(r['layer']), int(r['head']))} {r[f'{metric}_a']:.3f} → {r[f'{metric}_b']:.3f} "
            f"({r[metric]:+.3f})" for _, r in top.iterrows()
        )
        lines.append(f"{metric}: {heads}")
    return lines or ["no per-head metric changed between the two runs"]
