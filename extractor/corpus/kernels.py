"""Row kernels that torch does slowly on CPU: top-k per row of a pattern, over each row's visible keys only.

`torch.topk` on CPU partially sorts a copy of every row. `topk_rows` compiles (numba, cached on disk) a selection
over each row's visible keys [start, limit) only (start > 0 under a sliding window: this replaces the masked copy
that padding, causal and window masks needed before `torch.topk`), in three steps that branch little:

1. Blocks of 8 keys and their maxima. The k-th largest block maximum t is a lower bound of the row's k-th largest
   value (k distinct keys reach it), so every key of the top k lies in a block whose maximum is ≥ t: on attention
   rows about k blocks.
2. The keys ≥ t of those blocks (about 2k on attention rows) are copied out, in key order, without a branch. A row
   of k blocks or fewer (64 keys or fewer for k = 8) skips steps 1 and 2: all its keys are the candidates.
3. For k ≤ 8, eight running slots held in registers take each candidate by min/max alone, as one integer that orders
   by value and then by the earlier key (the float's bits made monotone, above the key's complement): no branch and
   no tie rule. The keys come back from the slots and the values are read from the row. For k > 8 the candidates go
   through insertion into a sorted buffer instead (t too comes from inserting the block maxima).

The block maxima and their k-th largest are computed with fast-math, which may assume no NaN or infinity: a row
whose (vectorised) sum is not finite skips steps 1 and 2 too, its candidates every visible key but NaN (ranked as
integers, infinities order like any value). Fewer than k candidates go through the sorted buffer. Rows run in
parallel, in chunks that reuse their scratch arrays. On CUDA, or without numba, the same contract runs on torch.

`kept_topk_columns` then turns the kernel's rows into the association table's columns in one more compiled pass
(document ids, heads, document positions, the kept values and each row's kept mass, the other measures read at
the kept keys), written once in the table's order instead of through index grids, gathers and casts in torch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

try:
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the package importable without it
    HAVE_NUMBA = False


BLOCK = 8  # keys per block for the lower bound
SLOTS = 8  # k up to this takes the register slots
CHUNK = 256  # rows per parallel task, sharing one set of scratch arrays

if HAVE_NUMBA:
    U0, U1, UBLOCK = np.uint64(0), np.uint64(1), np.uint64(BLOCK)  # unsigned indices: no negative-index wraparound
    LOWEST = np.float32(np.finfo(np.float32).min)
    LOW32 = np.int64(0xFFFFFFFF)
    QMIN = np.int64(np.iinfo(np.int64).min)

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

    # The fast-math helpers are plain (not numba-inlined) functions: numba's inline="always" would compile their body
    # with the caller's flags. LLVM inlines them and keeps their flags.
    @njit(fastmath={"reassoc"})
    def _sum(values, r, lo, hi):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Sum of values[r, lo:hi], vectorised: not finite if any value is NaN or infinite (or it overflows)."""
        total = np.float32(0.0)
        for i in range(lo, hi):
            total += values[r, i]
        return total

    @njit(fastmath=True)
    def _block_max(values, r, lo, hi):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        best = values[r, lo]
        for i in range(lo + U1, hi):
            best = max(best, values[r, i])
        return best

    @njit(fastmath=True)
    def _max8(values, r, lo):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Maximum of the 8 keys from lo, as a tree of independent maxima."""
        a = max(values[r, lo], values[r, lo + np.uint64(1)])
        b = max(values[r, lo + np.uint64(2)], values[r, lo + np.uint64(3)])
        c = max(values[r, lo + np.uint64(4)], values[r, lo + np.uint64(5)])
        d = max(values[r, lo + np.uint64(6)], values[r, lo + np.uint64(7)])
        return max(max(a, b), max(c, d))

    @njit(fastmath=True)
    def _top_8(xs, n, lowest, slots):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """The 8 largest of xs[:n] (finite floats, or integers), descending, into slots (`lowest` where n < 8): eight
        slots in registers, each new value shifting the smaller ones down by min/max alone."""
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = lowest
        for i in range(U0, n):
            x = xs[i]
            t7 = max(min(t6, x), t7)
            t6 = max(min(t5, x), t6)
            t5 = max(min(t4, x), t5)
            t4 = max(min(t3, x), t4)
            t3 = max(min(t2, x), t3)
            t2 = max(min(t1, x), t2)
            t1 = max(min(t0, x), t1)
            t0 = max(t0, x)
        slots[0], slots[1], slots[2], slots[3] = t0, t1, t2, t3
        slots[4], slots[5], slots[6], slots[7] = t4, t5, t6, t7

    @njit
    def _ranked(bits, keys, found, ranks):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Each of the `found` candidates (float32 bits and keys) as one int64 whose order is the contract's: larger
        value first, then the earlier key. High half: the float's bits made monotone (negative floats' magnitude bits
        flipped, and -0.0 moved onto +0.0 so that equal floats stay equal); low half: the complement of the key."""
        for i in range(U0, found):
            b = np.int64(bits[i])
            sign = b >> 63
            ranks[i] = (((b ^ (sign & 0x7FFFFFFF)) - sign) << 32) | (LOW32 - keys[i])

    @njit(parallel=True, cache=True, boundscheck=False)
    def _topk_kernel(values, starts, limits, k, out_keys, out_values, out_counts, out_totals):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        rows, n = values.shape
        n_chunks = (rows + CHUNK - 1) // CHUNK
        for c in prange(n_chunks):
            maxima = np.empty(n // BLOCK + 1, dtype=np.float32)
            chosen = np.empty(n // BLOCK + 1, dtype=np.uint64)
            cand_v = np.empty(n, dtype=np.float32)
            cand_bits = cand_v.view(np.int32)
            cand_k = np.empty(n, dtype=np.int64)
            max_slots = np.empty(SLOTS, dtype=np.float32)
            slots = np.empty(SLOTS, dtype=np.int64)
            ranks = np.empty(n, dtype=np.int64)
            first = np.int64(c) * CHUNK
            for r in range(first, min(rows, first + CHUNK)):
                start = np.uint64(starts[r])
                limit = np.uint64(limits[r])
                width = np.int64(limit - start)
                m = (width + BLOCK - 1) // BLOCK  # blocks from start, the last one maybe short
                full = width // BLOCK
                total = _sum(values, r, start, limit)
                out_totals[r] = total
                count = 0
                found = U0
                if m > k and total - total == 0:  # a finite row of more than k blocks: candidates from the block bound
                    for b in range(full):
                        maxima[b] = _max8(values, r, start + np.uint64(b) * UBLOCK)
                    if full < m:
                        maxima[full] = _block_max(values, r, start + np.uint64(full) * UBLOCK, limit)
                    if k <= SLOTS:
                        _top_8(maxima, np.uint64(m), LOWEST, max_slots)
                        threshold = max_slots[k - 1]
                    else:
                        for b in range(m):
                            if count < k or maxima[b] > out_values[r, k - 1]:
                                count = _insert(out_values, out_keys, r, count, k, maxima[b], b)
                        threshold = out_values[r, k - 1]
                    n_chosen = 0
                    for b in range(m):  # the blocks that can hold a key ≥ threshold, without a branch
                        chosen[n_chosen] = b
                        n_chosen += maxima[b] >= threshold
                    for i in range(n_chosen):
                        lo = start + chosen[i] * UBLOCK
                        if chosen[i] < np.uint64(full):  # a whole block: a constant trip count, unrolled
                            for o in range(U0, UBLOCK):
                                v = values[r, lo + o]
                                cand_v[found] = v
                                cand_k[found] = lo + o
                                found += np.uint64(v >= threshold)
                        else:
                            for j in range(lo, limit):
                                v = values[r, j]
                                cand_v[found] = v
                                cand_k[found] = j
                                found += np.uint64(v >= threshold)
                else:  # k blocks or fewer, or not finite: every visible key is a candidate, NaN skipped
                    for j in range(start, limit):
                        v = values[r, j]
                        cand_v[found] = v
                        cand_k[found] = j
                        found += np.uint64(v == v)
                if k <= SLOTS and np.int64(found) >= k:  # the top k in the register slots
                    _ranked(cand_bits, cand_k, found, ranks)
                    _top_8(ranks, found, QMIN, slots)
                    for s in range(k):
                        key = LOW32 - (slots[s] & LOW32)
                        out_keys[r, s] = key
                        out_values[r, s] = values[r, key]
                    count = k
                else:  # k > 8, or fewer than k candidates: insertion into a sorted buffer
                    count = 0
                    kth = -np.inf
                    for i in range(U0, found):
                        v = cand_v[i]
                        if count < k or v > kth:
                            count = _insert(out_values, out_keys, r, count, k, v, cand_k[i])
                            kth = out_values[r, k - 1]
                for slot in range(count, k):  # rows with fewer than k visible keys (or NaN values): empty slots
                    out_values[r, slot] = 0.0
                    out_keys[r, slot] = 0
                out_counts[r] = count


class TopK(NamedTuple):
    """`topk_rows`' result: slots at or beyond a row's count (rows with fewer than k visible keys) hold value 0
    and key 0."""

    values: torch.Tensor  # [..., k] descending
    keys: torch.Tensor  # [..., k]
    counts: torch.Tensor  # [...] filled slots
    totals: torch.Tensor  # [...] float32: the sum of each row's visible keys (NaN if any is NaN)


def topk_rows(
    values: torch.Tensor,
    limits: torch.Tensor,
    k: int,
    use_numba: bool | None = None,
    starts: torch.Tensor | None = None,
) -> TopK:
    """The k largest values of each row among its visible keys [start, limit), in descending order, and each row's
    total over those keys (the kernel reads every visible key for its block maxima anyway).

    values: [..., key]; limits: [...] (int, 0 = no visible key); starts: [...] the first visible key of each row
    (a sliding window), None: 0 for every row. Ties keep the earlier key first. Limits beyond the row are read
    as the row's length.
    NaN values are never selected on the numba path: a row holding NaN gets the k largest of its other visible keys
    (torch.topk ranks NaN first instead); softmax patterns hold none.
    """
    n = values.shape[-1]
    k = min(k, n)
    lead = values.shape[:-1]
    limits = limits.clamp(0, n)  # the kernel reads keys [start, limit) without bounds checks
    if starts is not None:
        starts = torch.minimum(starts.clamp_min(0), limits)
    if k == 0:
        empty = torch.zeros(*lead, 0, device=values.device)
        none = torch.zeros(lead, device=values.device)
        return TopK(empty.to(values.dtype), empty.long(), none.long(), none)
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
        totals = np.empty(rows.shape[0], dtype=np.float32)
        _topk_kernel(rows, row_starts, row_limits, k, keys, top, counts, totals)
        top_values, top_keys, count = torch.from_numpy(top), torch.from_numpy(keys), torch.from_numpy(counts)
        top_values, total = top_values.to(values.dtype), torch.from_numpy(totals)
    else:
        key = torch.arange(n, device=values.device)
        visible = key < limits.reshape(-1, 1)  # [row, key]
        if starts is not None:
            visible &= key >= starts.reshape(-1, 1)
        total = values.reshape(-1, n).float().masked_fill(~visible, 0.0).sum(dim=-1)
        ranked = values.reshape(-1, n).masked_fill(~visible, float("-inf"))
        top_values, top_keys = ranked.topk(k, dim=-1, sorted=True)
        count = visible.sum(dim=-1).clamp_max(k)
        slot_valid = torch.arange(k, device=values.device) < count[:, None]
        top_values = top_values.masked_fill(~slot_valid, 0.0)
        top_keys = top_keys.masked_fill(~slot_valid, 0)
    return TopK(top_values.view(*lead, k), top_keys.view(*lead, k), count.view(lead), total.view(lead))


if HAVE_NUMBA:

    @njit(inline="always")
    def _table_row(o, n_groups, n_batch, n_query):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Table-order row o over (group, batch, query) → (r, its row in storage order [batch, group, query]; g, b, q)."""
        q = o % n_query
        b = (o // n_query) % n_batch
        g = o // (n_query * n_batch)
        return (b * n_groups + g) * n_query + q, g, b, q

    @njit(parallel=True, cache=True, boundscheck=False)
    def _kept_rows_kernel(keys, tops, counts, totals, n_groups, n_batch, n_query, positions, labels, head_level,  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
                          offsets, out_labels, out_head, out_query, out_key, out_rank, out_mass):
        """Scatter `_topk_kernel`'s rows (storage order [batch, group, query]) into table columns in the table's
        order (group, batch, query, slot), each row's filled slots at offsets[o] (o its table-order index).
        labels: [label, batch] per-document values (doc_id, window) copied onto each kept cell."""
        k = keys.shape[1]
        for o in prange(n_groups * n_batch * n_query):
            r, g, b, q = _table_row(o, n_groups, n_batch, n_query)
            kept = np.float32(0.0)
            for s in range(k):  # empty slots hold 0
                kept += tops[r, s]
            mass = kept / max(totals[r], np.float32(1e-30))
            start = offsets[o]
            for s in range(counts[r]):
                i = start + s
                for label in range(labels.shape[0]):
                    out_labels[label, i] = labels[label, b]
                out_head[i] = g if head_level else -1
                out_query[i] = positions[b, q]
                out_key[i] = positions[b, keys[r, s]]
                out_rank[i] = tops[r, s]
                out_mass[i] = mass

    @njit(parallel=True, cache=True, boundscheck=False)
    def _kept_values_kernel(values, keys, counts, n_groups, n_batch, n_query, offsets, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """Another measure's values [row, key] (storage order) at the kept rows' keys, in the table's order."""
        for o in prange(n_groups * n_batch * n_query):
            r, _, _, _ = _table_row(o, n_groups, n_batch, n_query)
            start = offsets[o]
            for s in range(counts[r]):
                out[start + s] = values[r, keys[r, s]]


def kept_topk_columns(
    top: TopK, companions: dict[str, torch.Tensor], positions: torch.Tensor, labels: dict[str, torch.Tensor],
    head_level: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Table columns of `topk_rows`' result, in one compiled pass (the numba path of `tables.select_columns`).

    top: `topk_rows` of a ranking measure in storage order, fields [batch, group, query, k] (group: heads, or 1);
    companions: the other measures, each [batch, group, query, key] in the same order; positions [batch, pos]
    each matrix index's document position; labels: name → [batch] integer values per document (doc_id, window).
    Rows come out in (group, batch, query, slot) order, each row's filled slots only. Returns (the index columns:
    every label (int64), head (int16, −1 for layer rows), query_pos and key_pos (int32), and the ranking
    measure's values under "rank" (float32); the kept mass of each kept cell's row (float32); each companion's
    values at the kept keys (float32)).
    """
    n_batch, n_groups, n_query, k = top.keys.shape
    rows = n_batch * n_groups * n_query
    keys = top.keys.reshape(rows, k).numpy()
    counts = top.counts.reshape(rows).numpy()
    # each table-order row's first slot: the counts in (group, batch, query) order, summed
    ordered = top.counts.reshape(n_batch, n_groups, n_query).transpose(0, 1).reshape(-1).numpy()
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(ordered, out=offsets[1:])
    n_kept = int(offsets[-1])
    batch_labels = np.stack([v.to(torch.int64).numpy() for v in labels.values()]) if labels \
        else np.zeros((0, n_batch), np.int64)
    out_labels = np.empty((len(labels), n_kept), np.int64)
    columns: dict[str, np.ndarray] = {"head": np.empty(n_kept, np.int16), "query_pos": np.empty(n_kept, np.int32),
               "key_pos": np.empty(n_kept, np.int32), "rank": np.empty(n_kept, np.float32)}
    kept_mass = np.empty(n_kept, np.float32)
    _kept_rows_kernel(keys, top.values.reshape(rows, k).float().numpy(), counts, top.totals.reshape(rows).numpy(),
                      n_groups, n_batch, n_query, positions.to(torch.int32).contiguous().numpy(), batch_labels,
                      head_level, offsets, out_labels, columns["head"], columns["query_pos"], columns["key_pos"],
                      columns["rank"], kept_mass)
    columns.update(zip(labels, out_labels, strict=True))
    values: dict[str, np.ndarray] = {}
    for name, companion in companions.items():
        out = np.empty(n_kept, np.float32)
        _kept_values_kernel(companion.float().reshape(rows, -1).contiguous().numpy(), keys, counts, n_groups, n_batch,
                            n_query, offsets, out)
        values[name] = out
    return columns, kept_mass, values
