"""A post-LayerNorm layer's attention block, split per source token (Kobayashi et al. 2021; Ferrando et al. 2022).

For query i, the attention block's sum before its LayerNorm is

    pre_i = Σ_j z_ij + b_O,     z_ij = Σ_h α_hij f_h(x_j) + δ_ij x_i          [batch, query, key, d_model]

with f_h(x_j) = (x_j W_V + b_V) W_O^h (b_V rides with its key, weighted by α), and the residual x_i assigned to
token i itself. LayerNorm is LN(u) = γ ⊙ (u − mean(u)) / σ(u) + β; with σ_i = √(Var(pre_i) + ε) fixed to the
value the model computes, its linear part L_i(u) = γ ⊙ (u − mean(u)) / σ_i is linear in u, so

    LN(pre_i) = Σ_j L_i(z_ij) + L_i(b_O) + β.

T_i(x_j) = L_i(z_ij) are the per-source vectors; L_i(b_O) + β belongs to no token. Tensors are laid out
[batch, key, query, d_model] while built, since every reduction is over d_model and the [batch, query, key]
result is one transpose away. Queries are taken in blocks so the 4-D tensor stays within BLOCK_ELEMENTS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

BLOCK_ELEMENTS = 1 << 22  # elements (16 MiB of float32) of one [batch, key, query-block, d_model] tensor


@dataclass(frozen=True)
class NormParams:
    """One LayerNorm's parameters: γ, β [d_model] and ε."""

    gamma: torch.Tensor  # [d_model]
    beta: torch.Tensor  # [d_model]
    eps: float

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> NormParams:
        assert norm.weight is not None and norm.bias is not None, "LayerNorm without affine parameters"
        return cls(gamma=norm.weight.detach(), beta=norm.bias.detach(), eps=float(norm.eps))


def norm_scale(pre: torch.Tensor, eps: float) -> torch.Tensor:
    """σ = √(Var(u) + ε) of each LayerNorm input, as the model computes it: pre [..., d_model] → [...]."""
    return (pre.var(dim=-1, unbiased=False) + eps).sqrt()


def linear_norm(u: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """L(u) = γ ⊙ (u − mean(u)) / σ: u [batch, key, query, d_model], sigma [batch, query] → same shape as u."""
    return (u - u.mean(dim=-1, keepdim=True)) * gamma / sigma[:, None, :, None]


def query_blocks(batch: int, n_keys: int, n_queries: int, d_model: int) -> Iterator[slice]:
    """Slices of queries such that [batch, key, block, d_model] holds at most BLOCK_ELEMENTS (one query at least)."""
    step = max(1, BLOCK_ELEMENTS // max(1, batch * n_keys * d_model))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def mixed_vectors(pattern: torch.Tensor, f: torch.Tensor, x: torch.Tensor, queries: slice) -> torch.Tensor:
    """z_ij = Σ_h α_hij f_h(x_j) + δ_ij x_i for the queries in `queries`.

    pattern [batch, head, query, key], f [batch, head, key, d_model], x [batch, pos, d_model] (the layer's input,
    which the residual adds) → [batch, key, query-block, d_model].
    """
    alpha = pattern[:, :, queries].permute(0, 3, 2, 1)  # [batch, key, block, head]
    z = torch.matmul(alpha, f.transpose(1, 2))  # [batch, key, block, d_model]
    rows = torch.arange(queries.start, queries.stop, device=x.device)  # [block]
    z[:, rows, rows - queries.start] += x[:, rows]  # the residual: x_i goes to key i of row i
    return z


def attention_block_vectors(
    pattern: torch.Tensor, f: torch.Tensor, x: torch.Tensor, norm: NormParams, sigma: torch.Tensor, queries: slice
) -> torch.Tensor:
    """T_i(x_j) = L_i(z_ij), the attention block + residual through the linear part of its LayerNorm.

    sigma [batch, query] (σ of the LayerNorm's real input) → [batch, key, query-block, d_model].
    """
    return linear_norm(mixed_vectors(pattern, f, x, queries), norm.gamma, sigma[:, queries])


def attention_block_input(pattern: torch.Tensor, f: torch.Tensor, x: torch.Tensor, b_O: torch.Tensor) -> torch.Tensor:
    """pre_i = Σ_h Σ_j α_hij f_h(x_j) + b_O + x_i, the attention LayerNorm's input: → [batch, query, d_model]."""
    return torch.einsum("bhqk,bhkm->bqm", pattern, f) + b_O + x
