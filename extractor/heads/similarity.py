"""Head similarity: how alike two heads' attention rows are, over the whole corpus, and a clustering of heads.

For heads a and b, the divergence is the mean over every query row (every document, every query position)
of the Jensen–Shannon divergence between a's row and b's row for the same document and query:

    JS(p, q) = H(m) − ½H(p) − ½H(q),  m = ½(p + q),  H(p) = −Σ_k p_k log₂ p_k

in **bits** (log base 2), so 0 ≤ JS ≤ 1: 0 for identical rows, 1 for rows on disjoint keys. It is symmetric.
All pairs of heads (L·H × L·H) are computed at once with tensors; documents are streamed (sums of JS and
a row count are kept), so `update` per document, `merge` across workers and one pass over everything agree.

Cost: (L·H)²/2 · n² per document of n tokens (every row; minilm, n = 512: several CPU seconds). To bound it on
long documents, `HeadSimilarity(..., max_rows_per_doc=R)` uses R query rows of each longer document, the middles
of R equal strata of its rows (`sampled_rows`; `n_rows` counts the rows used). The default uses every row;
`extractor run` uses 4 (`similarity_rows`).
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from extractor.attribution.analysis import BatchAnalysis, DocAttention
from extractor.heads.js_kernel import HAVE_NUMBA, js_pair_sums
from extractor.heads.metrics import checked_attention, checked_batch_attention

# Most float32 elements in one [pair, query chunk, key] block (2 MiB): small enough that the block's several
# passes (gather, add, log, multiply, sum) stay in the CPU's cache; measured 1.4x faster than 32 MiB blocks.
BLOCK_ELEMENTS = 1 << 19


def x_log_x(p: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of p ln p (0 ln 0 = 0), float32 elementwise, summed in float64: [..., key] → [...].

    ln is taken of max(p, 1e-38), which changes nothing: p ln p is exactly 0 at p = 0 and below 1e-36 otherwise.
    """
    return p.clamp_min(1e-38).log_().mul_(p).sum(dim=-1, dtype=torch.float64)


def js_divergence_sums(patterns: torch.Tensor, block_elements: int = BLOCK_ELEMENTS,
                       use_numba: bool | None = None) -> torch.Tensor:
    """patterns [head, query, key] (rows are distributions) → Σ over query rows of JS in bits [head, head].

    Per row, JS(p, q) = Σ_k [½ p_k ln p_k + ½ q_k ln q_k] − Σ_k m_k ln m_k (then / ln 2), computed for every
    unordered pair a ≤ b at once and mirrored (JS is symmetric). Identical rows give m = p bit for bit (and the
    same Σ m ln m), hence exactly 0. Keys that are 0 in every head (padding; causal models: keys after the query)
    are skipped, since 0 ln 0 = 0. On the CPU one compiled pass per pair and row (`js_kernel.js_pair_sums`,
    each row up to its last key seen by any head); on CUDA, or without numba (`use_numba` False), torch, with
    query rows in chunks so that no [pair, chunk, key] block exceeds `block_elements`.
    """
    n_heads, n_query, n_key = patterns.shape
    index_a, index_b = torch.triu_indices(n_heads, n_heads, device=patterns.device)  # [pair]: a ≤ b
    if use_numba is None:
        use_numba = HAVE_NUMBA and patterns.device.type == "cpu"
    if use_numba:
        p = patterns.float()
        seen = p.amax(dim=0) > 0  # [query, key]: keys some head attends to
        limits = (seen * torch.arange(1, n_key + 1)).amax(dim=-1) if n_key else torch.zeros(n_query, dtype=torch.long)
        upper = torch.from_numpy(js_pair_sums(p.numpy(), limits.numpy(), index_a.numpy(), index_b.numpy()))
    else:
        upper = _js_upper_sums(patterns, index_a, index_b, block_elements)
    upper = upper.to(patterns.device)
    total = torch.zeros(n_heads, n_heads, dtype=torch.float64, device=patterns.device)  # [head_a, head_b]
    total[index_a, index_b] = upper
    total[index_b, index_a] = upper
    return total.cpu() / math.log(2)


def _js_upper_sums(patterns: torch.Tensor, index_a: torch.Tensor, index_b: torch.Tensor,
                   block_elements: int) -> torch.Tensor:
    """torch: Σ over query rows of JS in nats for each pair (index_a, index_b) [pair] float64."""
    _, n_query, n_key = patterns.shape
    chunk = max(1, block_elements // max(1, index_a.numel() * n_key))
    upper = torch.zeros(index_a.numel(), dtype=torch.float64, device=patterns.device)  # [pair]
    for start in range(0, n_query, chunk):
        p = patterns[:, start : start + chunk].float()  # [head, chunk, key]
        seen = p.amax(dim=(0, 1)) > 0
        if not bool(seen.all()):
            p = p[..., seen]  # [head, chunk, key seen by some head]
        p_log_p = x_log_x(p)  # [head, chunk]
        m = torch.index_select(p, 0, index_a).add_(torch.index_select(p, 0, index_b)).mul_(0.5)  # [pair, chunk, key]
        js = 0.5 * (p_log_p[index_a] + p_log_p[index_b]) - x_log_x(m)  # [pair, chunk]
        upper += js.clamp_min(0).sum(dim=-1)
    return upper


def sampled_rows(n: int, limit: int | None) -> torch.Tensor:
    """[row] query rows to use: all n, or a systematic sample of `limit` rows when n > limit.

    Row i of the sample is the middle of the i-th of `limit` equal strata of the rows, ⌊(i + ½)·n / limit⌋: spread
    over the document without always taking its first and last rows ([CLS]/[SEP] or BOS, whose attention is
    unlike the other rows' and would otherwise weigh 2/limit of every document).
    """
    if limit is None or n <= limit:
        return torch.arange(n)
    return ((torch.arange(limit, dtype=torch.float64) + 0.5) * n / limit).floor().long()


class HeadSimilarity:
    """Running mean JS divergence between every pair of heads: `update` per document, `merge`, `table`."""

    def __init__(self, n_layers: int, n_heads: int, max_rows_per_doc: int | None = None) -> None:
        if max_rows_per_doc is not None and max_rows_per_doc < 1:
            raise ValueError("max_rows_per_doc must be at least 1 (or None for every row)")
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.max_rows_per_doc = max_rows_per_doc
        total = n_layers * n_heads
        # Σ over rows of JS [head_a, head_b], heads flattened layer-major (index = layer · n_heads + head)
        self.js_total = torch.zeros(total, total, dtype=torch.float64)
        self.n_rows = 0

    def update(self, doc: DocAttention) -> None:
        """Add one document's `attention` [layer, head, query, key]."""
        attention = checked_attention(doc, self.n_layers, self.n_heads)
        rows = sampled_rows(attention.shape[-2], self.max_rows_per_doc)  # [row]
        self.js_total += js_divergence_sums(attention[..., rows, :].flatten(0, 1))  # [layer·head, row, key]
        self.n_rows += rows.numel()

    def update_batch(self, analysis: BatchAnalysis) -> None:
        """Add a whole batch at token level: each document's sampled rows gathered from the padded per-layer
        tensors at once (`update` takes one document at either level). Padded keys are 0 and add nothing."""
        attention = checked_batch_attention(analysis, self.n_layers, self.n_heads)  # per layer [batch, head, q, k]
        rows = [sampled_rows(doc.n_tokens, self.max_rows_per_doc) for doc in analysis.batch.docs]
        doc_index = torch.cat([torch.full_like(r, b) for b, r in enumerate(rows)]).to(attention[0].device)
        query = torch.cat(rows).to(attention[0].device)
        sampled = torch.stack([a[doc_index, :, query, :] for a in attention], dim=1)  # [row, layer, head, key]
        self.js_total += js_divergence_sums(sampled.flatten(1, 2).transpose(0, 1))  # [layer·head, row, key]
        self.n_rows += query.numel()

    def merge(self, other: HeadSimilarity) -> None:
        mine = (self.n_layers, self.n_heads, self.max_rows_per_doc)
        if (other.n_layers, other.n_heads, other.max_rows_per_doc) != mine:
            raise ValueError("cannot merge head similarities of different models or row sampling")
        self.js_total += other.js_total
        self.n_rows += other.n_rows

    def matrix(self) -> torch.Tensor:
        """[layer·head, layer·head] mean JS divergence in bits (NaN before any row)."""
        if self.n_rows == 0:
            return torch.full_like(self.js_total, math.nan)
        return self.js_total / self.n_rows

    def table(self) -> pd.DataFrame:
        """All ordered pairs (a == b too): layer_a, head_a, layer_b, head_b (int16), js_divergence, n_rows."""
        total = self.n_layers * self.n_heads
        index = torch.arange(total)
        grid_a, grid_b = torch.meshgrid(index, index, indexing="ij")  # [head_a, head_b]
        a, b = grid_a.flatten().numpy(), grid_b.flatten().numpy()
        return pd.DataFrame(
            {
                "layer_a": (a // self.n_heads).astype("int16"),
                "head_a": (a % self.n_heads).astype("int16"),
                "layer_b": (b // self.n_heads).astype("int16"),
                "head_b": (b % self.n_heads).astype("int16"),
                "js_divergence": self.matrix().flatten().numpy().astype("float64"),
                "n_rows": pd.Series([self.n_rows] * len(a), dtype="int64"),
            }
        )
