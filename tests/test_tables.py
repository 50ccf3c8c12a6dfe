"""The long-format Arrow tables: schema, no padding, causal structure, top-k, threshold, token offsets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from extractor.attribution.analysis import DocAttention, analyse_batch
from extractor.core.encode import encode
from extractor.core.models import LoadedModel
from extractor.corpus.tables import association_table, tokens_table, words_table

ALL_MEASURES = ("attention", "value_norm", "layer_value_norm", "rollout")
HEAD = ("attention", "value_norm")
LAYER = ("layer_value_norm", "rollout")


@pytest.fixture(scope="module")
def minilm_docs(minilm: LoadedModel, sentences: list[str]) -> list[DocAttention]:
    batch = encode(minilm.tokenizer, sentences)
    assert (batch.attention_mask == 0).any()  # padded, so "no padded positions" below means something
    return analyse_batch(minilm, batch, measures=ALL_MEASURES, verify=False).docs


@pytest.fixture(scope="module")
def gpt2_docs(tiny_loaded, sentences: list[str]) -> list[DocAttention]:
    loaded = tiny_loaded("gpt2")
    return analyse_batch(loaded, encode(loaded.tokenizer, sentences[:2]), measures=ALL_MEASURES, verify=False).docs


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def cells(table: pa.Table) -> set[tuple[int, int, int, int]]:
    return set(zip(*(column(table, c).tolist() for c in ("layer", "head", "query_pos", "key_pos")), strict=True))


# --- schema and dtypes ------------------------------------------------------------------------------------


def test_association_schema_and_dtypes(minilm_docs: list[DocAttention]) -> None:
    table = association_table(3, minilm_docs[0], causal=False)
    expected = {
        "doc_id": pa.int64(),
        "layer": pa.int16(),
        "head": pa.int16(),
        "query_pos": pa.int32(),
        "key_pos": pa.int32(),
        "attention": pa.float32(),
        "value_norm": pa.float32(),
        "layer_value_norm": pa.float32(),
        "rollout": pa.float32(),
    }
    assert {f.name: f.type for f in table.schema} == expected
    assert set(column(table, "doc_id").tolist()) == {3}


def test_association_float16_values(minilm_docs: list[DocAttention]) -> None:
    doc = minilm_docs[0]
    wide = association_table(0, doc, causal=False)
    narrow = association_table(0, doc, causal=False, value_type=pa.float16())
    for name in ALL_MEASURES:
        assert narrow.schema.field(name).type == pa.float16()
        assert narrow.column(name).null_count == wide.column(name).null_count
    assert narrow.schema.field("layer").type == pa.int16()
    np.testing.assert_array_equal(column(narrow, "attention"), column(wide, "attention").astype(np.float16))


def test_top_k_schema_has_kept_mass(minilm_docs: list[DocAttention]) -> None:
    table = association_table(0, minilm_docs[0], causal=False, top_k=2)
    assert table.schema.field("kept_mass").type == pa.float32()


def test_tokens_and_words_schema(minilm: LoadedModel, minilm_docs: list[DocAttention], sentences: list[str]) -> None:
    tokens = tokens_table(1, minilm_docs[1].doc)
    assert {f.name: f.type for f in tokens.schema} == {
        "doc_id": pa.int64(),
        "position": pa.int32(),
        "token": pa.string(),
        "word_index": pa.int32(),
        "is_special": pa.bool_(),
        "char_start": pa.int32(),
        "char_end": pa.int32(),
        "segment": pa.int8(),
    }
    words = words_table(1, minilm_docs[1].doc, sentences[1])
    assert {f.name: f.type for f in words.schema} == {
        "doc_id": pa.int64(),
        "word_index": pa.int32(),
        "word": pa.string(),
        "is_special": pa.bool_(),
        "n_tokens": pa.int32(),
        "char_start": pa.int32(),
        "char_end": pa.int32(),
        "segment": pa.int8(),
    }


# --- dense: every real cell once, nothing from padding ------------------------------------------------------


def test_dense_rows_cover_real_tokens_only(minilm_docs: list[DocAttention]) -> None:
    lengths = {doc.doc.n_tokens for doc in minilm_docs}
    assert len(lengths) == len(minilm_docs)  # clearly different lengths in one padded batch
    for doc_id, doc in enumerate(minilm_docs):
        n = doc.doc.n_tokens
        table = association_table(doc_id, doc, causal=False)
        head = column(table, "head")
        assert table.num_rows == 6 * 12 * n * n + 6 * n * n
        assert (head >= 0).sum() == 6 * 12 * n * n
        for name in ("query_pos", "key_pos"):
            assert column(table, name).min() == 0
            assert column(table, name).max() == n - 1
        assert len(cells(table)) == table.num_rows  # no duplicates


def test_dense_values_are_hugging_face_attentions(minilm: LoadedModel, sentences: list[str]) -> None:
    """Rebuild [layer, head, query, key] from the rows and compare with Hugging Face's output_attentions."""
    batch = encode(minilm.tokenizer, sentences[:2])
    docs = analyse_batch(minilm, batch, measures=("attention",), verify=False).docs
    with torch.no_grad():
        hf = minilm.model(**batch.model_inputs, output_attentions=True).attentions
    for doc_id, doc in enumerate(docs):
        n = doc.doc.n_tokens
        table = association_table(doc_id, doc, causal=False)
        rebuilt = torch.full((6, 12, n, n), float("nan"))
        idx = [torch.from_numpy(column(table, c).astype(np.int64)) for c in ("layer", "head", "query_pos", "key_pos")]
        rebuilt[idx[0], idx[1], idx[2], idx[3]] = torch.tensor(column(table, "attention"))
        expected = torch.stack([a[doc_id, :, :n, :n] for a in hf])
        torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-5)


def test_head_and_layer_rows_carry_their_own_measures(minilm_docs: list[DocAttention]) -> None:
    table = association_table(0, minilm_docs[0], causal=False).to_pandas()
    layer_rows = table[table["head"] == -1]
    head_rows = table[table["head"] >= 0]
    assert len(layer_rows) and len(head_rows)
    for name in LAYER:
        assert layer_rows[name].notna().all()
        assert head_rows[name].isna().all()
    for name in HEAD:
        assert head_rows[name].notna().all()
        assert layer_rows[name].isna().all()
    # Layer rows hold the layer measures of the right cell.
    doc = minilm_docs[0]
    for row in layer_rows.sample(20, random_state=0).itertuples():
        assert row.rollout == pytest.approx(float(doc.layer_measures["rollout"][row.layer, row.query_pos, row.key_pos]))


def test_causal_model_has_no_future_keys(gpt2_docs: list[DocAttention]) -> None:
    for doc_id, doc in enumerate(gpt2_docs):
        n = doc.doc.n_tokens
        table = association_table(doc_id, doc, causal=True)
        query, key = column(table, "query_pos"), column(table, "key_pos")
        assert not (key > query).any()
        triangle = n * (n + 1) // 2
        assert table.num_rows == 2 * 4 * triangle + 2 * triangle
        assert query.max() == n - 1
        for mode in ({"top_k": 3}, {"threshold": 0.05}):
            selected = association_table(doc_id, doc, causal=True, **mode)
            assert not (column(selected, "key_pos") > column(selected, "query_pos")).any()


def test_word_level_positions_are_words(minilm: LoadedModel, sentences: list[str]) -> None:
    batch = encode(minilm.tokenizer, sentences)
    docs = analyse_batch(minilm, batch, measures=ALL_MEASURES, verify=False, level="word").docs
    long = docs[2]
    assert long.doc.n_words < long.doc.n_tokens  # "councilmen" is split into two pieces
    table = association_table(2, long, causal=False)
    assert column(table, "key_pos").max() == long.doc.n_words - 1
    assert table.num_rows == 6 * 12 * long.doc.n_words**2 + 6 * long.doc.n_words**2


# --- top-k and threshold ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_top_k_keeps_the_k_largest(k: int, causal: bool, minilm_docs, gpt2_docs) -> None:
    doc = (gpt2_docs if causal else minilm_docs)[1]
    n = doc.doc.n_tokens
    table = association_table(1, doc, causal=causal, top_k=k).to_pandas()
    groups = (
        (table[table["head"] >= 0], doc.head_measures["attention"], True),
        (table[table["head"] == -1], doc.layer_measures["rollout"], False),
    )
    for rows, rank, head_level in groups:
        per_row = Counter(zip(rows["layer"], rows["head"], rows["query_pos"], strict=True))
        n_rows = rank.shape[0] * (rank.shape[1] if head_level else 1) * n
        assert len(per_row) == n_rows  # every query row is represented
        for (_, _, query), count in per_row.items():
            allowed = query + 1 if causal else n
            assert count == min(k, allowed)
        sample = rows.groupby(["layer", "head", "query_pos"]).agg(list).reset_index().sample(30, random_state=0)
        for row in sample.itertuples():
            values = (rank[row.layer, row.head] if head_level else rank[row.layer])[row.query_pos].numpy()
            allowed = row.query_pos + 1 if causal else n
            candidates = values[:allowed]
            expected_keys = set(np.argsort(-candidates, kind="stable")[: min(k, allowed)].tolist())
            assert set(row.key_pos) == expected_keys
            kept = candidates[sorted(expected_keys)].sum() / candidates.sum()
            assert row.kept_mass == pytest.approx([kept] * len(row.key_pos), rel=1e-5)


@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_threshold_keeps_exactly_cells_above(threshold: float, minilm_docs, gpt2_docs) -> None:
    for doc, causal in ((minilm_docs[0], False), (gpt2_docs[0], True)):
        table = association_table(0, doc, causal=causal, threshold=threshold)
        attention = doc.head_measures["attention"]
        rollout = doc.layer_measures["rollout"]
        expected = {
            (lay, h, q, k) for lay, h, q, k in (attention >= threshold).nonzero().tolist() if not (causal and k > q)
        } | {(lay, -1, q, k) for lay, q, k in (rollout >= threshold).nonzero().tolist() if not (causal and k > q)}
        assert len(expected) > 0
        assert cells(table) == expected
        assert table.num_rows == len(expected)
        head_values = column(table, "attention")[column(table, "head") >= 0]
        assert head_values.min() >= threshold


# --- tokens and words --------------------------------------------------------------------------------------


def test_token_offsets_line_up_with_the_text(minilm: LoadedModel, minilm_docs, sentences: list[str]) -> None:
    for doc_id, (doc, text) in enumerate(zip(minilm_docs, sentences, strict=True)):
        table = tokens_table(doc_id, doc.doc).to_pandas()
        direct = minilm.tokenizer(text, return_offsets_mapping=True)
        assert table["token"].tolist() == minilm.tokenizer.convert_ids_to_tokens(direct["input_ids"])
        assert list(zip(table["char_start"], table["char_end"], strict=True)) == [
            tuple(o) for o in direct["offset_mapping"]
        ]
        assert table["position"].tolist() == list(range(len(table)))
        assert table["is_special"].tolist() == [t in ("[CLS]", "[SEP]") for t in table["token"]]
        for row in table[~table["is_special"]].itertuples():
            assert text[row.char_start : row.char_end].lower() == row.token.removeprefix("##")


def test_words_join_their_pieces(minilm_docs, sentences: list[str]) -> None:
    doc = minilm_docs[2].doc
    table = words_table(2, doc, sentences[2]).to_pandas()
    assert len(table) == doc.n_words
    assert table["word_index"].tolist() == list(range(doc.n_words))
    assert table["n_tokens"].sum() == doc.n_tokens
    council = table[table["word"] == "councilmen"]
    assert len(council) == 1 and int(council["n_tokens"].iloc[0]) == 2
    assert table["word"].iloc[0] == "[CLS]" and table["word"].iloc[-1] == "[SEP]"
    for row in table[~table["is_special"]].itertuples():
        assert sentences[2][row.char_start : row.char_end] == row.word


def test_top_k_by_value_norm_kept_mass(minilm: LoadedModel, sentences: list[str]) -> None:
    """Without `attention`, heads rank by value_norm (rows do not sum to 1): kept_mass = kept / row sum."""
    doc = analyse_batch(
        minilm,
        encode(minilm.tokenizer, sentences[:1]),
        measures=("value_norm", "layer_value_norm"),
        verify=False,
    ).docs[0]
    k = 2
    table = association_table(0, doc, causal=False, top_k=k).to_pandas()
    for rows, rank in (
        (table[table["head"] >= 0], doc.head_measures["value_norm"]),
        (table[table["head"] == -1], doc.layer_measures["layer_value_norm"]),
    ):
        grouped = rows.groupby(["layer", "head", "query_pos"]).agg(list).reset_index()
        assert len(grouped) == rank.numel() // rank.shape[-1]
        fractions = []
        for row in grouped.sample(40, random_state=1).itertuples():
            values = (rank[row.layer, row.head] if row.head >= 0 else rank[row.layer])[row.query_pos].numpy()
            top = np.argsort(-values, kind="stable")[:k]
            assert set(row.key_pos) == set(top.tolist())
            expected = values[top].sum() / values.sum()
            assert row.kept_mass == pytest.approx([expected] * k, rel=1e-5)
            fractions.append(expected)
        assert min(fractions) < 0.9  # real fractions, not the trivial 1
