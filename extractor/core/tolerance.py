"""Verification tolerances (max absolute error against Hugging Face), per dtype. Torch-free: the CLI and the
config read them without loading torch."""

from __future__ import annotations

DEFAULT_ATOL = 1e-5  # float32: recomputation and Hugging Face differ by rounding only (≈1e-7 on MiniLM)
BF16_ATOL = 2e-2  # bfloat16 keeps ~3 significant digits


def default_atol(dtype: str) -> float:
    """The verification tolerance that fits `dtype` when the user gives none."""
    return BF16_ATOL if dtype == "bfloat16" else DEFAULT_ATOL
