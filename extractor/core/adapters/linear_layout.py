"""Encoders whose layers hold four separate `nn.Linear` projections (q, k, v, o: [out, in]) and a LayerNorm
after each residual sum. For these families the layout is data, not code: where the layers are, which module
receives the hidden states, the four projections' paths and the two LayerNorms' paths.
"""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import (
    AttentionWeights,
    ModelAdapter,
    layer_norm,
    linear,
    module_list,
    split_linear,
    split_output_linear,
)


class LinearLayoutAdapter(ModelAdapter):
    """Subclasses set the paths below (dotted, relative to the model, then to each layer)."""

    layers: str = ""  # the nn.ModuleList of layers
    attention: str = ""  # per layer: the module whose first input is the hidden states Q, K, V come from
    projections: tuple[str, str, str, str] = ("", "", "", "")  # per layer: q, k, v and output nn.Linear
    norms: tuple[str, str] = ("", "")  # per layer: the LayerNorm after the attention block, after the FFN

    @property
    def causal(self) -> bool:
        return False

    def _layers(self) -> nn.ModuleList:
        return module_list(self.model, self.layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.get_submodule(self.attention) for layer in self._layers()]

    def output_projections(self) -> list[nn.Module]:
        return [linear(layer, self.projections[3]) for layer in self._layers()]

    def layer_modules(self) -> list[nn.Module]:
        return list(self._layers())

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(layer_norm(layer, self.norms[0]), layer_norm(layer, self.norms[1])) for layer in self._layers()]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        return linear(self._layers()[layer], self.projections[2]), slice(None)

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        query, key, value, output = (linear(self._layers()[layer], path) for path in self.projections)
        n_heads = self.n_heads
        W_Q, b_Q = split_linear(query.weight, query.bias, n_heads)  # [head, d_model, d_head], [head, d_head]
        W_K, b_K = split_linear(key.weight, key.bias, n_heads)
        W_V, b_V = split_linear(value.weight, value.bias, n_heads)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_output_linear(output.weight, n_heads),  # [head, d_head, d_model]
            b_O=output.bias.detach(),
            scale=W_Q.shape[2] ** -0.5,
            causal=self.causal,
        )
