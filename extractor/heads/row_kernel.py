"""The per-head metrics' row statistics in one compiled pass over each row (numba).

torch reads a batch's [batch, head, query, key] pattern once per statistic: the entropy (four passes: clamp, log,
multiply, sum), the mean distance (multiply, sum), the row maximum, the row total, and a gather for the shares on
flagged keys; then the value norms once more for their total and shares. Here each row is read once, over the keys
it sees only (padding rows skipped), and every statistic is kept in registers: the entropy's logarithm by
`float32_math.log32`, the maximum over the floats' bits (non-negative floats order like their bits as integers, and
an integer maximum vectorises where a float one does not). Terms and row sums are float32, as in torch.

The torch twin (`metrics.row_statistics` with `use_numba=False`) runs on CUDA or without numba; the tests hold the
two to float32 rounding.
"""

from __future__ import annotations

import numpy as np

from extractor.heads.float32_math import FAST, HAVE_NUMBA, TINY

SETS = 3  # flag sets the kernel sums over (punctuation, [CLS], [SEP]), as three registers

if HAVE_NUMBA:
    from numba import njit, prange

    from extractor.heads.float32_math import bits_float, float_bits, log32

    @njit(fastmath=FAST)
    def _sums(rows, r, b, limit, key_sets, total, on_keys):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Row r's total over keys [0, limit) into total[r], and over each flag set's keys into on_keys[r]."""
        mass = np.float32(0.0)
        on0 = np.float32(0.0)
        on1 = np.float32(0.0)
        on2 = np.float32(0.0)
        for k in range(limit):
            a = rows[r, k]
            mass += a
            on0 += a * key_sets[b, 0, k]
            on1 += a * key_sets[b, 1, k]
            on2 += a * key_sets[b, 2, k]
        total[r] = mass
        on_keys[r, 0], on_keys[r, 1], on_keys[r, 2] = on0, on1, on2

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _row_kernel(pattern, values, limits, n_heads, key_sets,  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
                    entropy, distance, largest, total, on_keys, value_total, value_on_keys):
        n_rows, n_keys = pattern.shape
        with_values = values.shape[0] > 0
        for r in prange(n_rows):
            query = r % n_keys
            b = r // (n_heads * n_keys)
            limit = limits[b, query]
            if limit == 0:  # a padding row
                continue
            at = np.float32(query)
            plogp = np.float32(0.0)
            moved = np.float32(0.0)
            top = np.int32(0)
            for k in range(limit):
                a = pattern[r, k]
                plogp += a * log32(max(a, np.float32(TINY)))
                moved += a * abs(at - np.float32(k))
                top = max(top, np.int32(float_bits(a) & np.int32(0x7FFFFFFF)))  # no sign: -0 is 0, NaN stays NaN
            entropy[r] = -plogp
            distance[r] = moved
            largest[r] = bits_float(top)
            _sums(pattern, r, b, limit, key_sets, total, on_keys)  # the row again, from the cache
            if with_values:
                _sums(values, r, b, limit, key_sets, value_total, value_on_keys)


def row_statistics_arrays(pattern: np.ndarray, values: np.ndarray | None, limits: np.ndarray, key_sets: np.ndarray,
                          ) -> dict[str, np.ndarray]:
    """pattern [batch, head, query, key] float32 (rows: distributions over keys; every key at or past a row's limit
    is 0), values: value_norm of the same shape or None, limits [batch, query] (a row sees keys below its limit; 0:
    a padding row), key_sets [batch, flag set, key] (1 where a key is in a set, else 0; at most SETS sets) → per row
[batch, head, query]:

    `entropy` −Σ_j A_ij ln A_ij, `distance` Σ_j A_ij |i − j|, `max` max_j A_ij, `total` Σ_j A_ij, `on_keys`
    [..., flag set] Σ over each set's keys; with values, `value_total` and `value_on_keys` likewise. 0 on padding
    rows. A pattern with NaN gives NaN (the maximum included)."""
    batch, n_heads, n_query, n_keys = pattern.shape
    if n_query != n_keys:
        raise ValueError(f"pattern has {n_query} queries and {n_keys} keys; the kernel takes square patterns")
    rows = np.ascontiguousarray(pattern, dtype=np.float32).reshape(-1, n_keys)
    value_rows = (np.zeros((0, n_keys), np.float32) if values is None
                  else np.ascontiguousarray(values, dtype=np.float32).reshape(-1, n_keys))
    n_sets = key_sets.shape[1]
    if n_sets > SETS:
        raise ValueError(f"{n_sets} flag sets; the kernel takes at most {SETS}")
    sets = np.zeros((batch, SETS, n_keys), np.float32)
    sets[:, :n_sets] = key_sets
    out = {name: np.zeros(rows.shape[0], np.float32) for name in ("entropy", "distance", "max", "total", "value_total")}
    out["on_keys"] = np.zeros((rows.shape[0], SETS), np.float32)
    out["value_on_keys"] = np.zeros((rows.shape[0], SETS), np.float32)
    _row_kernel(rows, value_rows, np.ascontiguousarray(limits, dtype=np.int64), n_heads, sets,
                out["entropy"], out["distance"], out["max"], out["total"], out["on_keys"], out["value_total"],
                out["value_on_keys"])
    lead = (batch, n_heads, n_query)
    out["on_keys"], out["value_on_keys"] = out["on_keys"][:, :n_sets], out["value_on_keys"][:, :n_sets]
    shaped = {name: out[name].reshape(*lead, *out[name].shape[1:]) for name in out}
    if values is None:
        del shaped["value_total"], shaped["value_on_keys"]
    return shaped
