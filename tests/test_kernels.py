"""The compiled top-k row kernel against torch.topk, on rows with padding, causal limits, sliding windows, ties and
short rows."""

from __future__ import annotations

import pytest
import torch

from extractor.corpus import kernels
from extractor.corpus.kernels import topk_rows


def test_numba_kernel_is_available() -> None:
    """numba is a dependency: without it top-k silently falls back to the slower torch path."""
    assert kernels.HAVE_NUMBA


def reference(values: torch.Tensor, limits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest visible values (descending) and how many there are, by sorting each row."""
    rows = values.reshape(-1, values.shape[-1])
    out, counts = torch.zeros(rows.shape[0], k), torch.zeros(rows.shape[0], dtype=torch.long)
    for r, limit in enumerate(limits.reshape(-1).tolist()):
        top = rows[r, :limit].sort(descending=True).values[:k]
        out[r, : len(top)], counts[r] = top, len(top)
    return out.view(*values.shape[:-1], k), counts.view(values.shape[:-1])


@pytest.mark.parametrize("k", [1, 3, 8, 40])
@pytest.mark.parametrize("use_numba", [True, False])
def test_topk_rows_match_a_sort_of_each_visible_row(k: int, use_numba: bool) -> None:
    n = 37
    values = torch.softmax(torch.randn(3, 4, n, n) * 3, dim=-1)
    values[0, 0, 0, :5] = 0.25  # ties
    lengths = torch.tensor([37, 20, 9])
    position = torch.arange(n)
    limits = torch.minimum(lengths[:, None], position[None, :] + 1)  # causal + padding
    limits = limits.masked_fill(position[None, :] >= lengths[:, None], 0)[:, None, :].expand(3, 4, n)
    top_values, top_keys, counts = topk_rows(values, limits, k, use_numba=use_numba)
    expected, expected_counts = reference(values, limits, min(k, n))
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(top_values, expected, rtol=0, atol=0)
    # keys point at the values, every key is visible, and slots beyond the count are (0, key 0)
    assert torch.equal(values.gather(-1, top_keys).masked_fill(top_values == 0, 0), top_values)
    slot = torch.arange(top_keys.shape[-1])
    assert (top_keys < limits[..., None]).logical_or(slot >= counts[..., None]).all()
    assert (top_keys.masked_select(slot >= counts[..., None]) == 0).all()


@pytest.mark.parametrize("use_numba", [True, False])
def test_topk_rows_read_keys_from_each_rows_start(use_numba: bool) -> None:
    """Sliding windows: the kernel against a sort of each row's keys [start, limit); starts fall inside blocks of 8
    keys, and the widest window holds enough whole blocks (≥ k) for the first pass's lower bound."""
    n, k = 120, 5
    values = torch.rand(3, n, n)
    position = torch.arange(n)
    limits = (position + 1)[None].expand(3, n)
    starts = torch.stack([(position - w + 1).clamp_min(0) for w in (3, 9, 70)])
    top_values, top_keys, counts = topk_rows(values, limits, k, use_numba=use_numba, starts=starts)
    for b in range(3):
        for q in range(n):
            start, limit = int(starts[b, q]), int(limits[b, q])
            expected = values[b, q, start:limit].sort(descending=True)
            count = min(k, limit - start)
            assert int(counts[b, q]) == count
            assert torch.equal(top_values[b, q, :count], expected.values[:count])
            assert torch.equal(top_keys[b, q, :count], expected.indices[:count] + start)


def test_numba_and_torch_paths_agree_on_keys_without_ties() -> None:
    values = torch.rand(2, 3, 50, 50)
    limits = torch.full((2, 3, 50), 50)
    limits[1] = 31
    numba_result = topk_rows(values, limits, 8, use_numba=True)
    torch_result = topk_rows(values, limits, 8, use_numba=False)
    for a, b in zip(numba_result, torch_result, strict=True):
        assert torch.equal(a, b)


def test_ties_keep_the_earlier_key_first() -> None:
    values = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0, 0.3]])
    top_values, top_keys, counts = topk_rows(values, torch.tensor([6]), 3, use_numba=True)
    assert top_keys.tolist() == [[1, 2, 3]] and counts.tolist() == [3]


def test_limits_beyond_the_row_zero_width_rows_and_nan_leave_clean_slots() -> None:
    values = torch.tensor([[0.5, 0.2, 0.3], [float("nan"), 0.9, 0.1]])
    top_values, top_keys, counts = topk_rows(values, torch.tensor([99, 3]), 2, use_numba=True)
    assert top_keys[0].tolist() == [0, 2] and counts[0] == 2  # limit 99 read as 3
    slot = torch.arange(2)
    assert (top_values[1][slot >= counts[1]] == 0).all() and (top_keys[1][slot >= counts[1]] == 0).all()
    assert not torch.isnan(top_values).any()
    empty = topk_rows(torch.zeros(4, 0), torch.zeros(4, dtype=torch.long), 8)
    assert [tuple(t.shape) for t in empty] == [(4, 0), (4, 0), (4,)]
