"""The only code that knows the maths of self-attention. One pure function serves every model family.

    attn_scores = (X·W_Q + b_Q)·(X·W_K + b_K)ᵀ · scale + mask      [batch, head, query_pos, key_pos]
    pattern     = softmax(attn_scores, over key_pos)                [batch, head, query_pos, key_pos]
    z           = pattern · (X·W_V + b_V)                           [batch, query_pos, head, d_head]

The mask is additive, as in Hugging Face's eager attention: 0 where a key may be seen and
`torch.finfo(dtype).min` where it may not (padding; keys after the query in causal models; keys before a
sliding window).

Rotary decoders (Llama, Mistral, Qwen2/3, GPT-NeoX) add three steps before the scores, in Hugging Face's order:
per-head RMSNorm of q and k (Qwen3 only), rotation of the leading `rotary_dims` of q and k by the cos/sin the
model handed its attention module, and, with grouped-query attention, each key/value head repeated for its
group of query heads (`repeat_kv`). From there on every family is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from extractor.core.adapters.base import AttentionWeights


@dataclass(frozen=True)
class AttentionRecompute:
    """Everything one attention layer computes, rebuilt from its weights."""

    q: torch.Tensor  # [batch, head, query_pos, d_head], after q_norm and rotation
    k: torch.Tensor  # [batch, head, key_pos, d_head], after k_norm and rotation, repeated per query head
    v: torch.Tensor  # [batch, head, key_pos, d_head], repeated per query head (grouped-query attention)
    attn_scores: torch.Tensor  # [batch, head, query_pos, key_pos], scaled and masked, before softmax
    pattern: torch.Tensor  # [batch, head, query_pos, key_pos], softmax of attn_scores
    z: torch.Tensor  # [batch, query_pos, head, d_head], pattern · v


def additive_mask(
    attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype = torch.float32, window: int | None = None
) -> torch.Tensor:
    """Build the additive mask from the tokenizer's `attention_mask` ([batch, pos], 1 = real token).

    window: a sliding window (causal models): a query also loses every key more than window - 1 before it.
    Returns [batch, 1, query_pos, key_pos]: 0 where the key is visible, `finfo(dtype).min` where it is not.
    """
    batch, n = attention_mask.shape
    visible = attention_mask.bool()[:, None, None, :].expand(batch, 1, n, n)  # [batch, 1, query, key]
    if causal:
        lower = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()  # key ≤ query
        visible = visible & lower
    if window is not None:
        recent = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).triu(1 - window)  # key > q - window
        visible = visible & recent
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def visible_keys(lengths: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    """Which keys each row of a padded batch sees, from document lengths: [batch, query], keys [0, limit).

    The limit is n_b for a real row of a document of n_b tokens (q + 1 if causal), 0 for a padding row; the
    same visibility `additive_mask` encodes, as a count per row. lengths: [batch]. A sliding window also
    hides keys before `first_visible_key` (`visible_range` gives both).
    """
    position = torch.arange(n, device=lengths.device)
    limit = lengths[:, None].expand(-1, n)
    if causal:
        limit = torch.minimum(limit, position[None, :] + 1)
    return limit.masked_fill(position[None, :] >= lengths[:, None], 0)


def first_visible_key(n: int, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[query]: the first key each query sees, max(0, q - window + 1) under a sliding window, else 0.

    With `visible_keys`, a real row sees keys [first_visible_key, limit): the visibility `additive_mask` encodes.
    """
    position = torch.arange(n, device=device)
    if window is None:
        return torch.zeros_like(position)
    return (position - window + 1).clamp_min(0)


def reach_window(windows: Sequence[int | None]) -> int | None:
    """The sliding window of a product of these layers' patterns (a measure rolled out through them): each layer
    moves a row at most window − 1 keys back, so 1 + Σ (window − 1); None (full attention) if any layer has none."""
    reach = 1
    for window in windows:
        if window is None:
            return None
        reach += window - 1
    return reach if windows else None


def visible_range(
    lengths: torch.Tensor, n: int, causal: bool, window: int | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Which keys each row of a padded batch sees: keys [first, limit), the visibility `additive_mask` encodes.

    lengths: [batch]. Returns first [query] (`first_visible_key`; None without a window, so that full-attention
    callers skip the comparison) and limit [batch, query] (`visible_keys`).
    """
    first = None if window is None else first_visible_key(n, window, lengths.device)
    return first, visible_keys(lengths, n, causal)


def visible_cells(first: torch.Tensor | None, limit: torch.Tensor) -> torch.Tensor:
    """[batch, query, key] bool: key j is visible to row i, from `visible_range`'s first [query] (None: key 0)
    and limit [batch, query] (queries and keys are the same positions)."""
    key = torch.arange(limit.shape[-1], device=limit.device)
    visible = key < limit[..., None]  # [batch, query, key]
    return visible if first is None else visible & (key >= first.to(limit.device)[:, None])


def mask_if_needed(
    attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype = torch.float32, window: int | None = None
) -> torch.Tensor | None:
    """`additive_mask`, or None when it would hide nothing (no padding, not causal): adding zeros changes no
    value, and skipping it saves a pass over every [batch, head, query, key] score tensor."""
    if not causal and window is None and bool(attention_mask.bool().all()):
        return None
    return additive_mask(attention_mask, causal, dtype, window)


def layer_masks(
    attention_mask: torch.Tensor, causal: bool, windows: list[int | None], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor | None]:
    """Per layer, `mask_if_needed` for that layer's sliding window (None: full attention); one mask per window."""
    by_window = {window: mask_if_needed(attention_mask, causal, dtype, window) for window in dict.fromkeys(windows)}
    return [by_window[window] for window in windows]


def project(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head projection: x [batch, pos, d_model], W [head, d_model, d_head], b [head, d_head] → [batch, head, pos, d_head].

    One [d_model, head·d_head] matmul for all heads (much faster than a per-head einsum on CPU).
    """
    n_heads, d_model, d_head = W.shape
    fused = W.permute(1, 0, 2).reshape(d_model, n_heads * d_head)  # [d_model, head·d_head]
    out = torch.addmm(b.reshape(-1), x.reshape(-1, d_model), fused)  # [batch·pos, head·d_head]
    return out.view(*x.shape[:-1], n_heads, d_head).transpose(1, 2)


def head_rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over d_head, as Hugging Face's (Qwen3RMSNorm): in float32, cast back, then the gain.

    x: [batch, head, pos, d_head], gain: [d_head] → [batch, head, pos, d_head].
    """
    x32 = x.float()  # [batch, head, pos, d_head]
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # [batch, head, pos, d_head]
    return gain * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of the leading cos.shape[-1] dims of each head; the rest passes unchanged.

    x: [batch, head, pos, d_head]; cos, sin: [batch or 1, pos, rotary_dims], as the model handed them to its
    attention module. Dim i is paired with dim i + rotary_dims/2 (Hugging Face's `rotate_half`).
    """
    dims = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [batch or 1, 1, pos, rotary_dims]
    turned, kept = x[..., :dims], x[..., dims:]  # [batch, head, pos, rotary_dims], [..., d_head - rotary_dims]
    half = dims // 2
    rotated_half = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)  # [batch, head, pos, rotary_dims]
    rotated = turned * cos + rotated_half * sin  # [batch, head, pos, rotary_dims]
    return torch.cat((rotated, kept), dim=-1) if kept.shape[-1] else rotated


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of `rotate` (the rotation by −θ): x [batch, head, pos, d_head] → [batch, head, pos, d_head]."""
    return rotate(x, cos, -sin)


def per_query_head(kv: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """Grouped-query attention: kv [batch, kv_head, pos, d_head] → [batch, head, pos, d_head], each key/value
    head repeated for its group of consecutive query heads (Hugging Face's `repeat_kv`)."""
    group = weights.n_heads // weights.n_kv_heads
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def project_values(x: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """V per query head: x [batch, pos, d_model] → [batch, head, key_pos, d_head] (GQA groups share theirs)."""
    return per_query_head(project(x, weights.W_V, weights.b_V), weights)


PositionEmbeddings = tuple[torch.Tensor, torch.Tensor]  # (cos, sin): [batch or 1, pos, rotary_dims] each


def recompute_attention(
    x: torch.Tensor,
    weights: AttentionWeights,
    mask: torch.Tensor | None,
    position_embeddings: PositionEmbeddings | None = None,
) -> AttentionRecompute:
    """Rebuild one layer's attention from its input hidden states.

    x: [batch, pos, d_model], the hidden states the attention module received (after any pre-LayerNorm).
    mask: [batch, 1, query_pos, key_pos], from `additive_mask`, or None when no key is hidden.
    position_embeddings: rotary models only, the (cos, sin) the model handed this attention module.
    """
    q = project(x, weights.W_Q, weights.b_Q)  # [batch, head, query_pos, d_head]
    k = project(x, weights.W_K, weights.b_K)  # [batch, kv_head, key_pos, d_head]
    v = project_values(x, weights)  # [batch, head, key_pos, d_head]
    if weights.q_norm is not None:
        q = head_rms_norm(q, weights.q_norm, weights.norm_eps)  # [batch, head, query_pos, d_head]
    if weights.k_norm is not None:
        k = head_rms_norm(k, weights.k_norm, weights.norm_eps)  # [batch, kv_head, key_pos, d_head]
    if weights.rotary_dims:
        assert position_embeddings is not None, "rotary weights need the captured position_embeddings"
        cos, sin = position_embeddings
        assert cos.shape[-1] == weights.rotary_dims, f"cos has {cos.shape[-1]} dims, adapter says {weights.rotary_dims}"
        q = rotate(q, cos, sin)  # [batch, head, query_pos, d_head]
        k = rotate(k, cos, sin)  # [batch, kv_head, key_pos, d_head]
    k = per_query_head(k, weights)  # [batch, head, key_pos, d_head]
    attn_scores, pattern = attention_pattern(q, k, weights, mask)
    z = torch.matmul(pattern, v).transpose(1, 2)  # [batch, query_pos, head, d_head]
    return AttentionRecompute(q=q, k=k, v=v, attn_scores=attn_scores, pattern=pattern, z=z)


def attention_pattern(
    q: torch.Tensor, k: torch.Tensor, weights: AttentionWeights, mask: torch.Tensor | None,
    scale_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_scores, pattern) from q [batch, head, query_pos, d_head] and k [batch, head or kv_head, key_pos,
    d_head] (repeated per query head here if it is not yet): each [batch, head, query_pos, key_pos].

    The one place the scores and the softmax are computed: from the recomputed q and k, or from the q and k the
    model handed its attention kernel (`sdpa_capture`). By default in Hugging Face's eager order, Q·Kᵀ then the
    scale, so that the comparison with its `output_attentions` can come out exactly 0. `scale_query`: q is
    scaled before the product instead, a pass over [batch, head, query, d_head] rather than over the scores
    (a 512-token layer of MiniLM: 7.4 instead of 11.3 ms); the scores then differ from the eager order's in
    float rounding (≈1e-7), for the pattern a probed batch computes once and checks against the sdpa kernel's z.
    """
    k = per_query_head(k, weights) if k.shape[1] != q.shape[1] else k  # [batch, head, key_pos, d_head]
    if scale_query:
        attn_scores = torch.matmul(q * weights.scale, k.transpose(-1, -2))  # [batch, head, query, key]
    else:
        # In place: the same values as Hugging Face's `matmul(q, kᵀ) * scale + mask`, without two more temporaries.
        attn_scores = torch.matmul(q, k.transpose(-1, -2)).mul_(weights.scale)  # [batch, head, query, key]
    if mask is not None:
        attn_scores.add_(mask)
    return attn_scores, torch.softmax(attn_scores, dim=-1)


def value_vectors_out(v: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """f_h(x_j) = (x_j·W_V + b_V)·W_O for every head and key: v [batch, head, key_pos, d_head] → [batch, head, key_pos, d_model].

    Kobayashi et al. (2020): what each key contributes to the layer's output, before the attention weight.
    """
    batch, n_heads, n_keys, d_head = v.shape
    by_head = v.transpose(0, 1).reshape(n_heads, batch * n_keys, d_head)  # [head, batch·key, d_head]
    f = torch.bmm(by_head, weights.W_O)  # [head, batch·key, d_model]: one large matmul per head
    return f.view(n_heads, batch, n_keys, -1).transpose(0, 1)  # [batch, head, key, d_model]


def value_vector_norms(v: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """‖f_h(x_j)‖ = √(v_jh·(W_O^h W_O^hᵀ)·v_jh) without building f: v [batch, head, key, d_head] → [batch, head, key].

    The per-head Gram matrix W_O^h W_O^hᵀ is [d_head, d_head], so this costs d_head² per key and head instead
    of d_head·d_model.
    """
    gram = torch.matmul(weights.W_O, weights.W_O.transpose(1, 2))  # [head, d_head, d_head]
    squared = (torch.matmul(v, gram[None]) * v).sum(dim=-1)  # [batch, head, key]
    return squared.clamp_min(0).sqrt()


def attention_output(pattern: torch.Tensor, f: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """Σ_h Σ_j α_hij · f_h(x_j) + b_O: the output projection as the model computes it, before residual.

    pattern [batch, head, query_pos, key_pos], f [batch, head, key_pos, d_model] → [batch, query_pos, d_model].
    """
    return torch.einsum("bhqk,bhkm->bqm", pattern, f) + weights.b_O
