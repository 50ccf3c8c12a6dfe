"""`layer_value_norm`: ‖Σ_h α_hij · f_h(x_j)‖ per layer (head = -1): what key j adds to query i's attention
output in this layer, all heads together (Kobayashi et al., 2020, summed over heads before the norm)."""

from __future__ import annotations

import torch

from extractor.attribution.registry import LayerInputs
from extractor.core.recompute import value_vectors_out


def layer_value_norm(pattern: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """‖Σ_h α_hij f_h(x_j)‖ without materialising [batch, query, key, d_model].

    Uses the per-key Gram matrix G_j[h, g] = ⟨f_h(x_j), f_g(x_j)⟩, so
    ‖Σ_h α_hij f_h(x_j)‖² = Σ_h Σ_g α_hij α_gij G_j[h, g].
    pattern [batch, head, query, key], f [batch, head, key, d_model] → [batch, query, key].
    """
    batch, n_heads, n_keys, d_model = f.shape
    f_by_key = f.permute(0, 2, 1, 3).reshape(batch * n_keys, n_heads, d_model)  # [batch·key, head, d_model]
    gram = torch.bmm(f_by_key, f_by_key.transpose(1, 2)).view(batch, n_keys, n_heads, n_heads)  # [batch, key, head, head]
    alpha = pattern.permute(0, 3, 2, 1)  # [batch, key, query, head]
    weighted = torch.matmul(alpha, gram)  # [batch, key, query, head]
    squared = (weighted * alpha).sum(dim=-1)  # [batch, key, query]
    return squared.clamp_min(0).sqrt().transpose(1, 2)  # [batch, query, key]


def layer_value_norm_of_layer(inputs: LayerInputs) -> torch.Tensor:
    assert inputs.v is not None, "layer_value_norm needs V (needs_values)"
    return layer_value_norm(inputs.pattern, value_vectors_out(inputs.v, inputs.weights))  # [batch, query, key]
