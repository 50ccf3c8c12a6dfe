"""The head similarity's pairwise Jensen–Shannon sums, compiled for the CPU (numba): Σ m ln m over every pair.

torch computes Σ x ln x as four passes over memory (clamp, log, multiply, sum), after the head similarity has formed
every pair's mean row m = (p + q) / 2 in memory (three more passes, over heads² / 2 copies of the rows). Here each
element is read once and its logarithm computed in registers by `log32`, Cephes' single-precision logarithm (the
exponent from the float's bits, then a degree-9 polynomial in the mantissa; relative error ≤ 3e-7, the accuracy of
a float32), written without a branch so that LLVM vectorises the loop. Terms are float32, as in torch; sums are
float64, as in torch (a float32 sum would be 1.7× faster, but off by up to 5e-8 per row).

The torch twin (`similarity._js_upper_sums`) runs on CUDA or without numba; the tests hold the two to 1e-6. (A row
entropy alone gains nothing from this: torch's one vectorised log over blocks that stay in cache is as fast.)
"""

from __future__ import annotations

import numpy as np

try:
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the package importable without it
    HAVE_NUMBA = False

# ln is taken of max(x, TINY), the smallest normal float32 (log32 reads the exponent bits: no subnormals): x ln x is
# exactly 0 at x = 0, and below 1.1e-36 in size for any x below TINY
TINY = float(np.finfo(np.float32).tiny)

if HAVE_NUMBA:
    # Only the flags that reorder arithmetic: a sum may be vectorised, and no NaN or infinity is assumed away.
    FAST = {"contract", "reassoc", "nsz", "arcp"}

    @intrinsic
    def _float_bits(typingctx, x):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """A float32's bits as an int32 (a bitcast: one register move, vectorisable)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(types.float32), codegen

    @intrinsic
    def _bits_float(typingctx, i):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """An int32's bits as a float32."""
        if i != types.int32:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @njit(inline="always", fastmath=FAST)
    def log32(x):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """ln x for a normal float32 x > 0: x = m · 2^e with m in [√½, √2), ln x = e ln 2 + ln(1 + f), f = m − 1."""
        bits = _float_bits(x)
        e = ((bits >> 23) & 0xFF) - 126
        m = _bits_float(np.int32((bits & 0x007FFFFF) | 0x3F000000))  # [0.5, 1)
        small = m < np.float32(0.70710678)
        e = e - small
        f = (m + m if small else m) - np.float32(1.0)
        z = f * f
        y = np.float32(7.0376836292e-2)
        y = y * f + np.float32(-1.1514610310e-1)
        y = y * f + np.float32(1.1676998740e-1)
        y = y * f + np.float32(-1.2420140846e-1)
        y = y * f + np.float32(1.4249322787e-1)
        y = y * f + np.float32(-1.6668057665e-1)
        y = y * f + np.float32(2.0000714765e-1)
        y = y * f + np.float32(-2.4999993993e-1)
        y = y * f + np.float32(3.3333331174e-1)
        y = y * f * z
        exponent = np.float32(e)
        y = y + np.float32(-2.12194440e-4) * exponent - np.float32(0.5) * z
        return f + y + np.float32(0.693359375) * exponent  # ln 2 = 0.693359375 − 2.12194440e-4, in two parts

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
