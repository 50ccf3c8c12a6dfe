"""ALTI, Aggregation of Layer-wise Token-to-token Interactions (Ferrando, Gállego & Costa-jussà, EMNLP 2022).

Per layer (post-LayerNorm encoders), with T_i(x_j) from `decompose` and y_i = LN(pre_i) the attention
LayerNorm's real output (biases b_O and β included in y_i, assigned to no source token):

    c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁),    C_l[i, j] = c_ij / Σ_k c_ik

(Manhattan distance; the authors' code `normalize_contributions(..., 'min_sum', resultant_norm=‖y‖₁)`). Across
layers, `rollout.chain`: R_0 = C_0, R_l = C_l · R_{l−1}. Only the attention block is decomposed; the FFN and
its LayerNorm are outside ALTI, as in the paper.
"""

from __future__ import annotations

import torch

from extractor.attribution.decompose import (
    NormParams,
    attention_block_input,
    attention_block_vectors,
    norm_scale,
    query_blocks,
)
from extractor.attribution.rollout import normalise_rows


def alti_layer(
    pattern: torch.Tensor,
    f: torch.Tensor,
    x: torch.Tensor,
    b_O: torch.Tensor,
    norm: NormParams,
    visible: torch.Tensor,
) -> torch.Tensor:
    """One layer's ALTI contributions C_l, rows normalised.

    pattern [batch, head, query, key], f = f_h(x_j) [batch, head, key, d_model], x the layer's input
    [batch, pos, d_model], b_O [d_model], norm: the LayerNorm after the attention block, visible [batch, query,
    key] (bool: keys each real row sees) → [batch, query, key]; 0 on hidden keys and padded rows.
    """
    batch, _, n_queries, n_keys = pattern.shape
    pre = attention_block_input(pattern, f, x, b_O)  # [batch, query, d_model]
    sigma = norm_scale(pre, norm.eps)  # [batch, query]
    y = (pre - pre.mean(dim=-1, keepdim=True)) * norm.gamma / sigma[..., None] + norm.beta  # [batch, query, d_model]
    y_l1 = y.abs().sum(dim=-1)  # [batch, query]
    scores = torch.empty(batch, n_keys, n_queries, dtype=pattern.dtype, device=pattern.device)  # [batch, key, query]
    for queries in query_blocks(batch, n_keys, n_queries, x.shape[-1]):
        T = attention_block_vectors(pattern, f, x, norm, sigma, queries)  # [batch, key, block, d_model]
        distance = (T - y[:, None, queries]).abs().sum(dim=-1)  # [batch, key, block]
        scores[:, :, queries] = (y_l1[:, None, queries] - distance).clamp_min(0)
    return normalise_rows(scores.transpose(1, 2) * visible)  # [batch, query, key]
