"""GPT-NeoX (Pythia): `layers[i].attention.query_key_value` fused and interleaved per head, `.dense` out.

The fused projection's output is viewed as [head, (q | k | v), d_head]: each head's q, k and v are adjacent.
Only the leading `rotary_ndims` = d_head · partial_rotary_factor (`rotary_pct`) dims of q and k rotate.
"""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import linear, number
from extractor.core.adapters.rotary import Projection, RotaryAdapter


class GPTNeoXAdapter(RotaryAdapter):
    model_types = ("gpt_neox",)
    family = "gpt_neox"

    def _attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule("attention")

    def _output_projection(self, attention: nn.Module) -> nn.Linear:
        return linear(attention, "dense")

    def qkv(self, attention: nn.Module) -> tuple[Projection, Projection, Projection]:
        fused = linear(attention, "query_key_value")
        d_model = fused.weight.shape[1]
        weight = fused.weight.detach().view(self.n_heads, 3, -1, d_model)  # [head, q|k|v, d_head, d_model]
        bias = (fused.bias.detach() if fused.bias is not None else weight.new_zeros(weight.shape[:3]))
        bias = bias.reshape(self.n_heads, 3, -1)  # [head, q|k|v, d_head]
        W = weight.transpose(2, 3)  # [head, q|k|v, d_model, d_head]
        query, key, value = ((W[:, i].contiguous(), bias[:, i].contiguous()) for i in range(3))
        return query, key, value

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        """The fused projection's output is [head, q|k|v, d_head] per position: V is the third of each head."""
        fused = linear(self._attention(self._layers()[layer]), "query_key_value")
        columns = torch.arange(fused.weight.shape[0], device=fused.weight.device).view(self.n_heads, 3, -1)
        return fused, columns[:, 2].reshape(-1)  # [head·d_head] output columns

    def rotary_dims(self, attention: nn.Module, d_head: int) -> int:
        return int(number(attention, "rotary_ndims"))

    def sliding_window(self, attention: nn.Module) -> int | None:
        return None
