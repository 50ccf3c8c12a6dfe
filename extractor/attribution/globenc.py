"""GlobEnc (Modarressi, Fayyaz, Yaghoobzadeh & Pilehvar, NAACL 2022): the norm of each source token's share
of the whole encoder layer's output, the FFN excepted.

Per layer (post-LayerNorm encoders), with T_i(x_j) = L1_i(z_ij) from `decompose` (the attention block +
residual through the attention LayerNorm's linear part) and L2_i(u) = γ2 ⊙ (u − mean(u)) / σ2_i the output
LayerNorm's linear part, σ2_i = √(Var(FFN(y_i) + y_i) + ε2) the model's own:

    N_l[i, j] = ‖L2_i(T_i(x_j))‖₂

The FFN output, b_O, β1 and β2 are assigned to no token (the authors' `BertLayer` modification does the same:
the FFN is bypassed, only its LayerNorm's scaling is applied). Across layers (authors' `AttentionRollout`):
R_0 = N_0, R_l = N_l · R_{l−1}, on the raw norms and without an identity, since the residual is inside N.
Stored rows are then normalised to sum 1 (`rollout.chain`), which leaves each row's ranking unchanged.
"""

from __future__ import annotations

import torch

from extractor.attribution.decompose import (
    NormParams,
    attention_block_input,
    attention_block_vectors,
    linear_norm,
    norm_scale,
    query_blocks,
)


def globenc_layer(
    pattern: torch.Tensor,
    f: torch.Tensor,
    x: torch.Tensor,
    b_O: torch.Tensor,
    attention_norm: NormParams,
    output_norm: NormParams,
    output_norm_input: torch.Tensor,
    visible: torch.Tensor,
) -> torch.Tensor:
    """One layer's N_l (unnormalised norms).

    pattern [batch, head, query, key], f [batch, head, key, d_model], x the layer's input [batch, pos, d_model],
    b_O [d_model], output_norm_input: the output LayerNorm's real input FFN(y) + y [batch, query, d_model],
    visible [batch, query, key] (bool) → [batch, query, key]; 0 on hidden keys and padded rows.
    """
    batch, _, n_queries, n_keys = pattern.shape
    sigma1 = norm_scale(attention_block_input(pattern, f, x, b_O), attention_norm.eps)  # [batch, query]
    sigma2 = norm_scale(output_norm_input, output_norm.eps)  # [batch, query]
    norms = torch.empty(batch, n_keys, n_queries, dtype=pattern.dtype, device=pattern.device)  # [batch, key, query]
    for queries in query_blocks(batch, n_keys, n_queries, x.shape[-1]):
        T = attention_block_vectors(pattern, f, x, attention_norm, sigma1, queries)  # [batch, key, block, d_model]
        norms[:, :, queries] = linear_norm(T, output_norm.gamma, sigma2[:, queries]).norm(dim=-1)  # [batch, key, block]
    return norms.transpose(1, 2) * visible  # [batch, query, key]
