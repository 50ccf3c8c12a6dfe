"""The compiled pairwise Jensen–Shannon sums and their logarithm against the torch path and float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from extractor.heads import float32_math, js_kernel
from extractor.heads.similarity import js_divergence_sums


def test_numba_kernels_are_available() -> None:
    """numba is a dependency: without it the head similarity silently takes the slower torch path."""
    assert js_kernel.HAVE_NUMBA


def test_log32_matches_the_logarithm_to_float32_precision() -> None:
    """Every exponent of a normal float32 and random mantissas: relative error ≤ 3e-7 against float64's ln."""
    from numba import njit

    @njit
    def logs(values, out):  # noqa: ANN001, ANN202
        for i in range(values.shape[0]):
            out[i] = float32_math.log32(values[i])

    rng = np.random.default_rng(0)
    mantissa = rng.uniform(1.0, 2.0, 200_000)
    exponent = rng.integers(-126, 128, 200_000)
    values = np.concatenate([(mantissa * 2.0 ** exponent).astype(np.float32),
                             np.float32([np.finfo(np.float32).tiny, 1.0, 0.5, 2.0, math.sqrt(0.5), math.sqrt(2.0), 3.4e38])])
    out = np.empty_like(values)
    logs(values, out)
    exact = np.log(values.astype(np.float64))
    error = np.abs(out - exact) / np.maximum(np.abs(exact), 1.0)  # relative, or absolute near ln x = 0
    assert error.max() <= 3e-7, (values[error.argmax()], out[error.argmax()], exact[error.argmax()])
    assert out[values == 1.0][0] == 0.0


def patterns(n_heads: int, n_rows: int, n_keys: int, causal: bool, seed: int = 0) -> torch.Tensor:
    """[head, row, key] softmax rows with padded keys (0 in every head), and for causal rows keys after the query."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_heads, n_rows, n_keys, generator=generator) * 3
    visible = torch.ones(n_rows, n_keys, dtype=torch.bool)
    visible[:, n_keys - 5:] = False  # padding
    if causal:
        visible &= torch.ones(n_rows, n_keys, dtype=torch.bool).tril()
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_js_kernel_equals_the_torch_path(causal: bool) -> None:
    p = patterns(9, 40, 37, causal)
    p[3] = p[1]  # identical heads: exactly 0
    compiled = js_divergence_sums(p, use_numba=True)
    reference = js_divergence_sums(p, use_numba=False)
    torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-6)
    assert compiled[1, 3] == 0.0 and compiled[3, 1] == 0.0 and (compiled.diagonal() == 0).all()
    torch.testing.assert_close(compiled, compiled.T, rtol=0, atol=0)
    assert (compiled[~torch.eye(9, dtype=torch.bool)].sum() > 1.0)  # not vacuous: the heads differ


def test_js_kernel_against_float64_by_hand() -> None:
    """One pair of rows by the definition, in float64: JS(p, q) = H(m) − ½H(p) − ½H(q), in bits."""
    p = patterns(2, 3, 11, causal=False, seed=1)
    compiled = js_divergence_sums(p, use_numba=True)

    def entropy(row: torch.Tensor) -> float:
        row = row.double()
        return float(-(row[row > 0] * row[row > 0].log()).sum())

    expected = sum(entropy((p[0, r] + p[1, r]) / 2) - entropy(p[0, r]) / 2 - entropy(p[1, r]) / 2 for r in range(3))
    assert compiled[0, 1].item() == pytest.approx(expected / math.log(2), abs=1e-6)
