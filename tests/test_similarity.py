"""Head similarity: JS divergence of heads' rows (known values, symmetry, streaming) and clustering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hand_docs import make_doc, random_patterns
from scipy.spatial.distance import jensenshannon

from extractor.heads.clustering import cluster_heads, similarity_matrix
from extractor.heads.similarity import HeadSimilarity, js_divergence_sums, sampled_rows


def heads_doc(*patterns: torch.Tensor) -> torch.Tensor:
    """[head, query, key] from per-head [query, key] patterns."""
    return torch.stack(patterns)


def test_known_divergences() -> None:
    # Head 0 looks only at key 0, head 1 only at key 1 (disjoint rows: 1 bit), head 2 half-half.
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    second = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    half = torch.full((2, 2), 0.5)
    sums = js_divergence_sums(heads_doc(first, second, half)) / 2  # mean over the 2 query rows
    assert sums[0, 1].item() == pytest.approx(1.0)
    # JS([1, 0], [½, ½]) = H([¾, ¼]) − ½·H([1, 0]) − ½·H([½, ½]) in bits.
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert sums[0, 2].item() == pytest.approx(h_m - 0.5)
    assert sums[1, 2].item() == pytest.approx(h_m - 0.5)


def test_identical_heads_are_zero_and_divergence_symmetric() -> None:
    generator = torch.Generator().manual_seed(0)
    patterns = random_patterns(2, 3, 7, causal=False, generator=generator)
    patterns[1, 2] = patterns[0, 1]  # two different heads with identical rows
    similarity = HeadSimilarity(2, 3)
    similarity.update(make_doc(patterns, list("abcdefg")))
    matrix = similarity.matrix()
    assert matrix[1 * 3 + 2, 0 * 3 + 1].item() == 0.0
    assert torch.diagonal(matrix).abs().max().item() == 0.0
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=0)
    off_diagonal = matrix[~torch.eye(6, dtype=torch.bool)]
    assert (off_diagonal[off_diagonal != 0] > 0).all() and (matrix <= 1).all()


def reference_mean_js(docs: list[torch.Tensor]) -> np.ndarray:
    """Mean over all documents' query rows of scipy's JS divergence (base 2) for every pair of heads."""
    flat = [d.flatten(0, 1).double().numpy() for d in docs]  # per doc [head, query, key]
    n_heads = flat[0].shape[0]
    total = np.zeros((n_heads, n_heads))
    rows = 0
    for patterns in flat:
        for i in range(patterns.shape[1]):
            for a in range(n_heads):
                for b in range(n_heads):
                    total[a, b] += jensenshannon(patterns[a, i], patterns[b, i], base=2) ** 2
            rows += 1
    return total / rows


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_and_merge_equal_all_rows_at_once(causal: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    docs = [random_patterns(2, 2, n, causal, generator) for n in (4, 6, 3)]
    streamed, left, right = HeadSimilarity(2, 2), HeadSimilarity(2, 2), HeadSimilarity(2, 2)
    for k, patterns in enumerate(docs):
        doc = make_doc(patterns, [f"t{i}" for i in range(patterns.shape[-1])])
        streamed.update(doc)
        (left if k == 0 else right).update(doc)
    left.merge(right)
    expected = reference_mean_js(docs)
    np.testing.assert_allclose(streamed.matrix().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(left.matrix().numpy(), streamed.matrix().numpy(), rtol=1e-12)
    assert streamed.n_rows == 4 + 6 + 3


def test_query_chunks_do_not_change_the_result() -> None:
    generator = torch.Generator().manual_seed(2)
    patterns = random_patterns(3, 2, 9, causal=True, generator=generator).flatten(0, 1)  # [head, query, key]
    whole = js_divergence_sums(patterns)
    chunked = js_divergence_sums(patterns, block_elements=1)  # one query row at a time
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_table_has_every_pair_for_any_shape() -> None:
    generator = torch.Generator().manual_seed(3)
    similarity = HeadSimilarity(3, 5)
    similarity.update(make_doc(random_patterns(3, 5, 4, False, generator), list("abcd")))
    table = similarity.table()
    assert list(table.columns) == ["layer_a", "head_a", "layer_b", "head_b", "js_divergence", "n_rows"]
    assert len(table) == 15 * 15
    assert {str(table[c].dtype) for c in ("layer_a", "head_a", "layer_b", "head_b")} == {"int16"}
    assert str(table["js_divergence"].dtype) == "float64" and str(table["n_rows"].dtype) == "int64"
    same = table[(table.layer_a == table.layer_b) & (table.head_a == table.head_b)]
    assert len(same) == 15 and (same["js_divergence"] == 0).all()
    assert (table["n_rows"] == 4).all()
    matrix, labels = similarity_matrix(table)
    assert labels[:6] == ["L0H0", "L0H1", "L0H2", "L0H3", "L0H4", "L1H0"]
    np.testing.assert_allclose(matrix, similarity.matrix().numpy())


def test_shape_mismatch_is_refused() -> None:
    similarity = HeadSimilarity(2, 2)
    with pytest.raises(ValueError, match="layers × heads"):
        similarity.update(make_doc(torch.full((3, 2, 2, 2), 0.5), ["a", "b"]))


def test_clustering_groups_identical_heads() -> None:
    # Heads 0 and 2 attend identically (to key 0); head 1 attends to key 2; head 3 is uniform.
    n = 3
    to_first = torch.zeros(n, n)
    to_first[:, 0] = 1.0
    to_last = torch.zeros(n, n)
    to_last[:, 2] = 1.0
    uniform = torch.full((n, n), 1 / n)
    similarity = HeadSimilarity(1, 4)
    similarity.update(make_doc(torch.stack([to_first, to_last, to_first, uniform])[None], list("abc")))
    clustering = cluster_heads(similarity.table())
    assert clustering.labels == ["L0H0", "L0H1", "L0H2", "L0H3"]
    first_merge = sorted(int(i) for i in clustering.linkage[0, :2])
    assert first_merge == [0, 2] and clustering.linkage[0, 2] == pytest.approx(0.0)
    position = {head: k for k, head in enumerate(clustering.order)}
    assert abs(position[0] - position[2]) == 1
    assert sorted(clustering.order) == [0, 1, 2, 3]


def test_row_sampling_bounds_the_rows_used() -> None:
    # Every query row of every head is the same distribution, so any sample of rows has the full mean.
    generator = torch.Generator().manual_seed(4)
    rows = torch.softmax(torch.randn(1, 3, 1, 10, generator=generator), dim=-1)  # [layer, head, 1, key]
    patterns = rows.expand(1, 3, 10, 10).contiguous()  # [layer, head, query, key]
    doc = make_doc(patterns, [f"t{i}" for i in range(10)])
    exact, sampled = HeadSimilarity(1, 3), HeadSimilarity(1, 3, max_rows_per_doc=4)
    exact.update(doc)
    sampled.update(doc)
    assert (exact.n_rows, sampled.n_rows) == (10, 4)
    torch.testing.assert_close(sampled.matrix(), exact.matrix(), rtol=1e-6, atol=1e-9)
    expected = reference_mean_js([patterns])
    np.testing.assert_allclose(sampled.matrix().numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="row sampling"):
        exact.merge(sampled)
    assert sampled_rows(10, 4).tolist() == [1, 3, 6, 8]  # the middle of each of 4 strata of 2.5 rows
    assert sampled_rows(128, 4).tolist() == [16, 48, 80, 112]  # never the first ([CLS]) or last ([SEP]) row
    assert sampled_rows(3, 4).tolist() == [0, 1, 2]
