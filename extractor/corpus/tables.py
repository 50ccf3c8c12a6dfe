"""Long-format Arrow tables built straight from tensors (no per-row Python).

`associations`: one row per (doc, layer, head, query_pos, key_pos) with one float column per measure.
Head-level measures (`attention`, `value_norm`) fill rows with head ≥ 0; layer-level measures
(`layer_value_norm`, `rollout`) fill rows with head = -1; a measure that does not apply to a row is null, and
so is one not computed for it (NaN in the tensors: value zeroing outside its layers or documents). Rows exist
where the ranking measure was computed.
For causal models, keys after the query are structural zeros and are left out; so are the keys before a
sliding window (Mistral, Qwen2/3 layers marked sliding): a row keeps only the keys its layer lets it see, and a
rolled-out measure (rollout) the keys its layers reach together (`analysis.measure_window`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from extractor.attribution.analysis import BatchAnalysis, DocAttention, FirstKeys
from extractor.attribution.layer_pass import computed_documents
from extractor.attribution.measures import HEAD_MEASURES, LAYER_MEASURES
from extractor.core.encode import Text, TokenizedDoc, segment_texts
from extractor.core.recompute import visible_cells, visible_keys
from extractor.corpus.kernels import HAVE_NUMBA, TopK, kept_topk_columns, topk_rows

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
        pa.field("segment", pa.int8()),  # 0: the text; 1: the pair's text (char spans index into that text)
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
        pa.field("segment", pa.int8()),  # 0: the text; 1: the pair's text (char spans index into that text)
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


@dataclass(frozen=True)
class KeptCells:
    """The cells a storage mode keeps from tensors [group, batch, query, key], in (group, batch, query) order."""

    group: torch.Tensor  # [n_kept] (head, or 0 for a layer measure)
    batch: torch.Tensor  # [n_kept]
    query: torch.Tensor  # [n_kept]
    key: torch.Tensor  # [n_kept]
    values: dict[str, torch.Tensor]  # measure → [n_kept]
    kept_mass: torch.Tensor | None  # [n_kept] (top-k only)


def _grid(shape: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    """Every cell of a tensor of `shape`, in storage order: one flattened index tensor per dimension."""
    grid = []
    for dim, size in enumerate(shape):
        view = [1] * len(shape)
        view[dim] = size
        grid.append(torch.arange(size, device=device).view(view).expand(shape).reshape(-1))
    return grid


def _where(mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The True cells of a 4-d mask: (one index tensor per dimension, flat indices into the contiguous tensor).

    Flat indices are built by multiply-add from `nonzero`'s columns (integer division is slow on CPU)."""
    index = mask.nonzero()  # [n, 4]
    flat = index[:, 0]
    for dim in range(1, mask.dim()):
        flat = flat * mask.shape[dim] + index[:, dim]
    return list(index.unbind(dim=1)), flat


def _ranking(
    values: dict[str, torch.Tensor], lengths: torch.Tensor, causal: bool
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the ranking measure's name, its values in float32, lengths [batch] with 0 for a document it was not
    computed for (NaN), limits [batch, query]: each row's visible keys end), for `select_cells` and
    `select_columns`."""
    rank_name = ranking_measure(list(values), head_level=next(iter(values)) in HEAD_MEASURES)
    rank = values[rank_name].float()  # bfloat16 runs: compare with the threshold and sum kept_mass in float32
    lengths = lengths * computed_documents(rank[0]).to(lengths.device)  # [batch]
    return rank_name, rank, lengths, visible_keys(lengths, rank.shape[-1], causal)


def _topk_in_storage_order(rank: torch.Tensor, limits: torch.Tensor, top_k: int, first: torch.Tensor | None) -> TopK:
    """`topk_rows` of rank [group, batch, query, key] over each row's visible keys, its fields [batch, group,
    query, k]: the kernel reads rows in storage order, [batch, group, query, key] for head and layer measures."""
    n = rank.shape[-1]
    row_limits = limits[:, None, :].expand(rank.shape[1], rank.shape[0], n)  # [batch, group, query]
    row_starts = None if first is None else first.to(rank.device)[None, None, :].expand_as(row_limits)
    return topk_rows(rank.transpose(0, 1), row_limits, min(top_k, n), starts=row_starts)


def select_cells(
    values: dict[str, torch.Tensor],
    lengths: torch.Tensor,
    causal: bool,
    top_k: int | None,
    threshold: float | None,
    first: torch.Tensor | None = None,
) -> KeptCells:
    """Pick the kept cells of same-shaped tensors [group, batch, query, key] (group: heads, or 1 for a layer).

    lengths: [batch] real tokens per document (the rest is padding); first: [query] the first key each row sees
    under a sliding window (None: key 0), so a row sees keys [first, limit); a document the ranking measure was
    not computed for (NaN) keeps no cell. Every measure is exactly 0 on keys a query cannot see (padding, causal
    future, before the window: the softmax gives them exp(finfo.min) = 0), so row totals need no masking. Top-k
    reads only each row's visible keys (`kernels.topk_rows`); dense and threshold mask the unseen cells only when
    a batch has any (padding, causal or a window). Kept cells are found once as flat indices, and every measure
    is gathered with them (no repeated boolean-mask indexing).
    """
    rank_name, rank, lengths, limits = _ranking(values, lengths, causal)
    n = rank.shape[-1]
    masked = causal or first is not None or bool((lengths < n).any())
    if top_k is None:
        keep = visible_cells(first, limits).expand(rank.shape) if masked else None  # [group, batch, q, k]
        if threshold is not None:
            keep = rank >= threshold if keep is None else keep & (rank >= threshold)
        if keep is None:  # dense without padding: every cell, in storage order
            group, batch, query, key = _grid(tuple(rank.shape), rank.device)
            return KeptCells(group, batch, query, key, {name: v.reshape(-1) for name, v in values.items()}, None)
        (group, batch, query, key), cells = _where(keep)
        kept = {name: v.reshape(-1).index_select(0, cells) for name, v in values.items()}
        return KeptCells(group, batch, query, key, kept, None)
    top = _topk_in_storage_order(rank, limits, top_k, first)
    top_values, top_keys, counts, totals = (t.transpose(0, 1) for t in top)  # [group, batch, query, k]
    k = top_keys.shape[-1]
    flat: torch.Tensor | None = None  # kept slots as flat indices; None: every slot
    if masked:
        valid = torch.arange(k, device=rank.device) < counts[..., None]  # [group, batch, query, k]
        (group, batch, query, _), flat = _where(valid)
        row = (group * valid.shape[1] + batch) * valid.shape[2] + query
    else:
        group, batch, query, _ = _grid(tuple(top_values.shape), rank.device)
        row = torch.arange(top_values.numel() // k, device=rank.device).repeat_interleave(k)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1) if flat is None else t.reshape(-1).index_select(0, flat)

    kept_mass = top_values.sum(dim=-1) / totals.clamp_min(1e-30)  # [group, batch, query]
    kept = {name: take(top_values if name == rank_name else v.gather(-1, top_keys)) for name, v in values.items()}
    return KeptCells(group, batch, query, take(top_keys), kept, kept_mass.reshape(-1).index_select(0, row))


@dataclass(frozen=True)
class KeptColumns:
    """The association table's columns for the cells a storage mode keeps, in (group, batch, query) order."""

    doc_id: np.ndarray  # [n_kept] int64
    window: np.ndarray | None  # [n_kept] int16: long documents' windows (None: not windowed)
    head: np.ndarray  # [n_kept] int16: the group's head, −1 on layer rows
    query_pos: np.ndarray  # [n_kept] int32 document positions
    key_pos: np.ndarray  # [n_kept] int32
    values: dict[str, np.ndarray]  # measure → [n_kept] float32 (NaN: not computed there)
    kept_mass: np.ndarray | None  # [n_kept] float32 (top-k only)


def select_columns(
    values: dict[str, torch.Tensor],
    lengths: torch.Tensor,
    positions: torch.Tensor,
    doc_ids: torch.Tensor,
    causal: bool,
    top_k: int | None,
    threshold: float | None,
    head_level: bool,
    first: torch.Tensor | None = None,
    windows: torch.Tensor | None = None,
) -> KeptColumns:
    """`select_cells`' kept cells as table columns: document ids, heads and document positions instead of matrix
    indices. positions: [batch, pos] each matrix index's document position; doc_ids: [batch]; windows: [batch]
    each batch row's window of its document (None: no window column).

    Top-k on CPU with numba goes straight from the kernel's rows to the columns in one compiled pass
    (`kernels.kept_topk_columns`: no index grids, gathers or casts over every kept cell); otherwise the cells'
    indices are mapped here, in torch (CUDA, no numba, dense and threshold storage).
    """
    rank_tensor = next(iter(values.values()))
    if top_k is not None and HAVE_NUMBA and rank_tensor.device.type == "cpu":
        rank_name, rank, lengths, limits = _ranking(values, lengths, causal)
        top = _topk_in_storage_order(rank, limits, top_k, first)
        others = {name: v.transpose(0, 1) for name, v in values.items() if name != rank_name}  # storage order
        labels = {"doc_id": doc_ids} if windows is None else {"doc_id": doc_ids, "window": windows}
        index, kept_mass, kept = kept_topk_columns(top, others, positions, labels, head_level)
        kept[rank_name] = index["rank"]
        window = index.get("window")
        return KeptColumns(doc_id=index["doc_id"], window=None if window is None else window.astype(np.int16),
                           head=index["head"], query_pos=index["query_pos"], key_pos=index["key_pos"],
                           values={name: kept[name] for name in values}, kept_mass=kept_mass)
    cells = select_cells(values, lengths, causal, top_k, threshold, first)
    batch, query, key = cells.batch.cpu(), cells.query.cpu(), cells.key.cpu()
    matrix_index = torch.arange(positions.shape[1])
    # positions are the matrix indices themselves (a token-level batch without windows): no gather per cell
    identity = bool(((positions == matrix_index) | (matrix_index >= lengths.cpu()[:, None])).all())
    rows = batch.shape[0]
    return KeptColumns(
        doc_id=doc_ids[batch].to(torch.int64).numpy(),
        window=None if windows is None else windows[batch].to(torch.int16).numpy(),
        head=cells.group.to(torch.int16).cpu().numpy() if head_level else np.full(rows, -1, np.int16),
        query_pos=(query if identity else positions[batch, query]).to(torch.int32).numpy(),
        key_pos=(key if identity else positions[batch, key]).to(torch.int32).numpy(),
        values={name: v.float().cpu().numpy() for name, v in cells.values.items()},
        kept_mass=None if cells.kept_mass is None else cells.kept_mass.float().cpu().numpy(),
    )


def measure_groups(per_layer: dict[str, list[torch.Tensor]], layer: int) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """`layer`'s measures grouped by the rows they fill, as (name → [group, batch, query, key], head_level): the
    layer measures first (group 1, the head −1 rows), then the head measures (group = head). A layer measure
    computed for no document of the batch (value zeroing outside its scope) is left out; empty groups too.

    per_layer: name → per layer [batch, head, query, key] (head measures) or [batch, query, key] (layer measures).
    """
    layer_group = {m: per_layer[m][layer][None] for m in LAYER_MEASURES
                   if m in per_layer and computed_documents(per_layer[m][layer]).any()}  # [1, batch, q, k]
    head_group = {m: per_layer[m][layer].transpose(0, 1) for m in HEAD_MEASURES if m in per_layer}  # [head, …]
    return [(group, head_level) for group, head_level in ((layer_group, False), (head_group, True)) if group]


def batch_inputs(analysis: BatchAnalysis, doc_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A token-level batch's (lengths [batch], positions [batch, pos], doc_ids [batch]) for `measures_table` and
    `matrices.matrices_table`."""
    docs = analysis.batch.docs
    return (torch.tensor([d.n_tokens for d in docs], dtype=torch.long, device=analysis.batch.attention_mask.device),
            padded_positions([d.positions for d in docs]), torch.tensor(doc_ids, dtype=torch.long))


def document_inputs(
    doc_id: int, doc: DocAttention
) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One document (token or word level) as a batch of one: (per_layer, lengths, positions, doc_ids) for
    `measures_table` and `matrices.matrices_table`."""
    per_layer = {name: list(v[:, None]) for name, v in {**doc.head_measures, **doc.layer_measures}.items()}
    return per_layer, torch.tensor([doc.size]), doc.document_positions()[None], torch.tensor([doc_id])


def measures_table(
    per_layer: dict[str, list[torch.Tensor]],
    lengths: torch.Tensor,
    positions: torch.Tensor,
    doc_ids: torch.Tensor,
    causal: bool,
    top_k: int | None = None,
    threshold: float | None = None,
    value_type: pa.DataType = pa.float32(),
    windows: torch.Tensor | None = None,
    first_keys: FirstKeys | None = None,
) -> pa.Table:
    """The associations of a padded batch, in (layer, head, batch, query) order (layer rows, head -1, first).

    per_layer: name → per layer [batch, head, query, key] (head measures) or [batch, query, key] (layer
    measures); lengths [batch]; positions [batch, pos] each matrix index's document position; doc_ids
    [batch]; windows [batch] (adds a `window` column: long documents' windows) or None; first_keys: where each
    row's visible keys start under a sliding window (None: the model has none).
    """
    names = tuple(per_layer)
    schema = association_schema(names, value_type, top_k=top_k is not None)
    if windows is not None:
        schema = schema.append(pa.field("window", pa.int16()))
    n_layers = len(next(iter(per_layer.values())))
    tables = []
    for layer in range(n_layers):
        # NaN where not computed (value zeroing outside its scope): null in the table
        partial = {m for m in per_layer if not computed_documents(per_layer[m][layer]).all()}
        for group, head_level in measure_groups(per_layer, layer):
            first = None if first_keys is None else first_keys(tuple(group), layer)  # [query]
            cells = select_columns(group, lengths, positions, doc_ids, causal, top_k, threshold, head_level, first,
                                   windows)
            rows = len(cells.doc_id)
            columns = {
                "doc_id": pa.array(cells.doc_id, pa.int64()),
                "layer": pa.array(np.full(rows, layer, dtype=np.int16)),
                "head": pa.array(cells.head),
                "query_pos": pa.array(cells.query_pos),
                "key_pos": pa.array(cells.key_pos),
            }
            if cells.window is not None:
                columns["window"] = pa.array(cells.window)
            for f in schema:
                if f.name in columns:
                    continue
                if f.name == "kept_mass":
                    columns[f.name] = pa.array(cells.kept_mass, pa.float32())
                elif f.name in cells.values:
                    columns[f.name] = pa.array(cells.values[f.name], pa.float32(),
                                               from_pandas=f.name in partial).cast(value_type)
                else:
                    columns[f.name] = pa.nulls(rows, f.type)
            tables.append(pa.table([columns[f.name] for f in schema], schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def padded_positions(positions: list[list[int]]) -> torch.Tensor:
    """[batch, longest] each matrix index's document position (0 in padding)."""
    out = torch.zeros(len(positions), max((len(p) for p in positions), default=0), dtype=torch.long)
    for i, p in enumerate(positions):
        out[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return out


def batch_association_table(
    analysis: BatchAnalysis,
    doc_ids: list[int],
    causal: bool,
    top_k: int | None = None,
    threshold: float | None = None,
    value_type: pa.DataType = pa.float32(),
    windows: list[int] | None = None,
) -> pa.Table:
    """A token-level batch's associations straight from its padded tensors (no per-document copies)."""
    return measures_table(
        analysis.per_layer,
        *batch_inputs(analysis, doc_ids),
        causal, top_k, threshold, value_type,
        None if windows is None else torch.tensor(windows, dtype=torch.long),
        analysis.first_keys,
    )


def association_table(
    doc_id: int,
    doc: DocAttention,
    causal: bool,
    top_k: int | None = None,
    threshold: float | None = None,
    value_type: pa.DataType = pa.float32(),
) -> pa.Table:
    """The associations of one document (token or word level), dense, top-k per query row, or above a threshold."""
    return measures_table(
        *document_inputs(doc_id, doc),
        causal, top_k, threshold, value_type,
        first_keys=doc.first_keys,
    )


def tokens_table(doc_id: int, doc: TokenizedDoc) -> pa.Table:
    """One row per real token: its text, word, whether it is special, its character span and its segment."""
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
            pa.array(doc.token_segments, pa.int8()),
        ],
        schema=TOKEN_SCHEMA,
    )


def word_spans(doc: TokenizedDoc, text: Text) -> list[tuple[str, bool, int, int, int, int]]:
    """Per word: (surface text, is_special, n_tokens, char_start, char_end, segment). Specials keep their token
    text; spans index into the word's own segment's text (`text`: the document's text, or its pair)."""
    texts = segment_texts(text)
    spans: dict[int, list] = {}
    for token, word, special, (start, end), segment in zip(
        doc.tokens, doc.word_index, doc.is_special, doc.offsets, doc.token_segments, strict=True
    ):
        if word not in spans:
            spans[word] = [token, special, 0, start, end, segment]
        entry = spans[word]
        entry[2] += 1
        if not special:
            entry[3] = min(entry[3], start) if entry[2] > 1 else start
            entry[4] = max(entry[4], end)
    result = []
    for _, (label, special, count, start, end, segment) in sorted(spans.items()):
        own = texts[segment]
        if not special:  # byte-level BPE offsets (GPT-2, RoBERTa) include the space before a word
            while start < end and own[start].isspace():
                start += 1
            while end > start and own[end - 1].isspace():
                end -= 1
        result.append((label if special else own[start:end], special, count, start, end, segment))
    return result


def words_table(doc_id: int, doc: TokenizedDoc, text: Text) -> pa.Table:
    """One row per word (the positions of word-level associations); `text`: the text, or (text, text_pair)."""
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
            pa.array([s[5] for s in spans], pa.int8()),
        ],
        schema=WORD_SCHEMA,
    )
