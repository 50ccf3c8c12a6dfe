"""The padded-batch paths (tables, head statistics, similarity straight from [batch, head, query, key]
tensors) give exactly what the per-document paths give on each document trimmed out of the batch.

Batches here are padded to clearly different lengths (and, for GPT-2, causal), so padding that leaks into a
row, a key or a count would show.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from extractor.attribution.analysis import BatchAnalysis, analyse_batch
from extractor.core.encode import encode
from extractor.corpus.storage import write_associations
from extractor.corpus.tables import association_table, batch_association_table
from extractor.heads.metrics import HeadStats
from extractor.heads.similarity import HeadSimilarity

MEASURES = ("attention", "value_norm", "layer_value_norm", "rollout")
MODES = [{"top_k": 3}, {"top_k": 200}, {}, {"threshold": 0.05}]


@pytest.fixture(scope="module", params=["minilm", "gpt2"])
def analysis(request: pytest.FixtureRequest, minilm, tiny_loaded, sentences: list[str]) -> tuple[BatchAnalysis, bool]:
    loaded = minilm if request.param == "minilm" else tiny_loaded("gpt2")
    batch = encode(loaded.tokenizer, [sentences[2], sentences[0], sentences[1]])
    assert len(set(batch.lengths)) == 3  # three different lengths: two documents are padded
    return analyse_batch(loaded, batch, measures=MEASURES, verify=False), loaded.adapter.causal


def sorted_rows(table: pa.Table) -> pa.Table:
    keys = ["doc_id", "layer", "head", "query_pos", "key_pos"]
    return table.sort_by([(k, "ascending") for k in keys])


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_batch_table_equals_per_document_tables(analysis: tuple[BatchAnalysis, bool], mode: dict) -> None:
    result, causal = analysis
    doc_ids = [7, 3, 11]
    batch = batch_association_table(result, doc_ids, causal, **mode)
    per_doc = pa.concat_tables(
        [association_table(doc_id, doc, causal, **mode) for doc_id, doc in zip(doc_ids, result.docs, strict=True)]
    )
    assert batch.schema == per_doc.schema
    assert batch.num_rows == per_doc.num_rows > 0
    batch, per_doc = sorted_rows(batch).to_pandas(), sorted_rows(per_doc).to_pandas()
    index = ["doc_id", "layer", "head", "query_pos", "key_pos"]
    assert batch[index].equals(per_doc[index])
    # Values are the same cells; sums over a padded row (kept_mass) may round in another order.
    for name in batch.columns.difference(index):
        np.testing.assert_allclose(batch[name], per_doc[name], rtol=1e-6, atol=0, err_msg=name)


def test_batch_table_rows_come_layer_then_head_then_document(analysis: tuple[BatchAnalysis, bool]) -> None:
    """Rows arrive grouped as the writer stores them: (layer, head with -1 first, batch order)."""
    result, causal = analysis
    table = batch_association_table(result, [1, 2, 3], causal, top_k=2).to_pandas()
    key = list(zip(table["layer"], table["head"], table["doc_id"], strict=True))
    assert key == sorted(key)


def test_batch_table_windows_column(analysis: tuple[BatchAnalysis, bool]) -> None:
    result, causal = analysis
    table = batch_association_table(result, [1, 2, 3], causal, top_k=2, windows=[0, 4, 9]).to_pandas()
    assert dict(zip(table["doc_id"], table["window"], strict=False)) == {1: 0, 2: 4, 3: 9}


@pytest.mark.parametrize("k", [1, 3, 8, 200])
def test_compiled_top_k_columns_equal_the_torch_path(analysis: tuple[BatchAnalysis, bool], k: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The numba path (`kernels.kept_topk_columns`: kernel rows straight to columns) builds the same table as the
    torch path (index tensors, gathers, casts), value for value, with padding, a window column, a sliding
    window's first keys, a document a measure was not computed for (NaN: null) and positions that are not the
    matrix indices."""
    from extractor.corpus import tables

    result, causal = analysis
    per_layer = {name: [t.clone() for t in values] for name, values in result.per_layer.items()}
    per_layer["value_norm"][1][2] = float("nan")  # value_norm not computed for document 2 in layer 1
    per_layer["rollout"][0][1] = float("nan")  # nor rollout for document 1 in layer 0: it keeps no layer row there
    lengths, positions, doc_ids = tables.batch_inputs(result, [7, 3, 11])
    positions = positions + 5 * torch.arange(3)[:, None]  # windows of longer documents: positions start later
    windows = torch.tensor([0, 2, 1])

    def first_keys(names: tuple[str, ...], layer: int) -> torch.Tensor | None:
        return None if layer % 2 else (torch.arange(positions.shape[1]) - 3).clamp_min(0)  # a 4-key window

    def table(compiled: bool) -> pa.Table:
        monkeypatch.setattr(tables, "HAVE_NUMBA", compiled)
        return tables.measures_table(per_layer, lengths, positions, doc_ids, causal, top_k=k, windows=windows,
                                     first_keys=first_keys)

    compiled, reference = table(True), table(False)
    assert compiled.schema == reference.schema
    assert compiled.num_rows == reference.num_rows > 0
    assert compiled["value_norm"].null_count == reference["value_norm"].null_count > 0
    for name in ("doc_id", "layer", "head", "query_pos", "key_pos", "window", *MEASURES):
        assert compiled[name].equals(reference[name]), name
    # kept_mass: eight float32 slots summed in another order can differ in the last bit
    np.testing.assert_allclose(compiled["kept_mass"].to_numpy(), reference["kept_mass"].to_numpy(), rtol=1e-6, atol=0)


def test_head_stats_batch_equals_per_document(analysis: tuple[BatchAnalysis, bool], minilm) -> None:
    result, causal = analysis
    n_layers, n_heads = len(result.per_layer["attention"]), result.per_layer["attention"][0].shape[1]
    tokens = ("[CLS]", "[SEP]") if not causal else (None, None)
    batched, per_doc = HeadStats(n_layers, n_heads, causal, *tokens), HeadStats(n_layers, n_heads, causal, *tokens)
    batched.update_batch(result)
    for doc in result.docs:
        per_doc.update(doc)
    assert batched.n_rows == per_doc.n_rows == sum(result.batch.lengths)
    for name, value in per_doc.values().items():
        torch.testing.assert_close(batched.values()[name], value, rtol=1e-6, atol=1e-9, equal_nan=True, msg=name)
    for name, (mean, sd) in per_doc.per_document().items():  # the per-document spread, too
        batched_mean, batched_sd = batched.per_document()[name]
        torch.testing.assert_close(batched_mean, mean, rtol=1e-6, atol=1e-9, equal_nan=True, msg=name)
        torch.testing.assert_close(batched_sd, sd, rtol=1e-5, atol=1e-8, equal_nan=True, msg=name)


def test_similarity_batch_equals_per_document(analysis: tuple[BatchAnalysis, bool]) -> None:
    result, _ = analysis
    n_layers, n_heads = len(result.per_layer["attention"]), result.per_layer["attention"][0].shape[1]
    for rows in (None, 3):
        batched, per_doc = HeadSimilarity(n_layers, n_heads, rows), HeadSimilarity(n_layers, n_heads, rows)
        batched.update_batch(result)
        for doc in result.docs:
            per_doc.update(doc)
        assert batched.n_rows == per_doc.n_rows
        torch.testing.assert_close(batched.matrix(), per_doc.matrix(), rtol=1e-6, atol=1e-9)
        assert torch.equal(batched.matrix().diagonal(), torch.zeros(n_layers * n_heads, dtype=torch.float64))


def test_writer_takes_an_ordered_batch_as_is(analysis: tuple[BatchAnalysis, bool], tmp_path) -> None:
    """A token-level batch table is already in the writer's order: writing it unsorted-aware or as ordered
    gives the same file contents and the same per-layer row groups."""
    result, causal = analysis
    table = batch_association_table(result, [1, 2, 5], causal, top_k=4)
    write_associations(table, tmp_path / "sorted.parquet", ordered=False)
    write_associations(table, tmp_path / "ordered.parquet", ordered=True)
    sorted_file, ordered_file = pq.ParquetFile(tmp_path / "sorted.parquet"), pq.ParquetFile(tmp_path / "ordered.parquet")
    assert ordered_file.read().equals(sorted_file.read())
    assert ordered_file.num_row_groups == sorted_file.num_row_groups == len(result.per_layer["attention"])


def test_bfloat16_threshold_and_kept_mass_are_taken_in_float32() -> None:
    """A bfloat16 value just below the threshold stays out (bf16 would round the threshold onto it), and kept_mass
    sums in float32."""
    from extractor.corpus.tables import select_cells

    row = torch.tensor([0.0498046875, 0.5, 0.44921875], dtype=torch.bfloat16)  # exact in bfloat16
    values = {"attention": row.view(1, 1, 1, 3)}
    cells = select_cells(values, torch.tensor([3]), causal=False, top_k=None, threshold=0.0499)
    assert cells.key.tolist() == [1, 2]
    top = select_cells(values, torch.tensor([3]), causal=False, top_k=2, threshold=None)
    assert top.kept_mass is not None and top.kept_mass.dtype == torch.float32
    expected = torch.tensor((0.5 + 0.44921875) / (0.0498046875 + 0.5 + 0.44921875), dtype=torch.float32)
    torch.testing.assert_close(top.kept_mass, expected.expand(2), rtol=0, atol=1e-7)
