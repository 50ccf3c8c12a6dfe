"""Per-head metrics over a whole corpus, streamed one document at a time (never holding all matrices).

Every metric is kept as a running (total, weight) pair per (layer, head), so that updating document by
document, merging workers' partial stats, or computing on all rows at once give the same numbers.

Row metrics: the mean over query rows i (of every document) of a per-row value of A = attention[layer, head]:

- `entropy`:            H_i = −Σ_j A_ij ln A_ij (nats).
- `entropy_normalised`: H_i / ln(row length); row length = i + 1 for causal models, n otherwise. Rows of
                        length 1 (the first causal row, ln 1 = 0) are left out. A uniform row scores 1.
- `mean_distance`:      Σ_j A_ij |i − j|, with i, j positions in the sequence the model saw (matrix indices).
- `first_token`:        A_i0.
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
least one 1 (rows without any reference key neither help nor hurt the score). A head that puts all of its
attention on P scores 1.

- `previous_token_score`:  P_ij = 1 iff j = i − 1.
- `duplicate_token_score`: P_ij = 1 iff j < i and token j == token i (an earlier occurrence of the token).
- `induction_score`:       P_ij = 1 iff 1 ≤ j ≤ i and token j − 1 == token i with j − 1 < i: the token *after*
                           an earlier occurrence of the current token. Causal models only (NaN otherwise).

Tokens are compared by their text (token level: the tokenizer's tokens; word level: the word's pieces).
"""

from __future__ import annotations

import math
import unicodedata

import pandas as pd
import torch

from .analysis import DocAttention
from .encode import strip_subword_markers
from .explain import doc_labels
from .measures import row_entropy

ROW_METRICS = (
    "entropy",
    "entropy_normalised",
    "mean_distance",
    "first_token",
    "cls",
    "sep",
    "self",
    "previous_token",
    "next_token",
    "punctuation",
    "max_weight",
    "cls_value_norm",
    "sep_value_norm",
)
DETECTORS = ("previous_token_score", "duplicate_token_score", "induction_score")
METRICS = ROW_METRICS + DETECTORS

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


# --- per-document sums --------------------------------------------------------------------------------------

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric → (total [layer, head], weight [layer, head])


def row_lengths(n: int, causal: bool) -> torch.Tensor:
    """[query]: how many keys each query row can see."""
    return torch.arange(1, n + 1) if causal else torch.full((n,), n)


def row_mean_sums(
    values: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """values [layer, head, query], rows [query] bool (None = all) → (Σ over kept rows, row count), each
    [layer, head]."""
    if rows is None:
        rows = torch.ones(values.shape[-1], dtype=torch.bool)
    total = values[..., rows].sum(dim=-1, dtype=torch.float64)  # [layer, head]
    return total, torch.full_like(total, float(rows.sum()))


def mass_on(pattern: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """pattern [layer, head, query, key], reference [query, key] → Σ_j A_ij P_ij [layer, head, query]."""
    return torch.einsum("...qk,qk->...q", pattern, reference.to(pattern.dtype))


def pattern_score_sums(
    pattern: torch.Tensor, reference: torch.Tensor, row_sums: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ A⊙P, Σ A) [layer, head] over the query rows where `reference` [query, key] has any 1.

    Reference patterns are sparse, so Σ A⊙P gathers only P's cells; `row_sums` [layer, head, query] (Σ_j A_ij,
    computed once per document) gives Σ A without another pass over the whole pattern.
    """
    rows = reference.any(dim=-1)  # [query]
    query, key = reference.nonzero(as_tuple=True)  # P's cells
    hits = pattern[..., query, key].sum(dim=-1, dtype=torch.float64)  # [layer, head]
    if row_sums is None:
        row_sums = pattern.sum(dim=-1)
    mass = row_sums[..., rows].sum(dim=-1, dtype=torch.float64)
    return hits, mass


def doc_head_sums(
    attention: torch.Tensor,
    labels: list[str],
    specials: list[bool],
    causal: bool,
    cls_token: str | None,
    sep_token: str | None,
    value_norm: torch.Tensor | None = None,
) -> Sums:
    """Every metric's (total, weight) for one document; attention, value_norm: [layer, head, query, key]."""
    n = attention.shape[-1]
    sums: Sums = {}
    entropy = row_entropy(attention)  # [layer, head, query]
    lengths = row_lengths(n, causal)  # [query]
    sums["entropy"] = row_mean_sums(entropy)
    sums["entropy_normalised"] = row_mean_sums(entropy / lengths.double().log().clamp_min(1e-30), lengths > 1)
    query = torch.arange(n)
    distance = (query[:, None] - query[None, :]).abs().to(attention.dtype)  # [query, key]
    sums["mean_distance"] = row_mean_sums(mass_on(attention, distance))
    sums["first_token"] = row_mean_sums(attention[..., 0])
    sums["self"] = row_mean_sums(attention.diagonal(dim1=-2, dim2=-1))
    # A_i,i−1 for rows 1..n−1 and A_i,i+1 for rows 0..n−2: rows without such a neighbour are not counted.
    sums["previous_token"] = row_mean_sums(attention.diagonal(offset=-1, dim1=-2, dim2=-1))
    sums["next_token"] = row_mean_sums(attention.diagonal(offset=1, dim1=-2, dim2=-1))
    # Every "share of the row on these keys" metric in one pass: attention @ [key, flag set].
    flag_sets = {"punctuation": [is_punctuation(t) and not s for t, s in zip(labels, specials, strict=True)]}
    for name, token in (("cls", cls_token), ("sep", sep_token)):
        if token is not None:
            flag_sets[name] = [t == token for t in labels]
    flags = torch.tensor(list(flag_sets.values()), dtype=attention.dtype).T  # [key, flag set]
    on_keys = attention @ flags  # [layer, head, query, flag set]
    for i, name in enumerate(flag_sets):
        sums[name] = row_mean_sums(on_keys[..., i])
    sums["max_weight"] = row_mean_sums(attention.amax(dim=-1))
    special_sets = [i for i, name in enumerate(flag_sets) if name in ("cls", "sep")]
    if value_norm is not None and special_sets:
        # value_norm as each key's share of its row: (value_norm @ flags) / Σ_j value_norm, no full-size division
        shares = (value_norm @ flags[:, special_sets]) / value_norm.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        for column, i in enumerate(special_sets):
            sums[f"{list(flag_sets)[i]}_value_norm"] = row_mean_sums(shares[..., column])
    row_sums = attention.sum(dim=-1)  # [layer, head, query]
    sums["previous_token_score"] = pattern_score_sums(attention, previous_token_pattern(n), row_sums)
    sums["duplicate_token_score"] = pattern_score_sums(attention, duplicate_token_pattern(labels), row_sums)
    if causal:
        sums["induction_score"] = pattern_score_sums(attention, induction_pattern(labels), row_sums)
    return sums


def checked_attention(doc: DocAttention, n_layers: int, n_heads: int) -> torch.Tensor:
    """The document's attention [layer, head, query, key]; a ValueError if its layers × heads differ."""
    attention = doc.head_measures["attention"]
    if tuple(attention.shape[:2]) != (n_layers, n_heads):
        raise ValueError(
            f"attention has {tuple(attention.shape[:2])} layers × heads, expected ({n_layers}, {n_heads})"
        )
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

    def update(self, doc: DocAttention) -> None:
        """Add one document (token or word level): `attention` [layer, head, query, key] (+ value_norm)."""
        attention = checked_attention(doc, self.n_layers, self.n_heads)
        sums = doc_head_sums(
            attention.float(),
            doc_labels(doc),
            position_specials(doc),
            self.causal,
            self.cls_token,
            self.sep_token,
            value_norm=None
            if doc.head_measures.get("value_norm") is None
            else doc.head_measures["value_norm"].float(),
        )
        for name, (total, weight) in sums.items():
            self.totals[name] += total
            self.weights[name] += weight
        self.n_rows += attention.shape[-1]

    def merge(self, other: HeadStats) -> None:
        """Fold in another worker's stats (same model): the result equals one pass over both corpora."""
        if (other.n_layers, other.n_heads, other.causal) != (self.n_layers, self.n_heads, self.causal):
            raise ValueError("cannot merge head stats of different models")
        for name in METRICS:
            self.totals[name] += other.totals[name]
            self.weights[name] += other.weights[name]
        self.n_rows += other.n_rows

    def values(self) -> dict[str, torch.Tensor]:
        """metric → [layer, head] float64 (NaN where no row counted)."""
        return {
            m: torch.where(self.weights[m] > 0, self.totals[m] / self.weights[m], math.nan) for m in METRICS
        }

    def table(self) -> pd.DataFrame:
        """One row per (layer, head): layer, head (int16), n_rows (int64), a float64 column per metric."""
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
        return frame
