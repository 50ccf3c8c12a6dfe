"""Per-head metrics over a whole corpus, streamed one document at a time (never holding all matrices).

Every metric is kept as a running (total, weight) pair per (layer, head), so that updating document by
document, merging workers' partial stats, or computing on all rows at once give the same numbers.

Row metrics: the mean over query rows i (of every document) of a per-row value of A = attention[layer, head]:

- `entropy`:            H_i = −Σ_j A_ij ln A_ij (nats).
- `entropy_normalised`: H_i / ln(row length), the row length being the keys row i sees: i + 1 for causal
                        models, n otherwise, min(i + 1, window) under a sliding window. Rows of length 1
                        (the first causal row, ln 1 = 0) are left out. A uniform row scores 1.
- `mean_distance`:      Σ_j A_ij |i − j|, with i, j positions in the sequence the model saw (matrix indices).
- `first_token`:        A_i0, over the rows that see key 0 (under a sliding window, not the rows past it).
- `cls`, `sep`:         Σ_j A_ij over keys j whose token is the [CLS] (resp. [SEP]) token;
                        NaN if the model has none.
- `self`:               A_ii.
- `previous_token`:     A_i,i−1 over rows i ≥ 1 (the first row has no previous token).
- `next_token`:         A_i,i+1 over rows i ≤ n − 2 (the last row has no next token).
- `punctuation`:        Σ_j A_ij over non-special keys whose text is all punctuation.
- `max_weight`:         max_j A_ij.
- `cls_value_norm`, `sep_value_norm`: as `cls`/`sep` on value_norm rows first normalised to sum to 1
                        (each key's share of the row); NaN when value_norm was not computed.

Pattern detectors (TransformerLens head-detector patterns), each a ratio of sums over the corpus:
score = Σ A⊙P / Σ A, both sums taken over the query rows where the reference pattern P [query, key] has at
least one 1 among the keys the row sees (rows without any visible reference key, e.g. whose earlier
occurrence lies before a sliding window, neither help nor hurt the score). A head that puts all of its
attention on P scores 1.

- `previous_token_score`:  P_ij = 1 iff j = i − 1.
- `duplicate_token_score`: P_ij = 1 iff j < i and token j == token i (an earlier occurrence of the token).
- `induction_score`:       P_ij = 1 iff 1 ≤ j ≤ i and token j − 1 == token i with j − 1 < i: the token *after*
                           an earlier occurrence of the current token. Causal models only (NaN otherwise).

Tokens are compared by their text (token level: the tokenizer's tokens; word level: the word's pieces).
Under a sliding window each layer's rows see keys [first, limit) (`recompute.visible_range`; word level: the
words their pieces see), and every count of visible keys above is that layer's.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch

from extractor.attribution.analysis import BatchAnalysis, DocAttention
from extractor.attribution.attention import row_entropy
from extractor.core.encode import strip_subword_markers
from extractor.core.recompute import visible_keys
from extractor.heads.names import DETECTORS, METRICS, ROW_METRICS  # noqa: F401 - the metrics this module computes
from extractor.heads.row_kernel import HAVE_NUMBA, row_statistics_arrays

# --- token properties --------------------------------------------------------------------------------------


def is_punctuation(token: str) -> bool:
    """Whether a token's text, without subword markers, is non-empty and all punctuation (Unicode P*)."""
    text = strip_subword_markers(token).strip()
    return bool(text) and all(unicodedata.category(c).startswith("P") for c in text)


def position_specials(doc: DocAttention) -> list[bool]:
    """Per matrix position: whether it is a special token (word level: a word made of special tokens)."""
    if doc.level == "token":
        return list(doc.doc.is_special)
    special: dict[int, bool] = {}
    for word, flag in zip(doc.doc.word_index, doc.doc.is_special, strict=True):
        special[word] = special.get(word, False) or flag
    return [special[w] for w in sorted(special)]


# --- reference patterns [query, key] ----------------------------------------------------------------------


def previous_token_pattern(n: int) -> torch.Tensor:
    """[query, key] bool: P_ij = 1 iff j = i − 1."""
    return torch.ones(n, n, dtype=torch.bool).tril(-1).triu(-1)


def same_token(labels: list[str]) -> torch.Tensor:
    """[query, key] bool: token i == token j."""
    vocabulary: dict[str, int] = {}
    ids = torch.tensor([vocabulary.setdefault(t, len(vocabulary)) for t in labels], dtype=torch.long)  # [pos]
    return ids[:, None] == ids[None, :]


def duplicate_token_pattern(labels: list[str]) -> torch.Tensor:
    """[query, key] bool: P_ij = 1 iff j < i and token j == token i."""
    return same_token(labels).tril(-1)


def induction_pattern(labels: list[str]) -> torch.Tensor:
    """[query, key] bool: P_ij = 1 iff 1 ≤ j ≤ i and token j − 1 is an earlier occurrence of token i."""
    duplicate = duplicate_token_pattern(labels)  # [query, key]
    shifted = torch.zeros_like(duplicate)
    shifted[:, 1:] = duplicate[:, :-1]  # key j marks that key j − 1 duplicates the query
    return shifted.tril()


# --- sums over a padded batch ------------------------------------------------------------------------------

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric → (total [batch, head], weight [batch, head])


class RowSums:
    """Sums over kept query rows of many per-row values of a padded batch, all reduced at once (`sums`).

    Each `add` names a per-row value [batch, head, rows] and which rows count ([batch, rows] bool), for rows
    `first` .. `first` + rows − 1 of the batch's n; `sums` gives each (Σ over its kept rows, kept row count),
    [batch, head] float64: per document, so that both the pooled mean and the spread over documents follow.
    Rows that do not count are masked, not multiplied by 0 (a padding row may hold any value, even NaN).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.added: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []

    def add(self, name: str, values: torch.Tensor, rows: torch.Tensor, first: int = 0) -> None:
        self.added.append((name, values, rows, first))

    def sums(self) -> Sums:
        if not self.added:
            return {}
        batch, heads = self.added[0][1].shape[:2]
        device = self.added[0][1].device
        values = torch.zeros(len(self.added), batch, heads, self.n, dtype=torch.float64, device=device)
        kept = torch.zeros(len(self.added), batch, self.n, dtype=torch.bool, device=device)
        for i, (_, row_values, rows, first) in enumerate(self.added):
            values[i, ..., first : first + row_values.shape[-1]] = row_values
            kept[i, :, first : first + rows.shape[-1]] = rows
        totals = values.masked_fill_(~kept[:, :, None, :], 0.0).sum(dim=-1)  # [value, batch, head]
        counts = kept.sum(dim=-1, dtype=torch.float64)[..., None].expand_as(totals)  # [value, batch, head]
        return {name: (totals[i], counts[i]) for i, (name, *_) in enumerate(self.added)}


def mass_on(pattern: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """pattern [..., query, key], reference [query, key] → Σ_j A_ij P_ij [..., query]."""
    return (pattern * reference.to(pattern.dtype)).sum(dim=-1)  # half the time of the equivalent einsum on CPU


@dataclass(frozen=True)
class ReferenceCells:
    """A reference pattern P over a padded batch, kept sparse: its cells and the query rows that have any."""

    cells: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (batch, query, key) index of every 1 in P
    rows: torch.Tensor  # [batch, query] bool: rows where P has at least one 1

    @classmethod
    def from_documents(cls, references: list[torch.Tensor], n: int, device: torch.device | str) -> ReferenceCells:
        """references: per document, P_b [n_b, n_b] bool."""
        rows = torch.zeros(len(references), n, dtype=torch.bool)
        cells = []
        for b, reference in enumerate(references):
            rows[b, : reference.shape[0]] = reference.any(dim=-1)
            query, key = reference.nonzero(as_tuple=True)
            cells.append(torch.stack([torch.full_like(query, b), query, key]))
        b_index, query, key = torch.cat(cells, dim=1).to(device)
        return cls((b_index, query, key), rows.to(device))

    def hits(self, attention: torch.Tensor) -> torch.Tensor:
        """Σ A⊙P [batch, head]; attention [batch, head, query, key]. P is sparse, so only its cells are gathered.
        The score divides it by Σ A over `rows` (the rows where P has any 1)."""
        b_index, query, key = self.cells
        hits = torch.zeros(attention.shape[:2], dtype=torch.float64, device=attention.device)  # [batch, head]
        hits.index_add_(0, b_index, attention[b_index, :, query, key].double())
        return hits

    def restricted(self, first: torch.Tensor) -> ReferenceCells:
        """Only the cells a row sees under a sliding window: key ≥ first[query] ([query]); rows recounted."""
        b_index, query, key = self.cells
        keep = key >= first[query]
        cells = (b_index[keep], query[keep], key[keep])
        rows = torch.zeros_like(self.rows)
        rows[cells[0], cells[1]] = True
        return ReferenceCells(cells, rows)


@functools.lru_cache(maxsize=1 << 16)
def _punctuation_key(label: str, special: bool) -> bool:
    return is_punctuation(label) and not special


@dataclass(frozen=True)
class BatchLayout:
    """What the metrics need to know about a padded batch besides its patterns; built once, used per layer."""

    real: torch.Tensor  # [batch, query] bool: real (non-padding) positions
    row_length: torch.Tensor  # [batch, query]: keys each row can see (0 on padding rows)
    key_limit: torch.Tensor  # [batch, query]: each row sees keys below this (0 on padding rows; windows start later)
    flag_names: list[str]  # "share of the row on these keys" sets: punctuation, cls, sep
    key_sets: torch.Tensor  # [batch, flag set, key] float32: 1 where the key is in the set, else 0
    duplicate: ReferenceCells
    induction: ReferenceCells | None  # causal models only
    first_key: torch.Tensor | None = None  # [query]: the first key each row sees (a sliding window); None: key 0

    @classmethod
    def build(cls, lengths: list[int], labels: list[list[str]], specials: list[list[bool]], causal: bool,
              cls_token: str | None, sep_token: str | None, device: torch.device | str = "cpu") -> BatchLayout:
        """lengths, labels, specials: per document (labels and specials per position)."""
        n = max(lengths)
        row_length = visible_keys(torch.tensor(lengths), n, causal)  # 0 on padding rows
        tokens = [t for t in (cls_token, sep_token) if t is not None]
        names = ["punctuation"] + [name for name, t in (("cls", cls_token), ("sep", sep_token)) if t is not None]
        flags = torch.zeros(len(lengths), n, len(names), dtype=torch.bool)
        for b, (doc_labels_, doc_specials) in enumerate(zip(labels, specials, strict=True)):
            size = len(doc_labels_)
            flags[b, :size, 0] = torch.tensor(
                [_punctuation_key(t, s) for t, s in zip(doc_labels_, doc_specials, strict=True)], dtype=torch.bool
            )
            for i, token in enumerate(tokens):
                flags[b, :size, i + 1] = torch.tensor([t == token for t in doc_labels_], dtype=torch.bool)
        return cls(
            real=(row_length > 0).to(device), row_length=row_length.to(device), key_limit=row_length.to(device),
            flag_names=names, key_sets=flags.transpose(1, 2).float().contiguous().to(device),
            duplicate=ReferenceCells.from_documents([duplicate_token_pattern(t) for t in labels], n, device),
            induction=ReferenceCells.from_documents([induction_pattern(t) for t in labels], n, device)
            if causal else None,
        )

    def restricted(self, first: torch.Tensor | None) -> BatchLayout:
        """This layout for a layer whose rows see keys from first[query] on (a sliding window), not from key 0:
        row lengths shortened, reference cells before the window dropped. None: this layout itself."""
        if first is None:
            return self
        first = first.to(self.row_length.device)
        return replace(
            self,
            row_length=(self.row_length - first).clamp_min(0),  # padding rows (length 0) stay 0
            duplicate=self.duplicate.restricted(first),
            induction=None if self.induction is None else self.induction.restricted(first),
            first_key=first,
        )


def on_flagged_keys(values: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
    """values [batch, head, query, key] → Σ_j values_ij over each flag set's keys [batch, head, query, flag set]."""
    return values @ layout.key_sets.transpose(1, 2)[:, None].to(values.dtype)


@dataclass(frozen=True)
class RowStatistics:
    """What the row metrics read from every cell of a pattern, per row [batch, head, query] (0 or any value on
    padding rows, which no metric counts)."""

    entropy: torch.Tensor  # −Σ_j A_ij ln A_ij
    distance: torch.Tensor  # Σ_j A_ij |i − j|
    max: torch.Tensor  # max_j A_ij
    total: torch.Tensor  # Σ_j A_ij
    on_keys: torch.Tensor  # [batch, head, query, flag set]: Σ_j A_ij over each flag set's keys
    value_total: torch.Tensor | None  # Σ_j value_norm_ij (None without value_norm)
    value_on_keys: torch.Tensor | None  # [batch, head, query, flag set] the same over value_norm


def row_statistics(attention: torch.Tensor, layout: BatchLayout, value_norm: torch.Tensor | None = None,
                   use_numba: bool | None = None) -> RowStatistics:
    """Every full-row statistic of a padded batch's pattern (and value_norm), [batch, head, query, key] float32.

    On the CPU one compiled pass per row reads only the keys the row sees (`row_kernel`); on CUDA or without numba,
    torch computes each statistic over the whole tensor. The two agree to float32 rounding (tested)."""
    if use_numba is None:
        use_numba = HAVE_NUMBA and attention.device.type == "cpu" and attention.dtype == torch.float32
    if use_numba:
        arrays = row_statistics_arrays(
            attention.numpy(), None if value_norm is None else value_norm.float().numpy(),
            layout.key_limit.numpy(), layout.key_sets.numpy(),
        )
        found = {name: torch.from_numpy(array) for name, array in arrays.items()}
        return RowStatistics(found["entropy"], found["distance"], found["max"], found["total"], found["on_keys"],
                             found.get("value_total"), found.get("value_on_keys"))
    position = torch.arange(attention.shape[-1], device=attention.device)
    distance = (position[:, None] - position[None, :]).abs()  # [query, key]
    return RowStatistics(
        entropy=row_entropy(attention),
        distance=mass_on(attention, distance),
        max=attention.amax(dim=-1),
        total=attention.sum(dim=-1),
        on_keys=on_flagged_keys(attention, layout),
        value_total=None if value_norm is None else value_norm.sum(dim=-1),
        value_on_keys=None if value_norm is None else on_flagged_keys(value_norm, layout),
    )


def head_sums(attention: torch.Tensor, layout: BatchLayout, value_norm: torch.Tensor | None = None) -> Sums:
    """Every metric's (total, weight) [batch, head] over a padded batch.

    attention, value_norm: [batch, head, query, key], padded to the longest document; `layout` describes the
    batch (real positions, keys each row sees, key flags, reference patterns). Padded rows and keys never count.
    """
    n = attention.shape[-1]
    real = layout.real
    position = torch.arange(n, device=attention.device)
    first_rows, previous_rows = real, real[:, 1:]  # rows that see key 0, rows 1..n−1 that see key i − 1
    if layout.first_key is not None:  # a sliding window hides key 0 from later rows (a window of 1: key i − 1)
        first_rows = real & (layout.first_key == 0)
        previous_rows = previous_rows & (layout.first_key[1:] < position[1:])
    rows = row_statistics(attention, layout, value_norm)
    per_row = RowSums(n)
    per_row.add("entropy", rows.entropy, real)
    normalised = rows.entropy / layout.row_length.clamp_min(1).double().log().clamp_min(1e-30)[:, None, :]
    per_row.add("entropy_normalised", normalised, real & (layout.row_length > 1))
    per_row.add("mean_distance", rows.distance, real)
    per_row.add("first_token", attention[..., 0], first_rows)
    per_row.add("self", attention.diagonal(dim1=-2, dim2=-1), real)
    # A_i,i−1 for rows 1..n−1 and A_i,i+1 for rows 0..n−2: rows without such a neighbour are not counted.
    previous = attention.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, n − 1], rows 1..n−1
    per_row.add("previous_token", previous, previous_rows, first=1)
    per_row.add("next_token", attention.diagonal(offset=1, dim1=-2, dim2=-1), real[:, 1:])
    # Every "share of the row on these keys" metric at once, from the few flagged keys of each document.
    for i, name in enumerate(layout.flag_names):
        per_row.add(name, rows.on_keys[..., i], real)
    per_row.add("max_weight", rows.max, real)
    special_sets = [i for i, name in enumerate(layout.flag_names) if name in ("cls", "sep")]
    if rows.value_on_keys is not None and rows.value_total is not None and special_sets:
        # value_norm as each key's share of its row: Σ over the set's keys / Σ_j value_norm
        shares = rows.value_on_keys[..., special_sets] / rows.value_total[..., None].clamp_min(1e-30)
        for column, i in enumerate(special_sets):
            per_row.add(f"{layout.flag_names[i]}_value_norm", shares[..., column], real)
    # The detectors' scores Σ A⊙P / Σ A: their weights Σ_j A_ij over the rows where the pattern P has any 1.
    # previous_token_score: P = the sub-diagonal, so its cells are `previous` and its rows 1..n_b − 1.
    per_row.add("previous_token_score", rows.total[..., 1:], previous_rows, first=1)
    references = {name: reference for name, reference in (("duplicate_token_score", layout.duplicate),
                                                          ("induction_score", layout.induction)) if reference is not None}
    for name, reference in references.items():
        per_row.add(name, rows.total, reference.rows)
    sums = per_row.sums()
    sums["previous_token_score"] = (sums["previous_token"][0], sums["previous_token_score"][0])
    for name, reference in references.items():
        sums[name] = (reference.hits(attention), sums[name][0])
    return sums


def layers_as_heads(values: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """[layer, head, query, key] → these layers as one document's heads [1, layer·head, query, key] (all: no copy)."""
    chosen = values if len(layers) == values.shape[0] else values[layers]
    return chosen.reshape(1, -1, *values.shape[-2:])


def doc_head_sums(
    attention: torch.Tensor,
    labels: list[str],
    specials: list[bool],
    causal: bool,
    cls_token: str | None,
    sep_token: str | None,
    value_norm: torch.Tensor | None = None,
    first_keys: Sequence[torch.Tensor | None] = (),
) -> Sums:
    """Every metric's (total, weight) [layer, head] for one document; attention, value_norm: [layer, head, q, k].

    first_keys: per layer, the first key each row sees ([query], `DocAttention.first_keys`; None, or an empty
    sequence for every layer: key 0). Layers that see alike are summed in one call, as one batch of heads.
    """
    n_layers, n_heads, n, _ = attention.shape
    layout = BatchLayout.build([n], [labels], [specials], causal, cls_token, sep_token, attention.device)
    by_first: dict[tuple[int, ...] | None, list[int]] = {}  # where rows start → the layers whose rows start there
    for layer in range(n_layers):
        first = first_keys[layer] if first_keys else None
        by_first.setdefault(None if first is None else tuple(first.tolist()), []).append(layer)
    result: Sums = {}
    for first_key, layers in by_first.items():
        restricted = layout.restricted(None if first_key is None else torch.tensor(first_key))
        sums = head_sums(layers_as_heads(attention, layers), restricted,
                         None if value_norm is None else layers_as_heads(value_norm, layers))
        for name, (total, weight) in sums.items():
            into = result.setdefault(name, (total.new_zeros(n_layers, n_heads), weight.new_zeros(n_layers, n_heads)))
            into[0][layers], into[1][layers] = total[0].view(-1, n_heads), weight[0].view(-1, n_heads)
    return result


def _check_layers_heads(found: tuple[int, int], n_layers: int, n_heads: int) -> None:
    if found != (n_layers, n_heads):
        raise ValueError(f"attention has {found} layers × heads, expected ({n_layers}, {n_heads})")


def checked_attention(doc: DocAttention, n_layers: int, n_heads: int) -> torch.Tensor:
    """The document's attention [layer, head, query, key]; a ValueError if its layers × heads differ."""
    attention = doc.head_measures["attention"]
    _check_layers_heads((attention.shape[0], attention.shape[1]), n_layers, n_heads)
    return attention


def checked_batch_attention(analysis: BatchAnalysis, n_layers: int, n_heads: int) -> list[torch.Tensor]:
    """The batch's attention per layer [batch, head, query, key], padded, token level (whatever
    `analysis.level` is); a ValueError if its layers × heads differ."""
    attention = analysis.per_layer["attention"]
    _check_layers_heads((len(attention), attention[0].shape[1]), n_layers, n_heads)
    return attention


# --- streaming accumulator ----------------------------------------------------------------------------------


class HeadStats:
    """Running per-head metrics over a corpus: `update` per document, `merge` workers, `table` at the end.

    A metric that never received a row (no value_norm, no [CLS] token, non-causal induction) is NaN.
    """

    def __init__(
        self, n_layers: int, n_heads: int, causal: bool, cls_token: str | None, sep_token: str | None
    ) -> None:
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.causal = causal
        self.cls_token = cls_token
        self.sep_token = sep_token
        self.n_rows = 0  # query rows seen (per head; every head sees every row)
        # metric → [layer, head] running sums of values and of their weights (rows, or Σ A for detectors)
        self.totals = {m: torch.zeros(n_layers, n_heads, dtype=torch.float64) for m in METRICS}
        self.weights = {m: torch.zeros(n_layers, n_heads, dtype=torch.float64) for m in METRICS}
        # metric → [layer, head]: over documents, Σ of each document's own mean, Σ of its square, and how many
        # documents had a row for it (the per-document view: mean of means, and its spread)
        self.doc_sums = {m: torch.zeros(n_layers, n_heads, dtype=torch.float64) for m in METRICS}
        self.doc_squares = {m: torch.zeros(n_layers, n_heads, dtype=torch.float64) for m in METRICS}
        self.doc_counts = {m: torch.zeros(n_layers, n_heads, dtype=torch.float64) for m in METRICS}

    def _add(self, sums: Sums, layer: int | slice = slice(None)) -> None:
        """Fold one batch's sums in: per metric (total, weight), each [document, head] (one layer) or
        [document, layer, head] (every layer). All metrics at once: a few tensor operations, not a few per metric."""
        names = list(sums)
        total = torch.stack([sums[name][0] for name in names])  # [metric, document, ...]
        weight = torch.stack([sums[name][1] for name in names])
        counted = weight > 0
        mean = torch.where(counted, total / weight.clamp_min(1e-300), 0.0)  # each document's own value
        folded = torch.stack([total.sum(dim=1), weight.sum(dim=1), mean.sum(dim=1), (mean * mean).sum(dim=1),
                              counted.sum(dim=1, dtype=torch.float64)]).cpu()  # [5, metric, ...]
        for i, name in enumerate(names):
            for accumulator, value in zip((self.totals, self.weights, self.doc_sums, self.doc_squares, self.doc_counts),
                                          folded[:, i], strict=True):
                accumulator[name][layer] += value

    def update(self, doc: DocAttention) -> None:
        """Add one document (token or word level): `attention` [layer, head, query, key] (+ value_norm)."""
        attention = checked_attention(doc, self.n_layers, self.n_heads)
        sums = doc_head_sums(
            attention.float(),
            doc.labels(),
            position_specials(doc),
            self.causal,
            self.cls_token,
            self.sep_token,
            value_norm=None
            if doc.head_measures.get("value_norm") is None
            else doc.head_measures["value_norm"].float(),
            first_keys=[doc.first_keys(("attention",), layer) for layer in range(self.n_layers)],
        )
        self._add({name: (total[None], weight[None]) for name, (total, weight) in sums.items()})
        self.n_rows += attention.shape[-1]

    def update_batch(self, analysis: BatchAnalysis) -> None:
        """Add a whole batch at token level, straight from its padded per-layer tensors (`update` takes one
        document at either level)."""
        docs = analysis.batch.docs
        attention = checked_batch_attention(analysis, self.n_layers, self.n_heads)
        layout = BatchLayout.build([d.n_tokens for d in docs], [list(d.tokens) for d in docs],
                                   [list(d.is_special) for d in docs], self.causal, self.cls_token, self.sep_token,
                                   attention[0].device)
        value_norm = analysis.per_layer.get("value_norm")
        for layer, pattern in enumerate(attention):
            windowed = layout.restricted(analysis.first_keys(("attention",), layer))
            sums = head_sums(pattern.float(), windowed, None if value_norm is None else value_norm[layer].float())
            self._add(sums, layer)
        self.n_rows += sum(d.n_tokens for d in docs)

    def merge(self, other: HeadStats) -> None:
        """Fold in another worker's stats (same model): the result equals one pass over both corpora."""
        if (other.n_layers, other.n_heads, other.causal) != (self.n_layers, self.n_heads, self.causal):
            raise ValueError("cannot merge head stats of different models")
        for name in METRICS:
            for mine, theirs in ((self.totals, other.totals), (self.weights, other.weights),
                                 (self.doc_sums, other.doc_sums), (self.doc_squares, other.doc_squares),
                                 (self.doc_counts, other.doc_counts)):
                mine[name] += theirs[name]
        self.n_rows += other.n_rows

    def values(self) -> dict[str, torch.Tensor]:
        """metric → [layer, head] float64 (NaN where no row counted)."""
        return {
            m: torch.where(self.weights[m] > 0, self.totals[m] / self.weights[m], math.nan) for m in METRICS
        }

    def per_document(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """metric → (mean over documents of each document's own value, its standard deviation over documents),
        each [layer, head] float64; NaN where no document counted (the sd needs two)."""
        result = {}
        for m in METRICS:
            count = self.doc_counts[m]
            mean = torch.where(count > 0, self.doc_sums[m] / count.clamp_min(1), math.nan)
            variance = (self.doc_squares[m] - count * mean * mean) / (count - 1).clamp_min(1)
            result[m] = (mean, torch.where(count > 1, variance.clamp_min(0).sqrt(), math.nan))
        return result

    def table(self) -> pd.DataFrame:
        """One row per (layer, head): layer, head (int16), n_rows (int64), a float64 column per metric (rows
        pooled over the corpus), then per metric `<metric>_doc_mean` and `<metric>_doc_sd`: the mean and the
        standard deviation over documents of each document's own value."""
        layer, head = torch.meshgrid(torch.arange(self.n_layers), torch.arange(self.n_heads), indexing="ij")
        frame = pd.DataFrame(
            {
                "layer": layer.flatten().numpy().astype("int16"),
                "head": head.flatten().numpy().astype("int16"),
                "n_rows": pd.Series([self.n_rows] * layer.numel(), dtype="int64"),
            }
        )
        for name, value in self.values().items():
            frame[name] = value.flatten().numpy().astype("float64")
        for name, (mean, sd) in self.per_document().items():
            frame[f"{name}_doc_mean"] = mean.flatten().numpy().astype("float64")
            frame[f"{name}_doc_sd"] = sd.flatten().numpy().astype("float64")
        return frame
