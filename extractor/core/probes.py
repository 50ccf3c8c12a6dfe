"""Randomized checks (Freivalds) of what the sdpa kernel was handed and what it returned, at a fraction of the cost.

A product A·B = C is checked without recomputing it: for random unit vectors r, compare C·r with A·(B·r). If
C ≠ A·B, the two differ for almost every r (a Gaussian r is orthogonal to the error with probability 0), so a
wrong weight, a perturbed projection or a different mask shows up at once; only rounding is left to a tolerance.

- `projection_errors`: q, k, v as the kernel received them against the captured hidden states X and the
  weights: q·r against X·(W_Q·r) + b_Q·r, after undoing the rotation (rotary models). Per-head norms on q and
  k (Qwen3) are not linear: there the projection is recomputed in full and compared directly. Relative error
  max|Δ| / max|reference| per head; float32 rounding leaves ≈1e-6, the tolerance is 1e-4.
- `z_probe_errors`: the pattern the extractor computed (from those q and k, with its own mask, scale and
  softmax) against the z the kernel fed the output projection: z·r against pattern·(V·r), absolute, over real
  query rows. |Δz·r| ≤ ‖Δz‖ for unit r, so it is held to the same tolerance as z itself.
"""

from __future__ import annotations

import torch

from extractor.core.adapters.base import AttentionWeights
from extractor.core.recompute import PositionEmbeddings, head_rms_norm, per_query_head, project, unrotate

N_PROBES = 2  # random directions per head: one is enough in exact arithmetic; two guard against bad luck


def probe_vectors(n_heads: int, d_head: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[head, d_head, N_PROBES] unit-norm random directions (float64), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(n_heads, d_head, N_PROBES, generator=generator, dtype=torch.float64)
    return (r / r.norm(dim=1, keepdim=True)).to(device)


def _relative(got: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per head max|got − reference| / max|reference|: got, reference [batch, head, pos, probes] → [head]."""
    error = (got - reference).abs().amax(dim=(0, 2, 3))
    return (error / reference.abs().amax(dim=(0, 2, 3)).clamp_min(torch.finfo(torch.float32).tiny)).float()


def _probed(got: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """got [batch, head, pos, d_head] · r [head, d_head, probes] → [batch, head, pos, probes], in float32."""
    return torch.matmul(got.float(), r[None])


def _full_norm_projection(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, gain: torch.Tensor, eps: float,
                          got: torch.Tensor) -> torch.Tensor:
    """Relative error per head of `got` against head_rms_norm(x·W + b): the whole projection (norms are not linear)."""
    reference = head_rms_norm(project(x, W, b), gain, eps)  # [batch, head, pos, d_head]
    return _relative(got.double(), reference.double())


def projection_errors(
    x: torch.Tensor, weights: AttentionWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    position_embeddings: PositionEmbeddings | None, seed: int,
) -> torch.Tensor:
    """[head]: the worst relative error of q, k and v (as the kernel received them) against the weights.

    x: [batch, pos, d_model] the attention module's input; q: [batch, head, pos, d_head]; k, v: [batch,
    kv_head, pos, d_head]. A key/value head's error counts for every query head of its group. The references
    X·(W·r) + b·r of q, k and v come from one [batch·pos, d_model] × [d_model, (head + 2·kv_head)·probes]
    product; float32 rounding (≈1e-6 relative) stays far below the tolerance (1e-4).
    """
    if weights.rotary_dims:
        assert position_embeddings is not None, "rotary weights need the captured position_embeddings"
        cos, sin = position_embeddings
        q, k = unrotate(q, cos, sin), unrotate(k, cos, sin)  # [batch, head or kv_head, pos, d_head]
    r = probe_vectors(weights.n_heads, weights.d_head, seed, x.device).float()  # [head, d_head, probes]
    r_kv = r[:: weights.n_heads // weights.n_kv_heads]  # [kv_head, d_head, probes]
    # name → (W, b, per-head norm gain or None, the kernel's tensor, probes)
    projections = {"q": (weights.W_Q, weights.b_Q, weights.q_norm, q, r),
                   "k": (weights.W_K, weights.b_K, weights.k_norm, k, r_kv),
                   "v": (weights.W_V, weights.b_V, None, v, r_kv)}
    errors = {name: _full_norm_projection(x, W, b, gain, weights.norm_eps, got)  # not linear: in full
              for name, (W, b, gain, got, _) in projections.items() if gain is not None}
    probed = [(name, W, b, got, probes) for name, (W, b, gain, got, probes) in projections.items() if gain is None]
    d_model = x.shape[-1]
    fused = torch.cat([torch.bmm(W.float(), probes).permute(1, 0, 2).reshape(d_model, -1)
                       for _, W, _, _, probes in probed], dim=1)  # [d_model, Σ heads·probes]
    bias = torch.cat([torch.einsum("hd,hdp->hp", b.float(), probes).reshape(-1) for _, _, b, _, probes in probed])
    references = torch.addmm(bias, x.reshape(-1, d_model).float(), fused)  # [batch·pos, Σ heads·probes]
    start = 0
    for name, W, _, got, probes in probed:
        width = W.shape[0] * probes.shape[-1]
        reference = references[:, start : start + width].view(*x.shape[:-1], W.shape[0], -1).transpose(1, 2)
        errors[name] = _relative(_probed(got, probes), reference)  # [heads of this projection]
        start += width
    group = weights.n_heads // weights.n_kv_heads
    return torch.maximum(errors["q"], torch.maximum(errors["k"], errors["v"]).repeat_interleave(group))


def z_probe_errors(
    pattern: torch.Tensor, v: torch.Tensor, z: torch.Tensor, attention_mask: torch.Tensor,
    weights: AttentionWeights, seed: int,
) -> torch.Tensor:
    """[head]: max over real query rows of |(z − pattern·V)·r|, r random unit directions.

    pattern: [batch, head, query, key]; v: [batch, kv_head or head, key, d_head]; z: [batch, query, head,
    d_head] (what the output projection received); attention_mask: [batch, pos], 1 = real.
    """
    r = probe_vectors(weights.n_heads, weights.d_head, seed + 1, z.device).to(pattern.dtype)  # [head, d_head, probes]
    v = per_query_head(v, weights) if v.shape[1] != pattern.shape[1] else v  # [batch, head, key, d_head]
    ours = torch.matmul(pattern, torch.einsum("bhkd,hdp->bhkp", v, r))  # [batch, head, query, probes]
    theirs = torch.einsum("bqhd,hdp->bhqp", z.to(pattern.dtype), r)  # [batch, head, query, probes]
    diff = (ours.float() - theirs.float()).abs().amax(dim=-1)  # [batch, head, query]
    diff = diff.masked_fill(~attention_mask.bool()[:, None, :], 0.0)
    return diff.amax(dim=(0, 2))
