"""DistilBERT: `transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}` (nn.Linear, [out, in])."""

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


class DistilBertAdapter(ModelAdapter):
    model_types = ("distilbert",)
    family = "distilbert"
    subword_markers = ("##",)  # BERT's WordPiece vocabulary

    @property
    def n_heads(self) -> int:
        return int(self.config.n_heads)

    @property
    def causal(self) -> bool:
        return False

    def _layers(self) -> nn.ModuleList:
        return module_list(self.model, "transformer.layer")

    def attention_modules(self) -> list[nn.Module]:
        return [layer.get_submodule("attention") for layer in self._layers()]

    def output_projections(self) -> list[nn.Module]:
        return [linear(layer, "attention.out_lin") for layer in self._layers()]

    def layer_modules(self) -> list[nn.Module]:
        return list(self._layers())

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(layer_norm(layer, "sa_layer_norm"), layer_norm(layer, "output_layer_norm")) for layer in self._layers()]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        return linear(self._layers()[layer], "attention.v_lin"), slice(None)

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        attention = self._layers()[layer].get_submodule("attention")
        query, key, value, output = (linear(attention, name) for name in ("q_lin", "k_lin", "v_lin", "out_lin"))
        n_heads = self.n_heads
        W_Q, b_Q = split_linear(query.weight, query.bias, n_heads)
        W_K, b_K = split_linear(key.weight, key.bias, n_heads)
        W_V, b_V = split_linear(value.weight, value.bias, n_heads)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_output_linear(output.weight, n_heads),
            b_O=output.bias.detach(),
            scale=W_Q.shape[2] ** -0.5,
            causal=False,
        )
