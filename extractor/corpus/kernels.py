"""Row kernels that torch does slowly on CPU: top-k per row of a pattern, over each row's visible keys only.

`torch.topk` on CPU costs about 4.5 ns per element for k = 8 of 128 keys (it partially sorts a copy of every
row), which made top-k storage a third of the forward pass. `topk_rows` compiles (numba, cached on disk) a
two-pass selection instead: the k-th largest of the maxima of blocks of 8 keys is a lower bound of the row's
k-th largest value, so the second pass only inserts the few keys at or above it (about 2k on MiniLM's rows)
into a sorted buffer of k. Rows run in parallel. Each row's visible keys are [start, limit) (start > 0 under a
sliding window), which replaces the masked copy that padding, causal and window masks needed before `torch.topk`.
On CUDA, or without numba, the same contract runs on torch.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the package importable without it
    HAVE_NUMBA = False


BLOCK = 8  # keys per block for the first pass's lower bound

if HAVE_NUMBA:

    @njit(inline="always")
    def _insert(top_v, top_k, r, count, k, v, j):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Insert (v, key j) into row r's descending buffer of `count` ≤ k entries; returns the new count.

        Indexes the 2-d buffers directly: a row view per call would touch a shared reference count from every
        thread."""
        pos = count if count < k else k - 1
        count = min(count + 1, k)
        while pos > 0 and top_v[r, pos - 1] < v:  # equal values keep their order: the earlier key stays first
            top_v[r, pos] = top_v[r, pos - 1]
            top_k[r, pos] = top_k[r, pos - 1]
            pos -= 1
        top_v[r, pos] = v
        top_k[r, pos] = j
        return count

    @njit(parallel=True, cache=True, boundscheck=False)
    def _topk_kernel(values, starts, limits, k, out_keys, out_values, out_counts):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        rows = values.shape[0]
        for r in prange(rows):
            start = starts[r]
            limit = limits[r]
            threshold = -np.inf
            first_block = (start + BLOCK - 1) // BLOCK  # blocks wholly inside [start, limit)
            n_blocks = limit // BLOCK - first_block
            if n_blocks >= k:
                # The k-th largest of the blocks' maxima is ≤ the row's k-th largest value (k distinct keys are
                # at least that large): a threshold that real attention rows pass at only ~2k keys.
                count = 0
                for b in range(first_block, first_block + n_blocks):
                    m = values[r, b * BLOCK]
                    for i in range(b * BLOCK + 1, (b + 1) * BLOCK):
                        m = max(m, values[r, i])
                    if count < k or m > out_values[r, k - 1]:
                        count = _insert(out_values, out_keys, r, count, k, m, b)
                threshold = out_values[r, k - 1]
            count = 0
            for j in range(start, limit):
                v = values[r, j]
                if v >= threshold and (count < k or v > out_values[r, k - 1]):
                    count = _insert(out_values, out_keys, r, count, k, v, j)
            for slot in range(count, k):  # rows with fewer than k visible keys (or NaN values): empty slots
                out_values[r, slot] = 0.0
                out_keys[r, slot] = 0
            out_counts[r] = count


def topk_rows(
    values: torch.Tensor,
    limits: torch.Tensor,
    k: int,
    use_numba: bool | None = None,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest values of each row among its visible keys [start, limit), in descending order.

    values: [..., key]; limits: [...] (int, 0 = no visible key); starts: [...] the first visible key of each row
    (a sliding window), None: 0 for every row. Returns (top_values [..., k],
    top_keys [..., k], counts [...]): slots at or beyond a row's count (rows with fewer than k visible keys)
    hold value 0 and key 0. Ties keep the earlier key first. Limits beyond the row are read as the row's length.
    NaN values are never selected on the numba path, and a row holding NaN may come back short (torch.topk
    ranks NaN first instead); softmax patterns hold none.
    """
    n = values.shape[-1]
    k = min(k, n)
    lead = values.shape[:-1]
    limits = limits.clamp(0, n)  # the kernel reads keys [start, limit) without bounds checks
    if starts is not None:
        starts = torch.minimum(starts.clamp_min(0), limits)
    if k == 0:
        empty = torch.zeros(*lead, 0, device=values.device)
        return empty.to(values.dtype), empty.long(), torch.zeros(lead, dtype=torch.long, device=values.device)
    if use_numba is None:
        use_numba = HAVE_NUMBA and values.device.type == "cpu"
    if use_numba:
        rows = values.reshape(-1, n).float().contiguous().numpy()
        row_limits = limits.reshape(-1).to(torch.int64).contiguous().numpy()
        row_starts = (np.zeros(row_limits.shape, dtype=np.int64) if starts is None
                      else starts.reshape(-1).to(torch.int64).contiguous().numpy())
        keys = np.zeros((rows.shape[0], k), dtype=np.int64)
        top = np.zeros((rows.shape[0], k), dtype=np.float32)
        counts = np.empty(rows.shape[0], dtype=np.int64)
        _topk_kernel(rows, row_starts, row_limits, k, keys, top, counts)
        top_values, top_keys, count = torch.from_numpy(top), torch.from_numpy(keys), torch.from_numpy(counts)
        top_values = top_values.to(values.dtype)
    else:
        key = torch.arange(n, device=values.device)
        visible = key < limits.reshape(-1, 1)  # [row, key]
        if starts is not None:
            visible &= key >= starts.reshape(-1, 1)
        ranked = values.reshape(-1, n).masked_fill(~visible, float("-inf"))
        top_values, top_keys = ranked.topk(k, dim=-1, sorted=True)
        count = visible.sum(dim=-1).clamp_max(k)
        slot_valid = torch.arange(k, device=values.device) < count[:, None]
        top_values = top_values.masked_fill(~slot_valid, 0.0)
        top_keys = top_keys.masked_fill(~slot_valid, 0)
    return top_values.view(*lead, k), top_keys.view(*lead, k), count.view(lead)
