"""Which measure to trust: per-layer rank agreement between measures, value zeroing (an intervention) included.

For each layer and each pair of measures (a, b), each real query row i of each document gives Spearman's ρ
between a[i, :] and b[i, :] over the keys row i sees (ties get their average rank); under a sliding window, over
the keys both measures see (the layer's window; for two rolled-out measures, the keys their layers reach
together). Rows where either measure is constant (ρ undefined, e.g. a causal row with one key) are left out.
The table reports the mean ρ over all remaining rows of all documents (each row weighs the same) and how many
rows that is.

Head-level measures (`attention`, `value_norm`) are reduced to the layer level by the mean over heads, so that
every measure is one [query, key] matrix per layer. Stored measures are compared as stored: `rollout`, `alti`
and `globenc` are rolled out up to the layer; `alti_layer`, `globenc_layer` and `value_zeroing` are the layer's
own. Where a measure was not computed (value zeroing outside its layers or documents: NaN) the pair's rows are
skipped, so each mean is over the documents and layers where both measures exist; a layer where a pair never
does has no row.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import pandas as pd
import torch

from extractor.attribution.analysis import BatchAnalysis, FirstKeys, analyse_batch
from extractor.attribution.layer_pass import computed_documents, visibility
from extractor.attribution.measures import HEAD_MEASURES
from extractor.core.encode import encode
from extractor.core.models import LoadedModel

ROW_BLOCK_ELEMENTS = 1 << 22  # elements of one [rows, key, key] comparison tensor


def average_ranks(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row's valid entries, ties averaged (scipy's `rankdata`); 0 where not valid.

    values, valid [rows, key] → [rows, key] float64. Counts pairwise comparisons, [rows, key, key] at a time.
    """
    rows, n = values.shape
    ranks = torch.zeros(rows, n, dtype=torch.float64, device=values.device)
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, n * n))
    for start in range(0, rows, step):
        v, ok = values[start : start + step], valid[start : start + step]  # [block, key]
        other = v[:, None, :]  # [block, 1, key]: every key j compared with each key i
        below = ((other < v[:, :, None]) & ok[:, None, :]).sum(dim=-1)  # [block, key]
        equal = ((other == v[:, :, None]) & ok[:, None, :]).sum(dim=-1)  # [block, key], itself included
        ranks[start : start + step] = (below + (equal + 1) / 2).double() * ok
    return ranks


def row_spearman(a: torch.Tensor, b: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spearman's ρ per query row over its visible keys: a, b, visible [batch, query, key] → (ρ [batch·query]
    float64, defined [batch·query] bool); ρ is 0 where not defined (fewer than 2 keys or a constant row)."""
    n = a.shape[-1]
    valid = visible.reshape(-1, n)  # [rows, key]
    ra = average_ranks(a.reshape(-1, n), valid)  # [rows, key]
    rb = average_ranks(b.reshape(-1, n), valid)
    count = valid.sum(dim=-1).clamp_min(1).double()  # [rows]
    da = (ra - ra.sum(dim=-1, keepdim=True) / count[:, None]) * valid  # centred ranks, 0 off the row
    db = (rb - rb.sum(dim=-1, keepdim=True) / count[:, None]) * valid
    var_a, var_b = da.pow(2).sum(dim=-1), db.pow(2).sum(dim=-1)  # [rows]
    defined = (var_a > 0) & (var_b > 0)
    rho = (da * db).sum(dim=-1) / (var_a * var_b).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(defined, rho, torch.zeros_like(rho)), defined


def layer_level(name: str, matrix: torch.Tensor) -> torch.Tensor:
    """A measure as one [batch, query, key] matrix: head measures [batch, head, query, key] by the mean over heads."""
    return matrix.mean(dim=1) if name in HEAD_MEASURES else matrix


def both_see(
    visible: torch.Tensor, first_a: torch.Tensor | None, first_b: torch.Tensor | None
) -> torch.Tensor:
    """visible [batch, query, key] bool without a window, narrowed to the keys from the later of two measures'
    first keys on (first_a, first_b: [query] under a sliding window, None: key 0)."""
    firsts = [f for f in (first_a, first_b) if f is not None]
    if not firsts:
        return visible
    first = firsts[0] if len(firsts) == 1 else torch.maximum(firsts[0], firsts[1])  # [query]
    key = torch.arange(visible.shape[-1], device=visible.device)
    return visible & (key >= first.to(visible.device)[:, None])  # [batch, query, key]


def agreement_sums(
    per_layer: dict[str, list[torch.Tensor]],
    visible: torch.Tensor,
    first_keys: FirstKeys | None = None,
) -> dict[tuple[int, str, str], tuple[float, int]]:
    """(layer, measure_a, measure_b) → (Σ ρ over defined rows, number of those rows) for one batch; a pair
    of a layer where no document has both measures (NaN: not computed) has no entry.

    per_layer: name → per layer [batch, head, query, key] (head measures) or [batch, query, key]; visible
    [batch, query, key] bool (real rows, keys each row sees without a sliding window); first_keys: (names,
    layer) → [query] where a measure's rows start under a sliding window (`BatchAnalysis.first_keys`).
    """
    names = list(per_layer)
    sums: dict[tuple[int, str, str], tuple[float, int]] = {}
    for layer in range(len(per_layer[names[0]])):
        matrices = {name: layer_level(name, per_layer[name][layer]) for name in names}
        firsts = {name: None if first_keys is None else first_keys((name,), layer) for name in names}
        computed = {name: computed_documents(matrix) for name, matrix in matrices.items()}  # [batch] each
        for a, b in combinations(names, 2):
            both = computed[a] & computed[b]  # [batch]
            if not both.any():
                continue
            seen = both_see(visible, firsts[a], firsts[b]) & both[:, None, None]
            rho, defined = row_spearman(matrices[a], matrices[b], seen)
            sums[(layer, a, b)] = (float(rho[defined].sum()), int(defined.sum()))
    return sums


def agreement_frame(sums: dict[tuple[int, str, str], tuple[float, int]]) -> pd.DataFrame:
    """The tidy table: layer, measure_a, measure_b, spearman (mean ρ over rows), n_rows."""
    records = [
        {"layer": layer, "measure_a": a, "measure_b": b, "spearman": total / count if count else float("nan"),
         "n_rows": count}
        for (layer, a, b), (total, count) in sums.items()
    ]
    return pd.DataFrame.from_records(records, columns=["layer", "measure_a", "measure_b", "spearman", "n_rows"])


class MeasureAgreement:
    """Running agreement sums over a corpus: `update_batch` per analysed batch, `merge` parts, `table` at the end."""

    def __init__(self, causal: bool) -> None:
        self.causal = causal
        self.sums: dict[tuple[int, str, str], tuple[float, int]] = {}

    def update_batch(self, analysis: BatchAnalysis) -> None:
        """Add a batch's rows (token level, straight from its padded per-layer tensors); needs two measures."""
        if len(analysis.per_layer) < 2:
            return
        visible = visibility(analysis.batch.attention_mask, self.causal)
        self._add(agreement_sums(analysis.per_layer, visible, analysis.first_keys))

    def _add(self, sums: dict[tuple[int, str, str], tuple[float, int]]) -> None:
        for key, (total, count) in sums.items():
            before = self.sums.get(key, (0.0, 0))
            self.sums[key] = (before[0] + total, before[1] + count)

    def merge(self, other: MeasureAgreement) -> None:
        self._add(other.sums)

    def table(self) -> pd.DataFrame:
        return agreement_frame(self.sums)


def agreement_table(
    loaded: LoadedModel,
    texts: Sequence[str],
    measures: Sequence[str] = ("attention", "value_norm", "rollout", "alti", "globenc", "alti_layer", "globenc_layer",
                               "value_zeroing"),
    batch_size: int = 16,
    max_length: int | None = None,
) -> pd.DataFrame:
    """Per layer and pair of `measures`, the mean per-row Spearman ρ over the documents `texts` (token level)."""
    agreement = MeasureAgreement(loaded.adapter.causal)
    for start in range(0, len(texts), batch_size):
        batch = encode(loaded.tokenizer, list(texts[start : start + batch_size]), max_length, loaded.device,
                       loaded.model.config)
        agreement.update_batch(analyse_batch(loaded, batch, measures, verify=False))
    return agreement.table()
