"""Verification tolerances (max absolute error against Hugging Face), per dtype. Torch-free: the CLI and the
config read them without loading torch."""

from __future__ import annotations

DEFAULT_ATOL = 1e-5  # float32: recomputation and Hugging Face differ by rounding only (≈1e-7 on MiniLM)
BF16_ATOL = 2e-2  # bfloat16 keeps ~3 significant digits


def default_atol(dtype: str) -> float:
    """The verification tolerance that fits `dtype` when the user gives none."""
    return BF16_ATOL if dtype == "bfloat16" else DEFAULT_ATOL


# The randomized projection checks (`core.probes`) compare q, k, v with the weights relative to their size.
DEFAULT_RTOL = 1e-4  # float32: ≈1e-6 measured on MiniLM and SmolLM2; a 1.05× scaled projection is 5e-2
BF16_RTOL = 2e-2


def default_rtol(dtype: str) -> float:
    """The projection checks' relative tolerance that fits `dtype`."""
    return BF16_RTOL if dtype == "bfloat16" else DEFAULT_RTOL
