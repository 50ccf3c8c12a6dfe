"""Dense storage as matrices: one Parquet row per (document, layer, head) holding the whole matrix.

    doc_id, layer, head, [window], positions: list<int32> [n], <measure>: list<float16> [n·n] per measure

A row's `positions` are the document positions (token or word) of its matrix indices; each measure is the
row-major [query, key] matrix, NaN on the cells its query cannot see (causal future, before a sliding
window), null where the measure does not apply (layer measures on head rows and the reverse). Writing a
matrix is one buffer per measure instead of five index columns per cell: the long format's dense parts cost
several forward passes to build and write.

Readers see the long format unchanged: `RunFolder.associations` expands the rows it reads (`expand`), and the
DuckDB view `associations` is `long_view_sql` over them (`extractor query` needs no change).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from extractor.attribution.measures import HEAD_MEASURES, LAYER_MEASURES

if TYPE_CHECKING:  # the readers (query, plots, report) never load torch; only the writer's functions use it
    import torch

    from extractor.attribution.analysis import FirstKeys

POSITIONS = "positions"
CELLS_METADATA = b"extractor.cells"  # a matrix part's Parquet metadata: how many long-format rows it holds
MATRIX_KEYS = ("doc_id", "layer", "head", "window", POSITIONS)  # the columns of a matrix row that are not measures


def is_matrix_schema(schema: pa.Schema) -> bool:
    """Whether an associations dataset holds matrices (dense storage) rather than one row per cell."""
    return POSITIONS in schema.names


def matrix_schema(measures: tuple[str, ...], windows: bool, value_type: pa.DataType = pa.float16()) -> pa.Schema:
    fields = [pa.field("doc_id", pa.int64()), pa.field("layer", pa.int16()), pa.field("head", pa.int16())]
    if windows:
        fields.append(pa.field("window", pa.int16()))
    fields.append(pa.field(POSITIONS, pa.list_(pa.int32())))
    fields += [pa.field(m, pa.list_(value_type)) for m in HEAD_MEASURES + LAYER_MEASURES if m in measures]
    return pa.schema(fields)


def hide_unseen(values: torch.Tensor, lengths: torch.Tensor, causal: bool, first: torch.Tensor | None = None,
                ) -> torch.Tensor:
    """values [group, batch, query, key] with NaN on the keys each real query cannot see (a copy when any).

    first: [query] the first key each row sees under a sliding window (None: key 0).
    """
    from extractor.core.recompute import visible_cells, visible_keys

    if not causal and first is None:
        return values  # within a document's n × n block every key is visible
    limits = visible_keys(lengths, values.shape[-1], causal)  # [batch, query]
    return values.masked_fill(~visible_cells(first, limits)[None], float("nan"))


def _list_column(blocks: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """One list per block (each flattened), as a list<value_type> array built from one buffer."""
    sizes = np.fromiter((b.size for b in blocks), dtype=np.int64, count=len(blocks))
    offsets = np.zeros(len(blocks) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.concatenate([b.reshape(-1) for b in blocks]) if blocks else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat).cast(value_type))


def matrices_table(
    per_layer: dict[str, list[torch.Tensor]],
    lengths: torch.Tensor,
    positions: torch.Tensor,
    doc_ids: torch.Tensor,
    causal: bool,
    value_type: pa.DataType = pa.float16(),
    windows: torch.Tensor | None = None,
    first_keys: FirstKeys | None = None,
) -> pa.Table:
    """A padded batch's matrices, one row per (layer, head, document), in that order (layer rows, head -1, first).

    per_layer: name → per layer [batch, head, query, key] (head measures) or [batch, query, key] (layer
    measures); lengths [batch]; positions [batch, pos] each index's document position; doc_ids [batch];
    windows [batch] (adds a `window` column: long documents' windows) or None; first_keys: where each row's
    visible keys start under a sliding window (`BatchAnalysis.first_keys`; None: key 0).
    """
    import torch

    from extractor.corpus.tables import measure_groups

    names = tuple(per_layer)
    schema = matrix_schema(names, windows is not None, value_type)
    sizes = [int(n) for n in lengths.tolist()]
    stored_dtype = torch.float16 if value_type == pa.float16() else torch.float32
    doc_positions = [positions[b, :n].to(torch.int32).numpy() for b, n in enumerate(sizes)]
    tables = []
    n_layers = len(next(iter(per_layer.values())))
    for layer in range(n_layers):
        for group, head_level in measure_groups(per_layer, layer):
            n_groups = next(iter(group.values())).shape[0]
            first = None if first_keys is None else first_keys(tuple(group), layer)  # [query]
            columns: dict[str, pa.Array] = {}
            for name, values in group.items():
                shown = hide_unseen(values.float(), lengths, causal, first).to(stored_dtype).cpu()
                blocks = [shown[g, b, :n, :n].numpy() for g in range(n_groups) for b, n in enumerate(sizes)]
                columns[name] = _list_column(blocks, value_type)
            rows = n_groups * len(sizes)
            columns["doc_id"] = pa.array(np.tile(doc_ids.numpy(), n_groups), pa.int64())
            columns["layer"] = pa.array(np.full(rows, layer, dtype=np.int16))
            heads = np.repeat(np.arange(n_groups, dtype=np.int16), len(sizes)) if head_level else np.full(rows, -1, np.int16)
            columns["head"] = pa.array(heads)
            columns[POSITIONS] = pa.array([p for _ in range(n_groups) for p in doc_positions], pa.list_(pa.int32()))
            if windows is not None:
                columns["window"] = pa.array(np.tile(windows.to(torch.int16).numpy(), n_groups))
            tables.append(pa.table([columns[f.name] if f.name in columns else pa.nulls(rows, f.type) for f in schema],
                                   schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def visible_cell_count(table: pa.Table) -> int:
    """How many long-format rows (visible cells) a matrix table expands to. A row holds head measures or layer
    measures, never both, so one measure of each kind counts every row's cells (null lists count none)."""
    first = [m for m in HEAD_MEASURES if m in table.column_names][:1] + \
        [m for m in LAYER_MEASURES if m in table.column_names][:1]
    total = 0
    for name in first:
        flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)  # float16 stays float16
        total += int((~np.isnan(flat)).sum())
    return total


def expand(table: pa.Table) -> pd.DataFrame:
    """Matrix rows → the long format (doc_id, layer, head, query_pos, key_pos, <measures>[, window]), one row per
    visible cell, in row order then query, key order."""
    measures = [name for name in table.column_names if name not in MATRIX_KEYS]
    parts = []
    for row in range(table.num_rows):
        positions = np.asarray(table.column(POSITIONS)[row].values, dtype=np.int32)
        n = len(positions)
        values = {name: table.column(name)[row].values for name in measures}
        present = {name: v.to_numpy(zero_copy_only=False).astype(np.float32) for name, v in values.items()
                   if v is not None and len(v)}
        if not present:
            continue
        visible = ~np.isnan(next(iter(present.values())))
        cells = np.flatnonzero(visible)
        frame = {"doc_id": np.full(len(cells), table.column("doc_id")[row].as_py(), np.int64),
                 "layer": np.full(len(cells), table.column("layer")[row].as_py(), np.int16),
                 "head": np.full(len(cells), table.column("head")[row].as_py(), np.int16),
                 "query_pos": positions[cells // n], "key_pos": positions[cells % n]}
        for name in measures:
            frame[name] = present[name][cells] if name in present else np.full(len(cells), np.nan, np.float32)
        if "window" in table.column_names:
            frame["window"] = np.full(len(cells), table.column("window")[row].as_py(), np.int16)
        parts.append(pd.DataFrame(frame))
    columns = ["doc_id", "layer", "head", "query_pos", "key_pos", *measures,
               *(["window"] if "window" in table.column_names else [])]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in columns})


def long_view_sql(source: str, measures: list[str], windows: bool) -> str:
    """The DuckDB query that presents matrix rows of view `source` in the long format (one row per visible cell)."""
    # NaN in a matrix is a cell the row cannot see, or a measure not computed there (value zeroing outside its
    # layers or documents): the long format's null
    values = ", ".join(f'CASE WHEN isnan("{m}"[1 + cell]) THEN NULL ELSE "{m}"[1 + cell] END AS "{m}"'
                       for m in measures)
    cells = [f'"{m}"[1 + cell]' for m in measures]
    visible = f"coalesce({', '.join(cells)})" if len(cells) > 1 else cells[0]
    window = ', "window"' if windows else ""
    return (f'SELECT doc_id, layer, head, {POSITIONS}[1 + cell // n] AS query_pos, {POSITIONS}[1 + cell % n] AS key_pos, '
            f"{values}{window} FROM (SELECT *, len({POSITIONS}) AS n, unnest(range(len({POSITIONS}) * len({POSITIONS}))) "
            f"AS cell FROM {source}) WHERE NOT isnan({visible})")
