"""Verification: the recomputed pattern and z against Hugging Face's own, per layer and head.

For every (layer, head): the max absolute error of the recomputed pattern against `output_attentions`,
and of the recomputed z against the z the model fed its output projection (captured by a hook), over
real (non-padded) query rows. A head passes when both errors are ≤ the tolerance (default 1e-5, float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import pandas as pd
import torch

from extractor.core.tolerance import DEFAULT_ATOL


class Mergeable(Protocol):
    def merge(self, other, /) -> None: ...  # noqa: ANN001


T = TypeVar("T", bound=Mergeable)


def layer_errors(
    hf_pattern: torch.Tensor, pattern: torch.Tensor, hf_z: torch.Tensor, z: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max abs errors per head over real query rows.

    hf_pattern, pattern: [batch, head, query, key]; hf_z, z: [batch, query, head, d_head];
    attention_mask: [batch, pos] (1 = real). Returns (pattern_err [head], z_err [head]).
    """
    n_heads = pattern.shape[1]
    if torch.equal(hf_pattern, pattern) and torch.equal(hf_z, z):  # one read of each: the usual case on CPU float32
        zero = torch.zeros(n_heads, dtype=torch.float32, device=pattern.device)
        return zero, zero.clone()
    real = attention_mask.bool()  # [batch, query]
    pattern_diff = torch.sub(hf_pattern.float(), pattern.float()).abs_().amax(dim=-1)  # [batch, head, query]
    pattern_diff = pattern_diff.masked_fill(~real[:, None, :], 0.0)
    z_diff = torch.sub(hf_z.float(), z.float()).abs_().amax(dim=-1)  # [batch, query, head]
    z_diff = z_diff.masked_fill(~real[:, :, None], 0.0)
    return pattern_diff.amax(dim=(0, 2)), z_diff.amax(dim=(0, 1))


def fold(total: T | None, part: T | None) -> T | None:
    """Running merge of optional accumulators (reports, head statistics): `part` into `total`, None-safe."""
    if total is None:
        return part
    if part is not None:
        total.merge(part)
    return total


@dataclass
class VerificationReport:
    """Running max of errors per (layer, head) over every verified batch."""

    n_layers: int
    n_heads: int
    atol: float = DEFAULT_ATOL
    pattern_err: torch.Tensor = field(init=False)  # [layer, head]
    z_err: torch.Tensor = field(init=False)  # [layer, head]
    n_docs: int = 0

    def __post_init__(self) -> None:
        self.pattern_err = torch.zeros(self.n_layers, self.n_heads)
        self.z_err = torch.zeros(self.n_layers, self.n_heads)

    def add(self, layer: int, pattern_err: torch.Tensor, z_err: torch.Tensor) -> None:
        self.pattern_err[layer] = torch.maximum(self.pattern_err[layer], pattern_err.cpu())
        self.z_err[layer] = torch.maximum(self.z_err[layer], z_err.cpu())

    def merge(self, other: VerificationReport) -> None:
        self.pattern_err = torch.maximum(self.pattern_err, other.pattern_err)
        self.z_err = torch.maximum(self.z_err, other.z_err)
        self.n_docs += other.n_docs

    @property
    def passed_mask(self) -> torch.Tensor:
        """[layer, head] True where both errors are within tolerance."""
        return (self.pattern_err <= self.atol) & (self.z_err <= self.atol)

    @property
    def passed(self) -> bool:
        return bool(self.passed_mask.all())

    def failing_heads(self) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in (~self.passed_mask).nonzero().tolist()]

    def table(self) -> pd.DataFrame:
        """One row per (layer, head): errors, tolerance, pass/fail."""
        layers, heads = torch.meshgrid(torch.arange(self.n_layers), torch.arange(self.n_heads), indexing="ij")
        return pd.DataFrame(
            {
                "layer": layers.flatten().numpy().astype("int16"),
                "head": heads.flatten().numpy().astype("int16"),
                "pattern_max_abs_err": self.pattern_err.flatten().numpy().astype("float64"),
                "z_max_abs_err": self.z_err.flatten().numpy().astype("float64"),
                "atol": self.atol,
                "passed": self.passed_mask.flatten().numpy(),
                "n_docs": self.n_docs,
            }
        )

    def summary(self) -> str:
        """Compact per-layer summary: worst errors and how many heads pass."""
        lines = [f"verification against Hugging Face (atol={self.atol:g}, {self.n_docs} document(s))"]
        lines.append("layer  heads passed  max |Δpattern|  max |Δz|")
        for layer in range(self.n_layers):
            passed = int(self.passed_mask[layer].sum())
            lines.append(
                f"{layer:>5}  {passed:>5}/{self.n_heads:<6}  {float(self.pattern_err[layer].max()):>14.2e}"
                f"  {float(self.z_err[layer].max()):>8.2e}"
            )
        failing = self.failing_heads()
        if failing:
            named = ", ".join(f"L{l}H{h}" for l, h in failing)
            lines.append(f"FAILED: {len(failing)} head(s) exceed atol={self.atol:g}: {named}")
        else:
            lines.append(f"PASSED: all {self.n_layers * self.n_heads} heads within atol={self.atol:g}")
        return "\n".join(lines)
