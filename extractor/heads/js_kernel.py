"""The head similarity's pairwise Jensen–Shannon sums, compiled for the CPU (numba): Σ m ln m over every pair.

torch computes Σ x ln x as four passes over memory (clamp, log, multiply, sum), after the head similarity has formed
every pair's mean row m = (p + q) / 2 in memory (three more passes, over heads² / 2 copies of the rows). Here each
element is read once and its logarithm computed in registers by `float32_math.log32` (relative error ≤ 3e-7),
which LLVM vectorises. Terms are float32, as in torch; sums are float64, as in torch (a float32 sum would be 1.7×
faster, but off by up to 5e-8 per row).

The torch twin (`similarity._js_upper_sums`) runs on CUDA or without numba; the tests hold the two to 1e-6.
"""

from __future__ import annotations

import numpy as np

from extractor.heads.float32_math import FAST, HAVE_NUMBA, TINY

if HAVE_NUMBA:
    from numba import njit, prange

    from extractor.heads.float32_math import log32

    @njit(inline="always", fastmath=FAST)
    def _mean_row_xlogx(p, a, b, row, limit):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Σ_k m ln m over keys [0, limit) of `row`, m = (p[a, row] + p[b, row]) / 2 (m = p[a, row] when a = b)."""
        total = 0.0
        for k in range(limit):
            m = np.float32(0.5) * (p[a, row, k] + p[b, row, k])
            total += np.float64(m * log32(max(m, np.float32(TINY))))
        return total

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _js_kernel(p, limits, index_a, index_b, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        n_heads, n_rows, _ = p.shape
        own = np.empty((n_heads, n_rows))  # [head, row] Σ p ln p, by the same loop as the pairs' (a = b)
        for h in prange(n_heads):
            for row in range(n_rows):
                own[h, row] = _mean_row_xlogx(p, h, h, row, limits[row])
        for pair in prange(index_a.shape[0]):
            a, b = index_a[pair], index_b[pair]
            total = 0.0
            for row in range(n_rows):
                js = 0.5 * (own[a, row] + own[b, row]) - _mean_row_xlogx(p, a, b, row, limits[row])
                total += max(js, 0.0)
            out[pair] = total


def js_pair_sums(patterns: np.ndarray, limits: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """patterns [head, row, key] float32 (rows are distributions), limits [row] (keys [0, limit) of each row; the
    rest are 0 in every head), index_a, index_b [pair] → Σ over rows of JS(p_a, p_b) in nats [pair] float64.

    Per row, JS = ½ Σ p_a ln p_a + ½ Σ p_b ln p_b − Σ m ln m with m = ½ (p_a + p_b), clamped at 0. Each head's own
    term comes from the same loop as the pairs' (m = p when a = b), so identical rows give exactly 0."""
    out = np.zeros(len(index_a), dtype=np.float64)
    _js_kernel(np.ascontiguousarray(patterns, dtype=np.float32), np.ascontiguousarray(limits, dtype=np.int64),
               np.ascontiguousarray(index_a, dtype=np.int64), np.ascontiguousarray(index_b, dtype=np.int64), out)
    return out
