"""Length bucketing, token-budget batches, truncation and overlapping windows.

Invariants checked: every document lands in exactly one batch; a batch never exceeds the document count or
the padded-token budget (unless one document alone is larger); a document's windows stay together;
truncation keeps the specials; windows keep document-relative positions and overlap by the stride.
"""

from __future__ import annotations

import random

import pytest

from extractor.core.encode import TokenizedDoc, tokenize, truncate, windows
from extractor.core.models import LoadedModel
from extractor.corpus.batching import chunks, plan_batches


def padded_tokens(batch: list[int], groups: list[list[int]]) -> int:
    units = [length for g in batch for length in groups[g]]
    return len(units) * max(units)


@pytest.mark.parametrize("bucketing", [True, False])
def test_every_group_once_and_limits_hold(bucketing: bool) -> None:
    rng = random.Random(0)
    groups = [[rng.randint(3, 120)] for _ in range(200)] + [[128, 128, 70]]  # one windowed document
    rng.shuffle(groups)
    budget, max_batch = 512, 8
    plan = plan_batches(groups, budget, max_batch, bucketing)
    flat = [g for batch in plan for g in batch]
    assert sorted(flat) == list(range(len(groups)))
    for batch in plan:
        assert sum(len(groups[g]) for g in batch) <= max_batch
        assert padded_tokens(batch, groups) <= budget or len(batch) == 1
    for batch in plan:
        assert batch == sorted(batch)  # reading order within a batch: its rows come out in doc_id order
    if bucketing:
        # batches go from short to long documents: each batch's longest ≤ the next batch's shortest
        for this, following in zip(plan, plan[1:], strict=False):
            assert max(max(groups[g]) for g in this) <= min(max(groups[g]) for g in following)
    else:
        assert flat == list(range(len(groups)))


def test_bucketing_reduces_padding() -> None:
    rng = random.Random(1)
    groups = [[rng.choice([5, 100])] for _ in range(64)]
    waste, mixed = {}, {}
    for bucketing in (True, False):
        plan = plan_batches(groups, 10_000, 8, bucketing)
        waste[bucketing] = sum(padded_tokens(b, groups) for b in plan) - sum(sum(g) for g in groups)
        mixed[bucketing] = sum(len({groups[g][0] for g in b}) > 1 for b in plan)
    assert mixed[True] <= 1 < mixed[False]  # sorted: only the batch at the 5 → 100 boundary mixes lengths
    assert waste[True] * 4 < waste[False]


def test_token_budget_splits_batches_and_an_oversized_group_stands_alone() -> None:
    groups = [[10], [10], [10], [10], [300], [10, 10, 10]]
    plan = plan_batches(groups, token_budget=30, max_batch=32, bucketing=False)
    assert plan == [[0, 1, 2], [3], [4], [5]]
    assert plan_batches([[7]] * 5, token_budget=10_000, max_batch=2) == [[0, 1], [2, 3], [4]]
    assert plan_batches([], 100, 4) == []


def test_chunks() -> None:
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([], 3) == []


# -- long documents -----------------------------------------------------------------------------------------

LONG = (
    "The animal didn't cross the street because it was too tired, and the city councilmen refused the "
    "demonstrators a permit because they feared violence."
)


@pytest.fixture(scope="module")
def long_doc(minilm: LoadedModel) -> TokenizedDoc:
    (doc,) = tokenize(minilm.tokenizer, [LONG])
    assert doc.n_tokens > 30 and doc.tokens[0] == "[CLS]" and doc.tokens[-1] == "[SEP]"
    return doc


def test_truncate_keeps_specials_and_renumbers(long_doc: TokenizedDoc) -> None:
    short = truncate(long_doc, 12)
    assert short.truncated and short.n_tokens == 12
    assert short.tokens == long_doc.tokens[:11] + ["[SEP]"]
    assert short.positions == list(range(12))
    assert short.offsets[:11] == long_doc.offsets[:11]
    assert truncate(long_doc, long_doc.n_tokens) is long_doc


@pytest.mark.parametrize("stride", [0, 4, 9])
def test_windows_cover_the_document_with_the_stride_overlap(long_doc: TokenizedDoc, stride: int) -> None:
    max_length = 12
    parts = windows(long_doc, max_length, stride)
    n = long_doc.n_tokens
    assert len(parts) > 1
    assert [w.window for w in parts] == list(range(len(parts)))
    content = []  # each window's content positions (specials excluded)
    for w in parts:
        assert w.n_tokens <= max_length and not w.truncated
        assert w.tokens[0] == "[CLS]" and w.tokens[-1] == "[SEP]"
        assert w.positions[0] == 0 and w.positions[-1] == n - 1  # specials keep the document's positions
        assert w.tokens == [long_doc.tokens[p] for p in w.positions]  # positions are relative to the document
        assert w.input_ids == [long_doc.input_ids[p] for p in w.positions]
        content.append(w.positions[1:-1])
    assert sorted(set(p for c in content for p in c)) == list(range(1, n - 1))
    for before, after in zip(content, content[1:], strict=False):
        assert after[0] > before[0]
        if after[-1] < n - 2:  # not the last window: exactly `stride` shared content tokens
            assert len(set(before) & set(after)) == stride
        else:
            assert len(set(before) & set(after)) >= stride


def test_short_documents_are_one_window(long_doc: TokenizedDoc) -> None:
    assert windows(long_doc, long_doc.n_tokens, 4) == [long_doc]
