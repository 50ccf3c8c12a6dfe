"""The per-head metrics' compiled row pass against the torch path, by hand, and on a real model's batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from extractor.attribution.analysis import analyse_batch
from extractor.core.encode import encode
from extractor.heads import metrics
from extractor.heads.metrics import BatchLayout, HeadStats, row_statistics

FIELDS = ("entropy", "distance", "max", "total", "on_keys", "value_total", "value_on_keys")


def padded_patterns(lengths: list[int], n_heads: int, causal: bool, window: int | None = None,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern, value_norm) [batch, head, query, key]: softmax rows over each document's visible keys (0 on
    padding keys, causal future and keys before a window), padding rows of noise; value_norm = A · ‖v_j‖."""
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    scores = torch.randn(len(lengths), n_heads, n, n, generator=generator) * 3
    key = torch.arange(n)
    visible = key[None, None, :] < torch.tensor(lengths)[:, None, None]  # [batch, query, key]
    if causal:
        visible = visible & (key[None, :, None] >= key[None, None, :])
    if window is not None:
        visible = visible & (key[None, None, :] > key[None, :, None] - window)
    pattern = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)
    pattern = torch.nan_to_num(pattern)  # padding rows of a causal model see nothing
    norms = torch.rand(len(lengths), n_heads, 1, n, generator=generator) * 4
    return pattern, pattern * norms


def layout_for(lengths: list[int], causal: bool, cls_token: str | None = "[CLS]") -> BatchLayout:
    labels = [["[CLS]", *(",." if i % 3 == 0 else "w" for i in range(1, n - 1)), "[SEP]"] for n in lengths]
    specials = [[label in ("[CLS]", "[SEP]") for label in doc] for doc in labels]
    return BatchLayout.build(lengths, labels, specials, causal, cls_token, "[SEP]")


def assert_rows_equal(compiled: metrics.RowStatistics, reference: metrics.RowStatistics, real: torch.Tensor) -> None:
    """Every statistic on the real rows (padding rows are never counted), to float32 rounding."""
    for name in FIELDS:
        got, want = getattr(compiled, name), getattr(reference, name)
        if want is None:
            assert got is None, name
            continue
        mask = real[:, None, :, None] if got.dim() == 4 else real[:, None, :]
        mask = mask.expand_as(got)
        torch.testing.assert_close(got[mask], want[mask], rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_values", [False, True])
def test_compiled_rows_equal_the_torch_path(causal: bool, with_values: bool) -> None:
    lengths = [37, 9, 64, 1]
    pattern, value_norm = padded_patterns(lengths, 5, causal)
    layout = layout_for(lengths, causal)
    values = value_norm if with_values else None
    compiled = row_statistics(pattern, layout, values, use_numba=True)
    assert_rows_equal(compiled, row_statistics(pattern, layout, values, use_numba=False), layout.real)


def test_compiled_rows_under_a_sliding_window_and_without_special_tokens() -> None:
    lengths = [50, 23]
    pattern, value_norm = padded_patterns(lengths, 3, causal=True, window=7)
    layout = layout_for(lengths, causal=True, cls_token=None)
    assert len(layout.flag_names) == 2
    windowed = layout.restricted(torch.arange(50).sub(6).clamp_min(0))
    compiled = row_statistics(pattern, windowed, value_norm, use_numba=True)
    assert_rows_equal(compiled, row_statistics(pattern, windowed, value_norm, use_numba=False), layout.real)


def test_compiled_rows_by_hand() -> None:
    """Row 2 of a document of 3 tokens padded to 4: the fourth key is padding."""
    row = [0.5, 0.25, 0.25, 0.0]
    pattern = torch.zeros(2, 1, 4, 4)
    pattern[0, 0, 2] = torch.tensor(row)
    layout = BatchLayout.build([3, 4], [["[CLS]", ",", "[SEP]"], ["[CLS]", "a", "b", "[SEP]"]],
                               [[True, False, True], [True, False, False, True]], False, "[CLS]", "[SEP]")
    value_norm = pattern * torch.tensor([2.0, 4.0, 1.0, 9.0])
    stats = row_statistics(pattern, layout, value_norm, use_numba=True)
    entropy = -sum(a * math.log(a) for a in row if a > 0)
    assert stats.entropy[0, 0, 2].item() == pytest.approx(entropy, rel=1e-6)
    assert stats.distance[0, 0, 2].item() == pytest.approx(0.5 * 2 + 0.25 * 1, rel=1e-6)
    assert stats.max[0, 0, 2].item() == 0.5
    assert stats.total[0, 0, 2].item() == 1.0
    # flag sets: punctuation (key 1), [CLS] (key 0), [SEP] (key 2)
    assert stats.on_keys[0, 0, 2].tolist() == [0.25, 0.5, 0.25]
    assert stats.value_total[0, 0, 2].item() == 0.5 * 2 + 0.25 * 4 + 0.25 * 1
    assert stats.value_on_keys[0, 0, 2].tolist() == [1.0, 1.0, 0.25]


def test_a_row_with_nan_is_nan_on_both_paths() -> None:
    pattern, _ = padded_patterns([6], 2, causal=False)
    pattern[0, 1, 3, 2] = -float("nan")  # the sign bit set, as 0/0 gives on x86
    layout = layout_for([6], causal=False)
    for use_numba in (True, False):
        stats = row_statistics(pattern, layout, use_numba=use_numba)
        assert stats.entropy[0, 1, 3].isnan() and stats.max[0, 1, 3].isnan() and stats.total[0, 1, 3].isnan()
        assert not stats.max[0, 1, 2].isnan()


def test_head_stats_equal_with_and_without_the_compiled_pass(minilm, sentences: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A real MiniLM batch (three lengths, padded): the heads table is the same on both paths."""
    batch = encode(minilm.tokenizer, [sentences[2], sentences[0], sentences[1]])
    analysis = analyse_batch(minilm, batch, measures=("attention", "value_norm"), verify=False)
    tables = []
    for compiled in (True, False):
        monkeypatch.setattr(metrics, "HAVE_NUMBA", compiled)
        stats = HeadStats(6, 12, False, "[CLS]", "[SEP]")
        stats.update_batch(analysis)
        tables.append(stats.table())
    np.testing.assert_allclose(tables[0].to_numpy(float), tables[1].to_numpy(float), rtol=1e-5, atol=1e-7)
