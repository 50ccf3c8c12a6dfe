"""Qwen3: Qwen2's layout plus an RMSNorm over each query and key head (`q_norm`, `k_norm`) before rotation."""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.rotary import RotaryAdapter


class Qwen3Adapter(RotaryAdapter):
    model_types = ("qwen3",)
    family = "qwen3"

    def head_norms(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        q_norm, k_norm = attention.q_norm, attention.k_norm
        assert q_norm.variance_epsilon == k_norm.variance_epsilon, "q_norm and k_norm share one eps in Qwen3"
        return q_norm.weight.detach(), k_norm.weight.detach(), float(q_norm.variance_epsilon)
