"""Dense storage as matrices (`extractor.corpus.matrices`): one row per (document, layer, head) holding the matrix.

The matrices must read back, through `expand` and through the DuckDB `associations` view, as exactly the long
format the cell-by-cell path (`tables.batch_association_table`, built by a different route) gives.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import WINDOW

from extractor.attribution.analysis import analyse_batch
from extractor.core.encode import encode
from extractor.corpus.matrices import (
    CELLS_METADATA,
    expand,
    is_matrix_schema,
    long_view_sql,
    matrices_table,
    visible_cell_count,
)
from extractor.corpus.query import read_only_connection
from extractor.corpus.storage import write_associations
from extractor.corpus.tables import batch_association_table, padded_positions

KEYS = ["doc_id", "layer", "head", "query_pos", "key_pos"]
MEASURES = ("attention", "value_norm", "rollout", "layer_value_norm")
TEXTS = ["The cat sat on the mat.", "A much longer sentence, so that the batch is padded on the right.", "Hi."]


def batch_tables(loaded) -> tuple[pa.Table, pd.DataFrame]:
    """(matrices, the long-format dense table) of one padded batch of three documents."""
    batch = encode(loaded.tokenizer, TEXTS)
    analysis = analyse_batch(loaded, batch, MEASURES, verify=False)
    ids = [10, 11, 12]
    long = batch_association_table(analysis, ids, loaded.adapter.causal, value_type=pa.float16()).to_pandas()
    docs = batch.docs
    matrices = matrices_table(analysis.per_layer, torch.tensor([d.n_tokens for d in docs]),
                              padded_positions([d.positions for d in docs]), torch.tensor(ids), loaded.adapter.causal,
                              first_keys=analysis.first_keys)
    return matrices, long


def sorted_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEYS).reset_index(drop=True)


@pytest.mark.parametrize("family", ["minilm", "gpt2", "mistral-window"])
def test_matrices_expand_to_the_cell_by_cell_dense_table(family: str, minilm, tiny_loaded, rotary_loaded) -> None:
    """A bidirectional encoder, a causal decoder, and a sliding window shorter than the texts."""
    loaded = {"minilm": minilm}.get(family) or (tiny_loaded(family) if family == "gpt2" else rotary_loaded(family))
    matrices, long = batch_tables(loaded)
    assert is_matrix_schema(matrices.schema)
    n_layers, n_heads = loaded.adapter.n_layers, loaded.adapter.n_heads
    assert matrices.num_rows == 3 * (n_layers * n_heads + n_layers)  # one row per (layer, head or -1, document)
    got, want = sorted_rows(expand(matrices)), sorted_rows(long)
    assert got[KEYS].astype("int64").equals(want[KEYS].astype("int64"))  # the same cells: causal future left out
    for measure in MEASURES:
        pd.testing.assert_series_equal(got[measure].astype("float32"), want[measure].astype("float32"),
                                       check_names=False)
    assert visible_cell_count(matrices) == len(long)
    if loaded.adapter.causal:
        assert (want["key_pos"] <= want["query_pos"]).all()
    if family == "mistral-window":  # head rows: nothing before the window (rolled-out layer rows reach further)
        heads = want[want["head"] >= 0]
        assert (heads["key_pos"] > heads["query_pos"] - WINDOW).all() and heads["query_pos"].max() >= WINDOW


def test_the_duckdb_view_presents_the_long_format(minilm, tmp_path: Path) -> None:
    matrices, long = batch_tables(minilm)
    file = tmp_path / "part-000000.parquet"
    write_associations(matrices, file, ordered=True)
    assert int(pq.ParquetFile(file).schema_arrow.metadata[CELLS_METADATA]) == len(long)
    con = read_only_connection({"association_matrices": [file]},
                               {"associations": long_view_sql("association_matrices", list(MEASURES), False)})
    try:
        view = con.sql("SELECT * FROM associations").df()
        layer_rows = con.sql("SELECT count(*) FROM associations WHERE head = -1 AND attention IS NULL").fetchall()[0][0]
    finally:
        con.close()
    got, want = sorted_rows(view), sorted_rows(long)
    assert got[KEYS].astype("int64").equals(want[KEYS].astype("int64"))
    for measure in MEASURES:
        pd.testing.assert_series_equal(got[measure].astype("float32"), want[measure].astype("float32"),
                                       check_names=False)
    assert layer_rows == (want["head"] == -1).sum()  # head measures are null on layer rows, as in the long format
