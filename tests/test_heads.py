"""Per-head metrics and pattern detectors: hand-built patterns with known answers, streaming = all at once."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from hand_docs import make_doc, random_patterns

from extractor.api import extract
from extractor.heads.metrics import (
    METRICS,
    HeadStats,
    duplicate_token_pattern,
    induction_pattern,
    is_punctuation,
    previous_token_pattern,
)


def metrics_of(
    docs, causal: bool = False, cls: str | None = "[CLS]", sep: str | None = "[SEP]"
) -> dict[str, float]:
    """Layer 0 head 0's metrics over `docs` (one HeadStats, documents streamed in order)."""
    n_layers, n_heads = docs[0].head_measures["attention"].shape[:2]
    stats = HeadStats(n_layers, n_heads, causal, cls, sep)
    for doc in docs:
        stats.update(doc)
    row = stats.table().iloc[0]
    return {name: float(row[name]) for name in METRICS}


# --- hand-built patterns with known answers -----------------------------------------------------------------


def test_pure_previous_token_pattern() -> None:
    # Row 0 has no previous token, so it looks at its neighbour 1; every other row looks only at i − 1.
    n = 5
    attention = torch.zeros(n, n)
    attention[0, 1] = 1.0
    for i in range(1, n):
        attention[i, i - 1] = 1.0
    got = metrics_of([make_doc(attention, ["a", "b", "c", "d", "e"])])
    assert got["previous_token"] == pytest.approx(1.0)
    assert got["previous_token_score"] == pytest.approx(1.0)
    assert got["mean_distance"] == pytest.approx(1.0)
    assert got["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert got["entropy_normalised"] == pytest.approx(0.0, abs=1e-6)
    assert got["max_weight"] == pytest.approx(1.0)
    assert got["self"] == pytest.approx(0.0)
    assert got["next_token"] == pytest.approx(1 / 4)  # only row 0 (of rows 0..3 that have a next token)
    assert got["first_token"] == pytest.approx(1 / 5)  # only row 1 looks at position 0


def test_uniform_pattern() -> None:
    n = 4
    got = metrics_of([make_doc(torch.full((n, n), 1 / n), ["a", "b", "c", "d"])])
    assert got["entropy"] == pytest.approx(math.log(4))
    assert got["entropy_normalised"] == pytest.approx(1.0)
    assert got["max_weight"] == pytest.approx(0.25)
    # Σ_j |i − j| per row: 6, 4, 4, 6 → mean 20/4 over weights 1/4.
    assert got["mean_distance"] == pytest.approx(1.25)
    for name in ("first_token", "self", "previous_token", "next_token"):
        assert got[name] == pytest.approx(0.25)


def test_uniform_causal_pattern_normalised_entropy_skips_the_first_row() -> None:
    # Row i is uniform over keys 0..i; row 0 (length 1, ln 1 = 0) must not pull the mean below 1.
    n = 5
    attention = torch.ones(n, n).tril()
    attention = attention / attention.sum(dim=-1, keepdim=True)
    got = metrics_of([make_doc(attention, list("abcde"))], causal=True, cls=None, sep=None)
    assert got["entropy_normalised"] == pytest.approx(1.0)
    assert got["entropy"] == pytest.approx(sum(math.log(k) for k in range(1, n + 1)) / n)
    assert got["next_token"] == 0.0


def test_uniform_sliding_window_rows_count_only_the_keys_of_the_window() -> None:
    """Window 3 over 5 tokens: row i is uniform over keys max(0, i − 2)..i. Every row of length > 1 is uniform
    over the keys it sees (entropy_normalised 1); only rows 0..2 see key 0; row 4's earlier "b" (key 1) lies
    before its window, so only row 2's earlier "a" counts for the duplicate-token detector."""
    n, window = 5, 3
    position = torch.arange(n)
    attention = ((position[None, :] <= position[:, None]) & (position[None, :] > position[:, None] - window)).float()
    attention = attention / attention.sum(dim=-1, keepdim=True)
    doc = make_doc(attention, list("abacb"))
    doc.sliding_windows = [window]
    got = metrics_of([doc], causal=True, cls=None, sep=None)
    assert got["entropy_normalised"] == pytest.approx(1.0)
    assert got["first_token"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert got["duplicate_token_score"] == pytest.approx(1 / 3)
    assert got["previous_token"] == pytest.approx((1 / 2 + 3 * (1 / 3)) / 4)
    # the same document without its window: the hidden keys count as part of each row
    unwindowed = metrics_of([make_doc(attention, list("abacb"))], causal=True, cls=None, sep=None)
    assert unwindowed["entropy_normalised"] < 0.95 and unwindowed["duplicate_token_score"] == pytest.approx(1 / 6)


def test_special_token_and_punctuation_fractions() -> None:
    tokens = ["[CLS]", "the", ",", "cat", "[SEP]"]
    row = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.3])
    attention = row.expand(5, 5).clone()
    # value_norm = α_ij ‖f(x_j)‖ with ‖f‖ = 2, 1, 1, 1, 4 → row 1.0, 0, 0.2, 0, 1.2 (sum 2.4).
    value_norm = attention * torch.tensor([2.0, 1.0, 1.0, 1.0, 4.0])
    got = metrics_of([make_doc(attention, tokens, value_norm=value_norm)])
    assert got["cls"] == pytest.approx(0.5)
    assert got["sep"] == pytest.approx(0.3)
    assert got["punctuation"] == pytest.approx(0.2)  # ',' only: [CLS]/[SEP] are special, not punctuation
    assert got["cls_value_norm"] == pytest.approx(1.0 / 2.4)
    assert got["sep_value_norm"] == pytest.approx(1.2 / 2.4)


def test_missing_special_tokens_and_value_norm_are_nan() -> None:
    attention = torch.full((3, 3), 1 / 3)
    got = metrics_of([make_doc(attention, ["a", "b", "c"])], cls=None, sep=None)
    for name in ("cls", "sep", "cls_value_norm", "sep_value_norm", "induction_score"):
        assert math.isnan(got[name]), name
    assert not math.isnan(got["entropy"])


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (",", True),
        ("Ġ.", True),
        ("##!", True),
        ("...", True),
        ("cat", False),
        ("Ġthe", False),
        ("[SEP]", False),
        ("Ġ", False),
        ("a,", False),
    ],
)
def test_is_punctuation(token: str, expected: bool) -> None:
    assert is_punctuation(token) is expected


# --- pattern detectors --------------------------------------------------------------------------------------

REPEATED = ["A", "B", "C", "A", "B", "C"]  # a sequence repeated once, as in TransformerLens' detectors


def test_reference_patterns_hand_written() -> None:
    previous = torch.zeros(4, 4, dtype=torch.bool)
    previous[1, 0] = previous[2, 1] = previous[3, 2] = True
    assert torch.equal(previous_token_pattern(4), previous)
    duplicate = torch.zeros(6, 6, dtype=torch.bool)
    duplicate[3, 0] = duplicate[4, 1] = duplicate[5, 2] = True
    assert torch.equal(duplicate_token_pattern(REPEATED), duplicate)
    induction = torch.zeros(6, 6, dtype=torch.bool)
    induction[3, 1] = induction[4, 2] = induction[5, 3] = True  # the token after the earlier occurrence
    assert torch.equal(induction_pattern(REPEATED), induction)


def one_hot_rows(targets: list[int]) -> torch.Tensor:
    """[query, key]: row i puts all its weight on key targets[i]."""
    attention = torch.zeros(len(targets), len(targets))
    attention[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
    return attention


@pytest.mark.parametrize(
    ("targets", "detector"),
    [
        ([0, 0, 1, 2, 3, 4], "previous_token_score"),
        ([0, 1, 2, 0, 1, 2], "duplicate_token_score"),  # rows 3..5 look at the earlier A, B, C
        ([0, 1, 2, 1, 2, 3], "induction_score"),  # rows 3..5 look at the token after the earlier A, B, C
    ],
)
def test_detector_scores_one_on_its_own_pattern(targets: list[int], detector: str) -> None:
    got = metrics_of([make_doc(one_hot_rows(targets), REPEATED)], causal=True, cls=None, sep=None)
    assert got[detector] == pytest.approx(1.0)
    for other in {"duplicate_token_score", "induction_score"} - {detector}:
        assert got[other] == pytest.approx(0.0)


def test_detector_partial_score() -> None:
    attention = one_hot_rows([0, 1, 2, 0, 1, 2])
    attention[3] = torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0, 0.0])  # half on the earlier A, half on itself
    got = metrics_of([make_doc(attention, REPEATED)], causal=True, cls=None, sep=None)
    assert got["duplicate_token_score"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_induction_is_nan_for_non_causal_models() -> None:
    got = metrics_of([make_doc(one_hot_rows([0, 1, 2, 1, 2, 3]), REPEATED)], causal=False)
    assert math.isnan(got["induction_score"])


# --- streaming = all at once --------------------------------------------------------------------------------


def reference_metrics(docs, causal: bool, cls: str, sep: str) -> dict[str, np.ndarray]:
    """The metrics computed row by row over all documents' rows pooled together (loops, no extractor code)."""
    rows: dict[str, list[np.ndarray]] = defaultdict(list)  # metric → per-row values [layer, head]
    hits: dict[str, float | np.ndarray] = defaultdict(float)
    mass: dict[str, float | np.ndarray] = defaultdict(float)
    for doc in docs:
        a = doc.head_measures["attention"].double().numpy()  # [layer, head, query, key]
        vn = doc.head_measures["value_norm"].double().numpy()
        tokens, specials = doc.doc.tokens, doc.doc.is_special
        n = len(tokens)
        punct = [j for j in range(n) if all(not c.isalnum() for c in tokens[j]) and not specials[j]]
        for i in range(n):
            row = a[:, :, i, :]  # [layer, head, key]
            share = vn[:, :, i, :] / vn[:, :, i, :].sum(axis=-1, keepdims=True)
            entropy = -np.where(row > 0, row * np.log(np.where(row > 0, row, 1)), 0).sum(axis=-1)
            rows["entropy"].append(entropy)
            length = i + 1 if causal else n
            if length > 1:
                rows["entropy_normalised"].append(entropy / math.log(length))
            rows["mean_distance"].append(sum(row[..., j] * abs(i - j) for j in range(n)))
            rows["first_token"].append(row[..., 0])
            rows["cls"].append(sum(row[..., j] for j in range(n) if tokens[j] == cls))
            rows["sep"].append(sum(row[..., j] for j in range(n) if tokens[j] == sep))
            rows["cls_value_norm"].append(sum(share[..., j] for j in range(n) if tokens[j] == cls))
            rows["sep_value_norm"].append(sum(share[..., j] for j in range(n) if tokens[j] == sep))
            rows["self"].append(row[..., i])
            if i >= 1:
                rows["previous_token"].append(row[..., i - 1])
            if i <= n - 2:
                rows["next_token"].append(row[..., i + 1])
            rows["punctuation"].append(sum((row[..., j] for j in punct), np.zeros(row.shape[:2])))
            rows["max_weight"].append(row.max(axis=-1))
            references = {
                "previous_token_score": [i - 1] if i >= 1 else [],
                "duplicate_token_score": [j for j in range(i) if tokens[j] == tokens[i]],
                "induction_score": [j for j in range(1, i + 1) if tokens[j - 1] == tokens[i] and j - 1 < i],
            }
            for name, keys in references.items():
                if keys:
                    hits[name] = hits[name] + sum(row[..., j] for j in keys)
                    mass[name] = mass[name] + row.sum(axis=-1)
    result = {name: np.mean(values, axis=0) for name, values in rows.items()}
    result.update({name: hits[name] / mass[name] for name in hits})
    return result


def corpus(causal: bool, seed: int = 0):
    """Four random documents of different lengths with [CLS]/[SEP], punctuation and repeated tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocabulary = ["the", "cat", "sat", ",", ".", "on", "mat", "##s"]
    docs = []
    for n in (5, 9, 3, 12):
        picks = torch.randint(len(vocabulary), (n - 2,), generator=generator).tolist()
        tokens = ["[CLS]", *[vocabulary[p] for p in picks], "[SEP]"]
        attention = random_patterns(2, 3, n, causal, generator)
        value_norm = attention * torch.rand(2, 3, 1, n, generator=generator)
        docs.append(make_doc(attention, tokens, value_norm=value_norm))
    return docs


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_equals_all_rows_at_once(causal: bool) -> None:
    docs = corpus(causal)
    streamed = HeadStats(2, 3, causal, "[CLS]", "[SEP]")
    for doc in docs:
        streamed.update(doc)
    expected = reference_metrics(docs, causal, "[CLS]", "[SEP]")
    got = streamed.values()
    assert set(expected) == set(METRICS)
    if not causal:  # induction is defined for causal models only
        assert torch.isnan(got["induction_score"]).all()
        del expected["induction_score"]
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert streamed.n_rows == sum(d.size for d in docs)


def test_merged_workers_equal_one_pass() -> None:
    docs = corpus(causal=True, seed=1)
    one = HeadStats(2, 3, True, "[CLS]", "[SEP]")
    for doc in docs:
        one.update(doc)
    left, right = HeadStats(2, 3, True, "[CLS]", "[SEP]"), HeadStats(2, 3, True, "[CLS]", "[SEP]")
    for doc in docs[:1]:
        left.update(doc)
    for doc in docs[1:]:
        right.update(doc)
    left.merge(right)
    np.testing.assert_allclose(
        left.table()[list(METRICS)].to_numpy(), one.table()[list(METRICS)].to_numpy(), rtol=1e-12
    )
    assert left.n_rows == one.n_rows


def test_table_columns_and_types() -> None:
    stats = HeadStats(2, 3, False, "[CLS]", "[SEP]")
    for doc in corpus(False):
        stats.update(doc)
    table = stats.table()
    spread = [f"{m}_{kind}" for m in METRICS for kind in ("doc_mean", "doc_sd")]
    assert list(table.columns) == ["layer", "head", "n_rows", *METRICS, *spread]
    assert str(table["layer"].dtype) == "int16" and str(table["head"].dtype) == "int16"
    assert str(table["n_rows"].dtype) == "int64"
    assert all(str(table[m].dtype) == "float64" for m in METRICS)
    assert table[["layer", "head"]].values.tolist() == [
        [layer, head] for layer in range(2) for head in range(3)
    ]


# --- real models --------------------------------------------------------------------------------------------


def test_minilm_has_a_previous_token_head(minilm) -> None:
    texts = ["The animal didn't cross the street because it was too tired.", "I love pets, especially cats."]
    result = extract(texts, model=minilm, measures=("attention", "value_norm"), verify=False)
    stats = HeadStats(6, 12, False, minilm.tokenizer.cls_token, minilm.tokenizer.sep_token)
    for doc in result.docs:
        stats.update(doc)
    table = stats.table()
    assert table["n_rows"].iloc[0] == sum(d.doc.n_tokens for d in result.docs)
    # [CLS] is every BERT document's first token, so both fractions count the same cells.
    np.testing.assert_allclose(table["cls"], table["first_token"], rtol=1e-6)
    assert table["entropy_normalised"].between(0, 1 + 1e-6).all()
    # all-MiniLM-L6-v2 layer 0 head 2 attends almost only to the previous token.
    assert table["previous_token_score"].max() > 0.9
    assert table.loc[table["previous_token_score"].idxmax(), ["layer", "head"]].tolist() == [0, 2]


def test_tiny_gpt2_has_induction_scores_and_no_next_token(tiny_loaded) -> None:
    loaded = tiny_loaded("gpt2")
    texts = ["the cat sat on the mat, the cat sat on the mat.", "I love pets, especially cats."]
    result = extract(texts, model=loaded, measures=("attention",), verify=False)
    stats = HeadStats(2, 4, True, None, None)
    for doc in result.docs:
        stats.update(doc)
    table = stats.table()
    assert table["induction_score"].notna().all()
    assert table["induction_score"].between(0, 1).all()
    assert (table["next_token"] == 0).all()  # a causal model never looks ahead
    assert table["cls"].isna().all()


def test_per_document_mean_and_sd_equal_each_documents_own_metrics() -> None:
    """`<metric>_doc_mean`/`_doc_sd` are the mean and sample sd over documents of each document's own value
    (Clark et al.'s convention), computed here from one HeadStats per document."""
    docs = corpus(False)
    stats = HeadStats(2, 3, False, "[CLS]", "[SEP]")
    own = []
    for doc in docs:
        stats.update(doc)
        single = HeadStats(2, 3, False, "[CLS]", "[SEP]")
        single.update(doc)
        own.append(single.table())
    table = stats.table()
    for metric in ("entropy", "previous_token", "cls", "duplicate_token_score"):
        values = np.stack([frame[metric].to_numpy() for frame in own])  # [document, layer·head]
        counted = ~np.isnan(values)
        with np.errstate(invalid="ignore"):
            expected_mean = np.nanmean(values, axis=0)
            expected_sd = np.nanstd(values, axis=0, ddof=1)
        expected_sd[counted.sum(axis=0) < 2] = np.nan
        np.testing.assert_allclose(table[f"{metric}_doc_mean"], expected_mean, rtol=1e-10, equal_nan=True)
        np.testing.assert_allclose(table[f"{metric}_doc_sd"], expected_sd, rtol=1e-8, atol=1e-12, equal_nan=True)
    assert not np.allclose(table["entropy"], table["entropy_doc_mean"])  # pooled rows weigh long documents more
