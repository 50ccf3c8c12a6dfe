"""Long-format Arrow tables built straight from tensors (no per-row Python).

`associations`: one row per (doc, layer, head, query_pos, key_pos) with one float column per measure.
Head-level measures (`attention`, `value_norm`) fill rows with head ≥ 0; layer-level measures
(`layer_value_norm`, `rollout`) fill rows with head = -1; a measure that does not apply to a row is null.
For causal models, keys after the query are structural zeros and are left out.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from .analysis import DocAttention
from .encode import TokenizedDoc
from .measures import HEAD_MEASURES, LAYER_MEASURES

INDEX_FIELDS = [
    pa.field("doc_id", pa.int64()),
    pa.field("layer", pa.int16()),
    pa.field("head", pa.int16()),
    pa.field("query_pos", pa.int32()),
    pa.field("key_pos", pa.int32()),
]
TOKEN_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("token", pa.string()),
        pa.field("word_index", pa.int32()),
        pa.field("is_special", pa.bool_()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
    ]
)
WORD_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64()),
        pa.field("word_index", pa.int32()),
        pa.field("word", pa.string()),
        pa.field("is_special", pa.bool_()),
        pa.field("n_tokens", pa.int32()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
    ]
)


def association_schema(measures: tuple[str, ...], value_type: pa.DataType = pa.float32(), top_k: bool = False) -> pa.Schema:
    """Schema of the associations table for the chosen measures (in canonical order)."""
    fields = list(INDEX_FIELDS)
    fields += [pa.field(m, value_type) for m in HEAD_MEASURES + LAYER_MEASURES if m in measures]
    if top_k:
        fields.append(pa.field("kept_mass", pa.float32()))
    return pa.schema(fields)


def ranking_measure(names: list[str] | tuple[str, ...], head_level: bool) -> str:
    """The measure top-k and threshold select by: `attention` for heads, `rollout` for layers, else the first present."""
    preferred = "attention" if head_level else "rollout"
    return preferred if preferred in names else names[0]


def _select(
    values: dict[str, torch.Tensor], causal: bool, top_k: int | None, threshold: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Pick the kept (…, query, key) cells of same-shaped tensors [..., query, key].

    Returns (index [n_kept, ndim] of kept cells, each measure's kept values [n_kept], kept_mass [n_kept] or None).
    """
    rank_name = ranking_measure(list(values), head_level=next(iter(values)) in HEAD_MEASURES)
    rank = values[rank_name]
    n = rank.shape[-1]
    query = torch.arange(n)[:, None]
    key = torch.arange(n)[None, :]
    structural = (key <= query) if causal else torch.ones(n, n, dtype=torch.bool)  # [query, key]
    if top_k is None:
        keep = structural.expand_as(rank).clone()
        if threshold is not None:
            keep &= rank >= threshold
        index = keep.nonzero()
        return index, {name: v[keep] for name, v in values.items()}, None
    k = min(top_k, n)
    masked_rank = rank.masked_fill(~structural, float("-inf"))
    top_values, top_keys = masked_rank.topk(k, dim=-1)  # [..., query, k]
    valid = torch.isfinite(top_values)  # causal rows shorter than k
    row_total = rank.masked_fill(~structural, 0.0).sum(dim=-1, keepdim=True)  # [..., query, 1]
    kept = top_values.masked_fill(~valid, 0.0).sum(dim=-1, keepdim=True)
    kept_mass = (kept / row_total.clamp_min(1e-30)).expand_as(top_values)
    lead = valid.nonzero()  # [n_kept, ndim]: (..., query, slot)
    keys = top_keys[valid]
    index = torch.cat([lead[:, :-1], keys[:, None]], dim=1)
    gathered = {name: v.gather(-1, top_keys)[valid] for name, v in values.items()}
    return index, gathered, kept_mass[valid]


def association_table(
    doc_id: int,
    doc: DocAttention,
    causal: bool,
    top_k: int | None = None,
    threshold: float | None = None,
    value_type: pa.DataType = pa.float32(),
) -> pa.Table:
    """The associations of one document, dense, top-k per query row, or above a threshold."""
    names = tuple(doc.head_measures) + tuple(doc.layer_measures)
    schema = association_schema(names, value_type, top_k=top_k is not None)
    parts = []
    for group, head_level in ((doc.head_measures, True), (doc.layer_measures, False)):
        if not group:
            continue
        index, kept, kept_mass = _select(group, causal, top_k, threshold)
        rows = index.shape[0]
        if head_level:
            layer, head, query, key = index.unbind(dim=1)
        else:
            layer, query, key = index.unbind(dim=1)
            head = torch.full((rows,), -1, dtype=torch.long)
        positions = doc.document_positions()  # window → document positions
        query, key = positions[query], positions[key]
        columns = {
            "doc_id": pa.array(torch.full((rows,), doc_id, dtype=torch.long).numpy(), pa.int64()),
            "layer": pa.array(layer.to(torch.int16).numpy()),
            "head": pa.array(head.to(torch.int16).numpy()),
            "query_pos": pa.array(query.to(torch.int32).numpy()),
            "key_pos": pa.array(key.to(torch.int32).numpy()),
        }
        for f in schema:
            if f.name in columns:
                continue
            if f.name == "kept_mass":
                columns[f.name] = pa.array(kept_mass.float().numpy(), pa.float32())
            elif f.name in kept:
                columns[f.name] = pa.array(kept[f.name].float().numpy(), pa.float32()).cast(value_type)
            else:
                columns[f.name] = pa.nulls(rows, f.type)
        parts.append(pa.table([columns[f.name] for f in schema], schema=schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def tokens_table(doc_id: int, doc: TokenizedDoc) -> pa.Table:
    """One row per real token: its text, word, whether it is special, and its character span."""
    n = doc.n_tokens
    return pa.table(
        [
            pa.array([doc_id] * n, pa.int64()),
            pa.array(range(n), pa.int32()),
            pa.array(doc.tokens, pa.string()),
            pa.array(doc.word_index, pa.int32()),
            pa.array(doc.is_special, pa.bool_()),
            pa.array([a for a, _ in doc.offsets], pa.int32()),
            pa.array([b for _, b in doc.offsets], pa.int32()),
        ],
        schema=TOKEN_SCHEMA,
    )


def word_spans(doc: TokenizedDoc, text: str) -> list[tuple[str, bool, int, int, int]]:
    """Per word: (surface text, is_special, n_tokens, char_start, char_end). Specials keep their token text."""
    spans: dict[int, list] = {}
    for token, word, special, (start, end) in zip(doc.tokens, doc.word_index, doc.is_special, doc.offsets, strict=True):
        if word not in spans:
            spans[word] = [token, special, 0, start, end]
        entry = spans[word]
        entry[2] += 1
        if not special:
            entry[3] = min(entry[3], start) if entry[2] > 1 else start
            entry[4] = max(entry[4], end)
    result = []
    for _, (label, special, count, start, end) in sorted(spans.items()):
        if not special:  # byte-level BPE offsets (GPT-2, RoBERTa) include the space before a word
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
        result.append((label if special else text[start:end], special, count, start, end))
    return result


def words_table(doc_id: int, doc: TokenizedDoc, text: str) -> pa.Table:
    """One row per word (the positions of word-level associations)."""
    spans = word_spans(doc, text)
    return pa.table(
        [
            pa.array([doc_id] * len(spans), pa.int64()),
            pa.array(range(len(spans)), pa.int32()),
            pa.array([s[0] for s in spans], pa.string()),
            pa.array([s[1] for s in spans], pa.bool_()),
            pa.array([s[2] for s in spans], pa.int32()),
            pa.array([s[3] for s in spans], pa.int32()),
            pa.array([s[4] for s in spans], pa.int32()),
        ],
        schema=WORD_SCHEMA,
    )
