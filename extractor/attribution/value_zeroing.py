"""Value Zeroing (Mohebbi, Zuidema, Chrupała & Alishahi, EACL 2023), per layer.

For layer l and key j: set v_j (every head's value vector of token j, bias included) to 0, run the whole layer
again on its original input (attention, output projection, residual, LayerNorms, FFN), and score each query i by
the cosine distance between its original output x̃_i and its altered output x̃_i^¬j:

    d_ij = 1 − cos(x̃_i^¬j, x̃_i),    VZ_l[i, j] = d_ij / Σ_k d_ik

(the authors' `scoring/value_zeroing.py`: cosine distance, rows normalised; the stored measure is this
per-layer matrix, not its rollout). 1 − cos is computed as ½‖a/‖a‖ − b/‖b‖‖², equal in exact arithmetic but
not cancelling catastrophically when the distance is ~1e-9, where float32 `1 − cos` is rounding noise.
Keys are zeroed many at a time: each document is copied once per key in a chunk, and one batched call of the
layer runs them all (at most `token_budget` positions per call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from extractor.attribution.rollout import normalise_rows

DEFAULT_TOKEN_BUDGET = 1 << 14  # positions (copies × pos) per re-run of a layer


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − cos(a, b) = ½‖â − b̂‖² over the last dimension, in at least float32. [..., d] × [..., d] → [...]."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a_hat = torch.nn.functional.normalize(a.to(dtype), dim=-1)
    b_hat = torch.nn.functional.normalize(b.to(dtype), dim=-1)
    return 0.5 * (a_hat - b_hat).pow(2).sum(dim=-1)


def zeroing_distances(
    run: Callable[[torch.Tensor], torch.Tensor],
    original: torch.Tensor,
    n_keys: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> torch.Tensor:
    """d_ij for every query i and key j < n_keys.

    run: keep [batch, copies, pos] → the layer's outputs [batch, copies, pos, d_model] with value vectors zeroed
    where keep is 0 (a `replay.ZeroedValueLayer`); original: the layer's real output [batch, pos, d_model]
    → [batch, query, key].
    """
    batch, n, _ = original.shape
    distances = torch.zeros(batch, n, n_keys, dtype=torch.promote_types(original.dtype, torch.float32),
                            device=original.device)  # [batch, query, key]
    step = max(1, token_budget // max(1, batch * n))
    for start in range(0, n_keys, step):
        keys = torch.arange(start, min(start + step, n_keys), device=original.device)  # [copies]
        keep = torch.ones(batch, len(keys), n, device=original.device)  # [batch, copies, pos]
        keep[:, torch.arange(len(keys)), keys] = 0  # copy c zeroes key start + c
        altered = run(keep)  # [batch, copies, pos, d_model]
        distances[:, :, keys] = cosine_distance(altered, original[:, None]).transpose(1, 2)  # [batch, query, copies]
    return distances


def value_zeroing_scores(distances: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Rows normalised over the keys each row sees: distances, visible [batch, query, key] → [batch, query, key]."""
    return normalise_rows(distances * visible)
