"""Qwen3: Qwen2's layout plus an RMSNorm over each query and key head (`q_norm`, `k_norm`) before rotation."""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import number
from extractor.core.adapters.rotary import RotaryAdapter


class Qwen3Adapter(RotaryAdapter):
    model_types = ("qwen3",)
    family = "qwen3"

    def head_norms(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        q_norm, k_norm = attention.get_submodule("q_norm"), attention.get_submodule("k_norm")
        eps = number(q_norm, "variance_epsilon")
        assert eps == number(k_norm, "variance_epsilon"), "q_norm and k_norm share one eps in Qwen3"
        return q_norm.get_parameter("weight").detach(), k_norm.get_parameter("weight").detach(), eps
