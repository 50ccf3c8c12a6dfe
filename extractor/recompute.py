"""The only code that knows the maths of self-attention. One pure function serves every model family.

    attn_scores = (X·W_Q + b_Q)·(X·W_K + b_K)ᵀ · scale + mask      [batch, head, query_pos, key_pos]
    pattern     = softmax(attn_scores, over key_pos)                [batch, head, query_pos, key_pos]
    z           = pattern · (X·W_V + b_V)                           [batch, query_pos, head, d_head]

The mask is additive, as in Hugging Face's eager attention: 0 where a key may be seen and
`torch.finfo(dtype).min` where it may not (padding; keys after the query in causal models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters.base import AttentionWeights


@dataclass(frozen=True)
class AttentionRecompute:
    """Everything one attention layer computes, rebuilt from its weights."""

    q: torch.Tensor  # [batch, head, query_pos, d_head]
    k: torch.Tensor  # [batch, head, key_pos, d_head]
    v: torch.Tensor  # [batch, head, key_pos, d_head]
    attn_scores: torch.Tensor  # [batch, head, query_pos, key_pos], scaled and masked, before softmax
    pattern: torch.Tensor  # [batch, head, query_pos, key_pos], softmax of attn_scores
    z: torch.Tensor  # [batch, query_pos, head, d_head], pattern · v


def additive_mask(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Build the additive mask from the tokenizer's `attention_mask` ([batch, pos], 1 = real token).

    Returns [batch, 1, query_pos, key_pos]: 0 where the key is visible, `finfo(dtype).min` where it is not.
    """
    batch, n = attention_mask.shape
    visible = attention_mask.bool()[:, None, None, :].expand(batch, 1, n, n)  # [batch, 1, query, key]
    if causal:
        lower = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()  # key ≤ query
        visible = visible & lower
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def visible_keys(lengths: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    """Which keys each row of a padded batch sees, from document lengths: [batch, query], keys [0, limit).

    The limit is n_b for a real row of a document of n_b tokens (q + 1 if causal), 0 for a padding row; the
    same visibility `additive_mask` encodes, as a count per row. lengths: [batch].
    """
    position = torch.arange(n, device=lengths.device)
    limit = lengths[:, None].expand(-1, n)
    if causal:
        limit = torch.minimum(limit, position[None, :] + 1)
    return limit.masked_fill(position[None, :] >= lengths[:, None], 0)


def mask_if_needed(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """`additive_mask`, or None when it would hide nothing (no padding, not causal): adding zeros changes no
    value, and skipping it saves a pass over every [batch, head, query, key] score tensor."""
    if not causal and bool(attention_mask.bool().all()):
        return None
    return additive_mask(attention_mask, causal, dtype)


def project(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head projection: x [batch, pos, d_model], W [head, d_model, d_head], b [head, d_head] → [batch, head, pos, d_head].

    One [d_model, head·d_head] matmul for all heads (much faster than a per-head einsum on CPU).
    """
    n_heads, d_model, d_head = W.shape
    fused = W.permute(1, 0, 2).reshape(d_model, n_heads * d_head)  # [d_model, head·d_head]
    out = torch.addmm(b.reshape(-1), x.reshape(-1, d_model), fused)  # [batch·pos, head·d_head]
    return out.view(*x.shape[:-1], n_heads, d_head).transpose(1, 2)


def recompute_attention(x: torch.Tensor, weights: AttentionWeights, mask: torch.Tensor | None) -> AttentionRecompute:
    """Rebuild one layer's attention from its input hidden states.

    x: [batch, pos, d_model], the hidden states the attention module received (after any pre-LayerNorm).
    mask: [batch, 1, query_pos, key_pos], from `additive_mask`, or None when no key is hidden.
    """
    q = project(x, weights.W_Q, weights.b_Q)  # [batch, head, query_pos, d_head]
    k = project(x, weights.W_K, weights.b_K)  # [batch, head, key_pos, d_head]
    v = project(x, weights.W_V, weights.b_V)  # [batch, head, key_pos, d_head]
    # In place: the same values as Hugging Face's `matmul(q, kᵀ) * scale + mask`, without two more temporaries.
    attn_scores = torch.matmul(q, k.transpose(-1, -2)).mul_(weights.scale)  # [batch, head, query, key]
    if mask is not None:
        attn_scores.add_(mask)
    pattern = torch.softmax(attn_scores, dim=-1)  # [batch, head, query_pos, key_pos]
    z = torch.matmul(pattern, v).transpose(1, 2)  # [batch, query_pos, head, d_head]
    return AttentionRecompute(q=q, k=k, v=v, attn_scores=attn_scores, pattern=pattern, z=z)


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
