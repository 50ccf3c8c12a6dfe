"""BERT-layout encoders: `BertModel`, `RobertaModel`, `ElectraModel` share one attention layout.

Per layer: `encoder.layer[i].attention.self.{query,key,value}` (nn.Linear, [out, in]) and
`encoder.layer[i].attention.output.dense` (the output projection, before dropout, residual and LayerNorm).
"""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import AttentionWeights, ModelAdapter, split_linear, split_output_linear


class BertAdapter(ModelAdapter):
    model_types = ("bert", "roberta", "electra")
    family = "bert"

    @property
    def causal(self) -> bool:
        return bool(getattr(self.config, "is_decoder", False))

    def _layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def attention_modules(self) -> list[nn.Module]:
        return [layer.attention.self for layer in self._layers()]

    def output_projections(self) -> list[nn.Module]:
        return [layer.attention.output.dense for layer in self._layers()]

    def layer_modules(self) -> list[nn.Module]:
        return list(self._layers())

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(layer.attention.output.LayerNorm, layer.output.LayerNorm) for layer in self._layers()]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        return self._layers()[layer].attention.self.value, slice(None)

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        attn = self._layers()[layer].attention
        n_heads = self.n_heads
        W_Q, b_Q = split_linear(attn.self.query.weight, attn.self.query.bias, n_heads)
        W_K, b_K = split_linear(attn.self.key.weight, attn.self.key.bias, n_heads)
        W_V, b_V = split_linear(attn.self.value.weight, attn.self.value.bias, n_heads)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_output_linear(attn.output.dense.weight, n_heads),
            b_O=attn.output.dense.bias.detach(),
            scale=W_Q.shape[2] ** -0.5,
            causal=self.causal,
        )
