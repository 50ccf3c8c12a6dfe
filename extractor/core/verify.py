"""Verification: the recomputed pattern and z against Hugging Face's own, per layer and head.

Two kinds of batch (see README, "What is compared with what"):
- compared with eager (`extractor verify`, the API, and a run's first batch and every `hf_compare_every`-th):
  the max absolute error of the pattern recomputed from the weights against Hugging Face's `output_attentions`,
  and of the recomputed z against the z the model fed its output projection (captured by a hook), over real
  (non-padded) query rows;
- probed (every other verified batch of a run, on the sdpa kernel): q, k, v the kernel received against the
  weights (relative error, `probes.projection_errors`) and the pattern against the kernel's z
  (`probes.z_probe_errors`).
A head passes when every error is within its tolerance (atol 1e-5 and rtol 1e-4 in float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import pandas as pd
import torch

from extractor.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL


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
    rtol: float = DEFAULT_RTOL  # of the projection probes
    pattern_err: torch.Tensor = field(init=False)  # [layer, head] against output_attentions (eager batches)
    z_err: torch.Tensor = field(init=False)  # [layer, head] recomputed z against the model's (eager batches)
    z_probe_err: torch.Tensor = field(init=False)  # [layer, head] pattern·V against the kernel's z, probed
    projection_err: torch.Tensor = field(init=False)  # [layer, head] kernel's q, k, v against weights (relative)
    n_docs: int = 0  # documents verified
    n_docs_compared: int = 0  # of which compared with Hugging Face's eager output_attentions

    def __post_init__(self) -> None:
        self.pattern_err = torch.zeros(self.n_layers, self.n_heads)
        self.z_err = torch.zeros(self.n_layers, self.n_heads)
        self.z_probe_err = torch.zeros(self.n_layers, self.n_heads)
        self.projection_err = torch.zeros(self.n_layers, self.n_heads)

    def add(self, layer: int, pattern_err: torch.Tensor, z_err: torch.Tensor) -> None:
        """A layer of a batch compared with eager: errors [head] each."""
        self.pattern_err[layer] = torch.maximum(self.pattern_err[layer], pattern_err.cpu())
        self.z_err[layer] = torch.maximum(self.z_err[layer], z_err.cpu())

    def add_probes(self, layer: int, projection_err: torch.Tensor, z_probe_err: torch.Tensor) -> None:
        """A layer of a probed batch: errors [head] each."""
        self.projection_err[layer] = torch.maximum(self.projection_err[layer], projection_err.cpu())
        self.z_probe_err[layer] = torch.maximum(self.z_probe_err[layer], z_probe_err.cpu())

    def merge(self, other: VerificationReport) -> None:
        self.pattern_err = torch.maximum(self.pattern_err, other.pattern_err)
        self.z_err = torch.maximum(self.z_err, other.z_err)
        self.z_probe_err = torch.maximum(self.z_probe_err, other.z_probe_err)
        self.projection_err = torch.maximum(self.projection_err, other.projection_err)
        self.n_docs += other.n_docs
        self.n_docs_compared += other.n_docs_compared

    @property
    def passed_mask(self) -> torch.Tensor:
        """[layer, head] True where every error is within its tolerance (NaN fails)."""
        return (self.pattern_err <= self.atol) & (self.z_err <= self.atol) & (self.z_probe_err <= self.atol) \
            & (self.projection_err <= self.rtol)

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
                "z_probe_err": self.z_probe_err.flatten().numpy().astype("float64"),
                "projection_rel_err": self.projection_err.flatten().numpy().astype("float64"),
                "atol": self.atol,
                "rtol": self.rtol,
                "passed": self.passed_mask.flatten().numpy(),
                "n_docs": self.n_docs,
                "n_docs_compared": self.n_docs_compared,
            }
        )

    def summary(self) -> str:
        """Compact per-layer summary: worst errors and how many heads pass."""
        probed = self.n_docs - self.n_docs_compared
        lines = [f"verification against Hugging Face (atol={self.atol:g}, {self.n_docs} document(s): "
                 f"{self.n_docs_compared} compared with eager output_attentions"
                 + (f", {probed} probed on the sdpa kernel, rtol={self.rtol:g})" if probed else ")")]
        lines.append("layer  heads passed  max |Δpattern|  max |Δz|" + ("  max |Δz·r|  max rel Δqkv" if probed else ""))
        for layer in range(self.n_layers):
            passed = int(self.passed_mask[layer].sum())
            line = (f"{layer:>5}  {passed:>5}/{self.n_heads:<6}  {float(self.pattern_err[layer].max()):>14.2e}"
                    f"  {float(self.z_err[layer].max()):>8.2e}")
            if probed:
                line += f"  {float(self.z_probe_err[layer].max()):>10.2e}  {float(self.projection_err[layer].max()):>12.2e}"
            lines.append(line)
        failing = self.failing_heads()
        if failing:
            named = ", ".join(f"L{l}H{h}" for l, h in failing)
            lines.append(f"FAILED: {len(failing)} head(s) exceed atol={self.atol:g} or rtol={self.rtol:g}: {named}")
        else:
            lines.append(f"PASSED: all {self.n_layers * self.n_heads} heads within atol={self.atol:g}")
        return "\n".join(lines)
