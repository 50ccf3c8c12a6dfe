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
    top_values, top_keys, counts, totals = topk_rows(values, limits, k, use_numba=use_numba)
    expected, expected_counts = reference(values, limits, min(k, n))
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(top_values, expected, rtol=0, atol=0)
    # keys point at the values, every key is visible, and slots beyond the count are (0, key 0)
    assert torch.equal(values.gather(-1, top_keys).masked_fill(top_values == 0, 0), top_values)
    slot = torch.arange(top_keys.shape[-1])
    assert (top_keys < limits[..., None]).logical_or(slot >= counts[..., None]).all()
    assert (top_keys.masked_select(slot >= counts[..., None]) == 0).all()
    # each row's total over its visible keys (float32 rounding in another order than float64's)
    visible = torch.arange(n) < limits[..., None]
    expected_totals = values.double().masked_fill(~visible, 0.0).sum(dim=-1)
    torch.testing.assert_close(totals.double(), expected_totals, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_numba", [True, False])
def test_topk_rows_read_keys_from_each_rows_start(use_numba: bool) -> None:
    """Sliding windows: the kernel against a sort of each row's keys [start, limit); starts fall inside blocks of 8
    keys, and the widest window holds enough whole blocks (≥ k) for the first pass's lower bound."""
    n, k = 120, 5
    values = torch.rand(3, n, n)
    position = torch.arange(n)
    limits = (position + 1)[None].expand(3, n)
    starts = torch.stack([(position - w + 1).clamp_min(0) for w in (3, 9, 70)])
    top_values, top_keys, counts, totals = topk_rows(values, limits, k, use_numba=use_numba, starts=starts)
    for b in range(3):
        for q in range(n):
            start, limit = int(starts[b, q]), int(limits[b, q])
            expected = values[b, q, start:limit].sort(descending=True)
            count = min(k, limit - start)
            assert int(counts[b, q]) == count
            assert torch.equal(top_values[b, q, :count], expected.values[:count])
            assert torch.equal(top_keys[b, q, :count], expected.indices[:count] + start)
            assert float(totals[b, q]) == pytest.approx(float(values[b, q, start:limit].double().sum()), rel=1e-6)


def test_numba_and_torch_paths_agree_on_keys_without_ties() -> None:
    values = torch.rand(2, 3, 50, 50)
    limits = torch.full((2, 3, 50), 50)
    limits[1] = 31
    numba_result = topk_rows(values, limits, 8, use_numba=True)
    torch_result = topk_rows(values, limits, 8, use_numba=False)
    for a, b in zip(numba_result[:3], torch_result[:3], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(numba_result.totals, torch_result.totals, rtol=1e-6, atol=0)  # sums in another order


def test_ties_keep_the_earlier_key_first() -> None:
    values = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0, 0.3]])
    top_values, top_keys, counts, _ = topk_rows(values, torch.tensor([6]), 3, use_numba=True)
    assert top_keys.tolist() == [[1, 2, 3]] and counts.tolist() == [3]


def test_limits_beyond_the_row_zero_width_rows_and_nan_leave_clean_slots() -> None:
    values = torch.tensor([[0.5, 0.2, 0.3], [float("nan"), 0.9, 0.1]])
    top_values, top_keys, counts, totals = topk_rows(values, torch.tensor([99, 3]), 2, use_numba=True)
    assert top_keys[0].tolist() == [0, 2] and counts[0] == 2  # limit 99 read as 3
    assert totals[0].item() == pytest.approx(1.0) and totals[1].isnan()  # a row with NaN totals NaN
    slot = torch.arange(2)
    assert (top_values[1][slot >= counts[1]] == 0).all() and (top_keys[1][slot >= counts[1]] == 0).all()
    assert not torch.isnan(top_values).any()
    empty = topk_rows(torch.zeros(4, 0), torch.zeros(4, dtype=torch.long), 8)
    assert [tuple(t.shape) for t in empty] == [(4, 0), (4, 0), (4,), (4,)]


def sort_each_row(
    values: torch.Tensor, starts: torch.Tensor, limits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract by a stable sort of each row's visible keys [start, limit), NaN left out: values, keys, counts."""
    rows = values.reshape(-1, values.shape[-1])
    top_values, top_keys = torch.zeros(rows.shape[0], k), torch.zeros(rows.shape[0], k, dtype=torch.long)
    counts = torch.zeros(rows.shape[0], dtype=torch.long)
    for r, (start, limit) in enumerate(zip(starts.reshape(-1).tolist(), limits.reshape(-1).tolist(), strict=True)):
        keys = torch.arange(start, limit)
        keys = keys[~rows[r, start:limit].isnan()]
        order = rows[r, keys].sort(descending=True, stable=True).indices[:k]  # equal values: the earlier key first
        counts[r] = len(order)
        top_values[r, : len(order)], top_keys[r, : len(order)] = rows[r, keys[order]], keys[order]
    return top_values, top_keys, counts


def assert_matches_a_sort(values: torch.Tensor, starts: torch.Tensor, limits: torch.Tensor, k: int) -> None:
    rows, n = values.reshape(-1, values.shape[-1]), values.shape[-1]
    top_values, top_keys, counts, totals = topk_rows(rows, limits.reshape(-1), k, use_numba=True,
                                                     starts=starts.reshape(-1))
    expected_values, expected_keys, expected_counts = sort_each_row(rows, starts, limits, min(k, n))
    assert torch.equal(counts, expected_counts)
    assert torch.equal(top_keys, expected_keys)
    assert torch.equal(top_values.view(torch.int32), expected_values.view(torch.int32))  # bit for bit: -0.0 stays
    visible = (torch.arange(n) >= starts.reshape(-1, 1)) & (torch.arange(n) < limits.reshape(-1, 1))
    expected_totals = rows.double().masked_fill(~visible, 0.0).sum(dim=-1)  # NaN and infinities carried through
    torch.testing.assert_close(totals.double(), expected_totals, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("k", [1, 3, 8, 9, 16])
def test_wide_rows_with_windows_match_a_sort(k: int) -> None:
    """512 keys, peaked like attention, over 600 rows (three chunks of parallel work): the block bound leaves only a
    few of the 64 blocks to read; windows start inside blocks and leave a short last block."""
    torch.manual_seed(0)
    values = torch.softmax(torch.randn(600, 512) * 4, dim=-1)
    limits = torch.randint(200, 513, (600,))
    starts = (limits - torch.randint(70, 200, (600,))).clamp_min(0)
    starts[::3] = 0
    assert_matches_a_sort(values, starts, limits, k)


@pytest.mark.parametrize("k", [1, 3, 8, 12])
def test_many_ties_at_the_threshold_keep_the_earlier_keys(k: int) -> None:
    """Four distinct values per row: most blocks share the largest maximum, and the k-th value is tied many times
    over, so which keys come back is decided by the tie rule alone."""
    torch.manual_seed(1)
    values = torch.randint(0, 4, (300, 128)).float() / 4
    values[:100] = torch.where(values[:100] == 0.75, 0.5, values[:100])  # a row maximum shared by many blocks
    starts = torch.randint(0, 30, (300,))
    limits = torch.randint(100, 129, (300,))
    assert_matches_a_sort(values, starts, limits, k)


@pytest.mark.parametrize("k", [1, 5, 8])
def test_signed_values_and_zeros_of_both_signs(k: int) -> None:
    """Negative values order below positive ones and -0.0 ties with +0.0 (the earlier key first); the values come
    back bit for bit."""
    torch.manual_seed(2)
    values = torch.randn(200, 96)
    values[50:] = -values[50:].abs()  # rows whose top k are all zeros, then negative values
    values[:, ::7] = -0.0
    values[:, 3::7] = 0.0
    assert_matches_a_sort(values, torch.zeros(200, dtype=torch.long), torch.full((200,), 96), k)


@pytest.mark.parametrize("k", [1, 5, 8, 12])
def test_short_rows_take_every_key_as_a_candidate(k: int) -> None:
    """Rows of k blocks of 8 keys or fewer (up to 64 keys for k = 8) skip the block bound: every visible key is
    ranked. Widths from 0 to 64, windows, ties, signed zeros and negative values, against a sort of each row."""
    torch.manual_seed(3)
    values = torch.randint(-3, 4, (400, 64)).float() / 4  # many ties
    values[::3] = torch.softmax(torch.randn(134, 64) * 3, dim=-1)
    values[:, ::5] = -0.0
    limits = torch.randint(0, 65, (400,))
    starts = (limits - torch.randint(0, 65, (400,))).clamp_min(0)
    assert_matches_a_sort(values, starts, limits, k)


@pytest.mark.parametrize("k", [3, 8, 20])
def test_rows_holding_nan_or_infinity_get_the_top_of_their_other_keys(k: int) -> None:
    """A NaN is never selected and never hides a larger key; infinities rank as values."""
    torch.manual_seed(3)
    values = torch.rand(6, 200)
    values[0, 5] = float("nan")  # one NaN in a block holding the row maximum
    values[0, 6] = 2.0
    values[1, ::3] = float("nan")
    values[2, :] = float("nan")
    values[3, 17] = float("inf")
    values[4, 40:60] = float("-inf")
    values[5, :] = float("-inf")
    assert_matches_a_sort(values, torch.tensor([0, 0, 0, 10, 0, 3]), torch.full((6,), 200), k)
