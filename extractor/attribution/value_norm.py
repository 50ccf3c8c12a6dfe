"""`value_norm` (Kobayashi et al., 2020): ‖α_hij · f_h(x_j)‖ with f_h(x) = (x·W_V + b_V)·W_O^h.

α is a non-negative scalar, so this is α_hij · ‖f_h(x_j)‖: a large weight on a key whose transformed value
vector is tiny contributes little. With grouped-query attention, f uses the query head's W_O slice and its
group's V.
"""

from __future__ import annotations

import torch

from extractor.attribution.registry import LayerInputs
from extractor.core.recompute import value_vector_norms


def value_norm(pattern: torch.Tensor, f_norm: torch.Tensor) -> torch.Tensor:
    """pattern [batch, head, query, key], f_norm = ‖f_h(x_j)‖ [batch, head, key] → [batch, head, query, key]."""
    return pattern * f_norm[:, :, None, :]


def value_norm_of_layer(inputs: LayerInputs) -> torch.Tensor:
    assert inputs.v is not None, "value_norm needs V (needs_values)"
    return value_norm(inputs.pattern, value_vector_norms(inputs.v, inputs.weights))  # [batch, head, query, key]
