"""BERT-layout encoders: `BertModel`, `ElectraModel` (and `RobertaModel`, see roberta.py) share one attention layout.

Per layer: `encoder.layer[i].attention.self.{query,key,value}` (nn.Linear, [out, in]) and
`encoder.layer[i].attention.output.dense` (the output projection, before dropout, residual and LayerNorm).
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


class BertAdapter(ModelAdapter):
    model_types: tuple[str, ...] = ("bert", "electra")
    family = "bert"
    subword_markers = ("##",)  # WordPiece: "##" opens every piece after a word's first

    @property
    def causal(self) -> bool:
        return bool(getattr(self.config, "is_decoder", False))

    def _layers(self) -> nn.ModuleList:
        return module_list(self.model, "encoder.layer")

    def attention_modules(self) -> list[nn.Module]:
        return [layer.get_submodule("attention.self") for layer in self._layers()]

    def output_projections(self) -> list[nn.Module]:
        return [linear(layer, "attention.output.dense") for layer in self._layers()]

    def layer_modules(self) -> list[nn.Module]:
        return list(self._layers())

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(layer_norm(layer, "attention.output.LayerNorm"), layer_norm(layer, "output.LayerNorm"))
                for layer in self._layers()]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        return linear(self._layers()[layer], "attention.self.value"), slice(None)

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        attention = self._layers()[layer].get_submodule("attention")
        query, key, value = (linear(attention, f"self.{name}") for name in ("query", "key", "value"))
        output = linear(attention, "output.dense")
        n_heads = self.n_heads
        W_Q, b_Q = split_linear(query.weight, query.bias, n_heads)
        W_K, b_K = split_linear(key.weight, key.bias, n_heads)
        W_V, b_V = split_linear(value.weight, value.bias, n_heads)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_output_linear(output.weight, n_heads),
            b_O=output.bias.detach(),
            scale=W_Q.shape[2] ** -0.5,
            causal=self.causal,
        )
