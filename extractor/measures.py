"""Association measures: how strongly query token i is associated with key token j.

- `attention`:        α_hij, the softmax pattern A of head h.
- `value_norm`:       ‖α_hij · f_h(x_j)‖ with f_h(x) = (x·W_V + b_V)·W_O (Kobayashi et al., 2020).
                      α is a non-negative scalar, so this is α_hij · ‖f_h(x_j)‖.
- `layer_value_norm`: ‖Σ_h α_hij · f_h(x_j)‖ per layer (head = -1).
- `rollout`:          Abnar & Zuidema (2020): Ã_l = 0.5·mean_h(A_l) + 0.5·I (rows renormalised),
                      R_0 = Ã_0, R_l = Ã_l · R_{l-1} (head = -1).
"""

from __future__ import annotations

import torch

HEAD_MEASURES = ("attention", "value_norm")
LAYER_MEASURES = ("layer_value_norm", "rollout")
MEASURES = HEAD_MEASURES + LAYER_MEASURES
# `extractor run`'s default: layer_value_norm needs every head's f_h(x_j) in d_model and a per-key Gram
# matrix, which costs about as much as the forward pass itself; ask for it when you need it.
RUN_MEASURES = ("attention", "value_norm", "rollout")


def row_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """[..., query, key] → [..., query]: −Σ_j A_ij ln A_ij in nats (0 ln 0 = 0).

    ln is taken of max(A, 1e-38): exact at A = 0 (0 · ln 1e-38 = 0), below 1e-36 apart otherwise, and a third
    faster than `xlogy` on CPU (one temporary, then in place).
    """
    return -pattern.clamp_min(1e-38).log_().mul_(pattern).sum(dim=-1)


def value_norm(pattern: torch.Tensor, f_norm: torch.Tensor) -> torch.Tensor:
    """pattern [batch, head, query, key], f_norm = ‖f_h(x_j)‖ [batch, head, key] → [batch, head, query, key]."""
    return pattern * f_norm[:, :, None, :]


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


def rollout(patterns: list[torch.Tensor]) -> list[torch.Tensor]:
    """Attention rollout after each layer. patterns: per layer [batch, head, query, key] → per layer [batch, query, key]."""
    results: list[torch.Tensor] = []
    rolled: torch.Tensor | None = None
    for pattern in patterns:
        n = pattern.shape[-1]
        eye = torch.eye(n, dtype=pattern.dtype, device=pattern.device)
        mixed = 0.5 * pattern.mean(dim=1) + 0.5 * eye  # [batch, query, key]
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rolled = mixed if rolled is None else torch.matmul(mixed, rolled)
        results.append(rolled)
    return results
