"""Unit tests of the shared attention maths on small hand-made tensors (no model)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from extractor.core.adapters.base import AttentionWeights
from extractor.core.recompute import additive_mask, recompute_attention, value_vectors_out

NEG = torch.finfo(torch.float32).min


def random_weights(
    n_heads: int = 2, d_model: int = 6, d_head: int = 3, causal: bool = False, scale: float | None = None
) -> AttentionWeights:
    return AttentionWeights(
        W_Q=torch.randn(n_heads, d_model, d_head),
        W_K=torch.randn(n_heads, d_model, d_head),
        W_V=torch.randn(n_heads, d_model, d_head),
        W_O=torch.randn(n_heads, d_head, d_model),
        b_Q=torch.randn(n_heads, d_head),
        b_K=torch.randn(n_heads, d_head),
        b_V=torch.randn(n_heads, d_head),
        b_O=torch.randn(d_model),
        scale=d_head**-0.5 if scale is None else scale,
        causal=causal,
    )


# --- additive_mask ---------------------------------------------------------------------------------------


def test_additive_mask_padding_hand_made() -> None:
    mask = additive_mask(torch.tensor([[1, 1, 0]]), causal=False)
    assert mask.shape == (1, 1, 3, 3)
    expected = torch.tensor([[0.0, 0.0, NEG]] * 3)  # every query sees keys 0 and 1, never the pad key 2
    assert torch.equal(mask[0, 0], expected)


def test_additive_mask_causal_and_padding_hand_made() -> None:
    mask = additive_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), causal=True)
    assert mask.shape == (2, 1, 4, 4)
    visible_0 = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool
    )  # key ≤ query and key is real
    visible_1 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for got, visible in ((mask[0, 0], visible_0), (mask[1, 0], visible_1)):
        assert torch.equal(got == 0, visible)
        assert torch.equal(got == NEG, ~visible)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_additive_mask_uses_dtype_minimum(dtype: torch.dtype) -> None:
    mask = additive_mask(torch.tensor([[1, 0]]), causal=False, dtype=dtype)
    assert mask.dtype == dtype
    assert mask[0, 0, 0, 1].item() == torch.finfo(dtype).min
    assert mask[0, 0, 0, 0].item() == 0.0


# --- recompute_attention ---------------------------------------------------------------------------------


def test_recompute_matches_textbook_formula_per_head() -> None:
    """softmax(Q·Kᵀ/√d)·V written out head by head with explicit loops, on one unpadded sequence."""
    weights = random_weights()
    x = torch.randn(1, 4, 6)
    rec = recompute_attention(x, weights, additive_mask(torch.ones(1, 4, dtype=torch.long), causal=False))
    for h in range(weights.n_heads):
        q = x[0] @ weights.W_Q[h] + weights.b_Q[h]  # [pos, d_head]
        k = x[0] @ weights.W_K[h] + weights.b_K[h]
        v = x[0] @ weights.W_V[h] + weights.b_V[h]
        scores = torch.empty(4, 4)
        for i in range(4):
            for j in range(4):
                scores[i, j] = float(q[i] @ k[j]) / math.sqrt(weights.d_head)
        pattern = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
        torch.testing.assert_close(rec.attn_scores[0, h], scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.pattern[0, h], pattern, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec.z[0, :, h], pattern @ v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.v[0, h], v)


def test_recompute_shapes() -> None:
    weights = random_weights(n_heads=3, d_model=6, d_head=2)
    x = torch.randn(2, 5, 6)
    rec = recompute_attention(x, weights, additive_mask(torch.ones(2, 5, dtype=torch.long), causal=False))
    assert rec.q.shape == rec.k.shape == rec.v.shape == (2, 3, 5, 2)
    assert rec.attn_scores.shape == rec.pattern.shape == (2, 3, 5, 5)
    assert rec.z.shape == (2, 5, 3, 2)


def test_scale_is_applied() -> None:
    weights = random_weights(scale=1.0)
    half = dataclasses.replace(weights, scale=0.5)
    x = torch.randn(1, 3, 6)
    mask = additive_mask(torch.ones(1, 3, dtype=torch.long), causal=False)
    full_scores = recompute_attention(x, weights, mask).attn_scores
    half_scores = recompute_attention(x, half, mask).attn_scores
    torch.testing.assert_close(half_scores, 0.5 * full_scores)


@pytest.mark.parametrize("causal", [False, True])
def test_pattern_rows_sum_to_one(causal: bool) -> None:
    weights = random_weights(causal=causal)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rec = recompute_attention(torch.randn(2, 5, 6) * 3, weights, additive_mask(attention_mask, causal))
    sums = rec.pattern.sum(dim=-1)  # [batch, head, query]
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (rec.pattern >= 0).all()


def test_causal_upper_triangle_is_exactly_zero() -> None:
    weights = random_weights(causal=True)
    n = 6
    rec = recompute_attention(
        torch.randn(2, n, 6) * 0.3, weights, additive_mask(torch.ones(2, n, dtype=torch.long), True)
    )
    upper = torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(rec.pattern[..., upper] == 0.0)
    assert torch.all(rec.pattern[..., ~upper] > 0.0)
    # The first token can only see itself.
    assert torch.all(rec.pattern[:, :, 0, 0] == 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_get_exactly_zero_weight(causal: bool) -> None:
    weights = random_weights(causal=causal)
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    rec = recompute_attention(torch.randn(2, 5, 6) * 3, weights, additive_mask(attention_mask, causal))
    padded_key = ~attention_mask.bool()[:, None, None, :].expand_as(rec.pattern)
    assert torch.all(rec.pattern[padded_key] == 0.0)


def test_padding_does_not_change_real_tokens() -> None:
    """The same sequence alone and right-padded in a batch gives the same pattern and z on its real tokens."""
    weights = random_weights()
    x = torch.randn(1, 3, 6)
    alone = recompute_attention(x, weights, additive_mask(torch.ones(1, 3, dtype=torch.long), causal=False))
    padded_x = torch.cat([x, torch.randn(1, 2, 6) * 100], dim=1)  # garbage in the pad positions
    padded = recompute_attention(padded_x, weights, additive_mask(torch.tensor([[1, 1, 1, 0, 0]]), causal=False))
    torch.testing.assert_close(padded.pattern[:, :, :3, :3], alone.pattern)
    torch.testing.assert_close(padded.z[:, :3], alone.z)


# --- value_vectors_out -----------------------------------------------------------------------------------


def test_value_vectors_out_per_head_per_key() -> None:
    weights = random_weights(n_heads=2, d_model=6, d_head=3)
    v = torch.randn(2, 2, 4, 3)  # [batch, head, key, d_head]
    f = value_vectors_out(v, weights)
    assert f.shape == (2, 2, 4, 6)
    for b in range(2):
        for h in range(2):
            for j in range(4):
                torch.testing.assert_close(f[b, h, j], v[b, h, j] @ weights.W_O[h])


def test_heads_mixed_by_w_o_rebuild_the_concatenated_projection() -> None:
    """Σ_h z_h·W_O_h equals concat_h(z_h)·W_O_full: the per-head split of W_O loses nothing."""
    weights = random_weights(n_heads=2, d_model=6, d_head=3)
    x = torch.randn(1, 4, 6)
    rec = recompute_attention(x, weights, additive_mask(torch.ones(1, 4, dtype=torch.long), causal=False))
    full_W_O = weights.W_O.reshape(2 * 3, 6)  # [head·d_head, d_model]
    concatenated = rec.z.reshape(1, 4, 6) @ full_W_O  # [batch, pos, d_model]
    per_head = torch.einsum("bhqk,bhkm->bqm", rec.pattern, value_vectors_out(rec.v, weights))
    torch.testing.assert_close(per_head, concatenated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_scaling_the_query_first_changes_only_rounding(causal: bool) -> None:
    """attention_pattern's default runs Hugging Face's eager order (Q·Kᵀ, then the scale, then the mask) bit for
    bit; `scale_query` (the probed batches' pattern) scales q first and differs only in float rounding."""
    from extractor.core.recompute import attention_pattern

    weights = random_weights(n_heads=4, d_head=32)  # scale 1/√32: not a power of two, so the orders round apart
    q, k = torch.randn(3, 4, 40, 32), torch.randn(3, 4, 40, 32)
    mask = additive_mask(torch.tensor([[1] * 40, [1] * 33 + [0] * 7, [1] * 12 + [0] * 28]), causal)
    scores, pattern = attention_pattern(q, k, weights, mask)
    eager = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * weights.scale + mask, dim=-1)
    assert torch.equal(pattern, eager)
    quick_scores, quick = attention_pattern(q, k, weights, mask, scale_query=True)
    assert not torch.equal(quick_scores, scores)  # another order of operations ...
    torch.testing.assert_close(quick, pattern, rtol=0, atol=1e-6)  # ... the same pattern up to rounding
    torch.testing.assert_close(quick.sum(dim=-1), torch.ones(3, 4, 40), rtol=0, atol=1e-5)
