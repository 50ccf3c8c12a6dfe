"""Hierarchical clustering of heads by their mean Jensen–Shannon divergence (head_similarity.parquet), for the
clustermap. NumPy and SciPy only: drawing a run's figures does not load torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from extractor.heads.names import head_label


@dataclass(frozen=True)
class HeadClustering:
    """Hierarchical clustering of heads by JS distance √JS (a metric), average linkage."""

    labels: list[str]  # [head] 'L0H0', ... in layer-major order
    divergence: np.ndarray  # [head, head] mean JS divergence (bits), symmetric, zero diagonal
    linkage: np.ndarray  # scipy linkage matrix [head − 1, 4]
    order: list[int]  # dendrogram leaf order (indices into labels)


def similarity_matrix(similarity_table: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Table of pairs → (JS divergence [head, head], symmetric, zero diagonal; labels 'L0H0', ...)."""
    frame = similarity_table.sort_values(["layer_a", "head_a", "layer_b", "head_b"])
    heads = frame[["layer_a", "head_a"]].drop_duplicates()
    total = len(heads)
    if len(frame) != total * total:
        raise ValueError(f"head similarity table has {len(frame)} rows, expected {total}² = {total * total}")
    matrix = frame["js_divergence"].to_numpy(dtype="float64").reshape(total, total)
    matrix = 0.5 * (matrix + matrix.T)
    np.fill_diagonal(matrix, 0.0)
    return matrix, [head_label(int(layer), int(head)) for layer, head in heads.itertuples(index=False)]


def cluster_heads(similarity_table: pd.DataFrame, method: str = "average") -> HeadClustering:
    """Cluster heads from a `HeadSimilarity.table()` (or head_similarity.parquet) with scipy's `linkage`."""
    divergence, labels = similarity_matrix(similarity_table)
    if np.isnan(divergence).any():
        raise ValueError("head similarity has NaN values (no rows were seen); nothing to cluster")
    if len(labels) < 2:
        return HeadClustering(labels, divergence, np.zeros((0, 4)), list(range(len(labels))))
    distance = np.sqrt(divergence.clip(min=0.0))  # Jensen–Shannon distance
    tree = linkage(squareform(distance, checks=False), method=method)
    return HeadClustering(labels, divergence, tree, [int(i) for i in leaves_list(tree)])
