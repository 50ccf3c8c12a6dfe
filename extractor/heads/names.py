"""The per-head metrics' names and the heads' labels: what the figures, comparisons and the report need to know
of `heads.parquet` without loading torch (the metrics themselves are computed in `metrics`)."""

from __future__ import annotations

ROW_METRICS = (
    "entropy",
    "entropy_normalised",
    "mean_distance",
    "first_token",
    "cls",
    "sep",
    "self",
    "previous_token",
    "next_token",
    "punctuation",
    "max_weight",
    "cls_value_norm",
    "sep_value_norm",
)
DETECTORS = ("previous_token_score", "duplicate_token_score", "induction_score")
METRICS = ROW_METRICS + DETECTORS


def head_label(layer: int, head: int) -> str:
    """'L3H7' for layer 3, head 7."""
    return f"L{layer}H{head}"
