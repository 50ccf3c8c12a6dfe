"""Rollout: following contributions through layers by a product of per-layer matrices.

- `rollout` (Abnar & Zuidema, 2020): Ã_l = 0.5·mean_h(A_l) + 0.5·I (rows renormalised), R_0 = Ã_0,
  R_l = Ã_l · R_{l−1} (head = -1): the identity stands for the residual stream that attention ignores.
- `chain`: the same product for per-layer contribution matrices whose residual is already inside them (ALTI,
  GlobEnc: Ferrando et al. 2022 and Modarressi et al. 2022 aggregate this way, without the 0.5·I).
"""

from __future__ import annotations

import torch


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1; an all-zero row (padding) stays 0. [..., query, key] → same shape."""
    total = matrix.sum(dim=-1, keepdim=True)  # [..., query, 1]
    return torch.where(total > 0, matrix / total.clamp_min(torch.finfo(matrix.dtype).tiny), torch.zeros_like(matrix))


def chain(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer [batch, query, key] → per layer the rolled-out product, rows normalised to sum 1.

    The product is divided by one scalar per document (its largest entry) after each layer, so products of
    unnormalised matrices (GlobEnc's norms) stay inside float range over many layers. A scalar per document
    commutes with the next product, so the normalised rows are exactly those of the plain product.
    """
    results: list[torch.Tensor] = []
    rolled: torch.Tensor | None = None
    for matrix in matrices:
        rolled = matrix if rolled is None else torch.matmul(matrix, rolled)  # [batch, query, key]
        peak = rolled.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(rolled.dtype).tiny)  # [batch, 1, 1]
        rolled = rolled / peak
        results.append(normalise_rows(rolled))
    return results


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
