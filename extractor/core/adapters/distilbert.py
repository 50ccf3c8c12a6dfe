"""DistilBERT: `transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}` (nn.Linear, [out, in])."""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import AttentionWeights, ModelAdapter, split_linear, split_output_linear


class DistilBertAdapter(ModelAdapter):
    model_types = ("distilbert",)
    family = "distilbert"

    @property
    def n_heads(self) -> int:
        return int(self.config.n_heads)

    @property
    def causal(self) -> bool:
        return False

    def attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.model.transformer.layer]

    def output_projections(self) -> list[nn.Module]:
        return [layer.attention.out_lin for layer in self.model.transformer.layer]

    def layer_modules(self) -> list[nn.Module]:
        return list(self.model.transformer.layer)

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(layer.sa_layer_norm, layer.output_layer_norm) for layer in self.model.transformer.layer]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        return self.model.transformer.layer[layer].attention.v_lin, slice(None)

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        attn = self.model.transformer.layer[layer].attention
        n_heads = self.n_heads
        W_Q, b_Q = split_linear(attn.q_lin.weight, attn.q_lin.bias, n_heads)
        W_K, b_K = split_linear(attn.k_lin.weight, attn.k_lin.bias, n_heads)
        W_V, b_V = split_linear(attn.v_lin.weight, attn.v_lin.bias, n_heads)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_output_linear(attn.out_lin.weight, n_heads),
            b_O=attn.out_lin.bias.detach(),
            scale=W_Q.shape[2] ** -0.5,
            causal=False,
        )
