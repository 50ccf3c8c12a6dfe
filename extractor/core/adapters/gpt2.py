"""GPT-2: fused `h[i].attn.c_attn` and `h[i].attn.c_proj`, both `Conv1D`, which store weight as [in, out].

Scaling follows the config: `scale_attn_weights` (÷√d_head) and `scale_attn_by_inverse_layer_idx`
(÷(layer+1)). `reorder_and_upcast_attn` only changes the order of float operations (scale K before the
matmul, in float32), not the maths, so the shared recomputation matches it within tolerance.
"""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import AttentionWeights, ModelAdapter


def _split_conv1d_in_out(weight: torch.Tensor, bias: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv1D slice [d_model, n_heads·d_head] (already [in, out]) → W: [head, d_model, d_head], b: [head, d_head]."""
    d_model, out_features = weight.shape
    d_head = out_features // n_heads
    W = weight.reshape(d_model, n_heads, d_head).permute(1, 0, 2).contiguous()
    return W, bias.reshape(n_heads, d_head).contiguous()


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    family = "gpt2"
    norm_placement = "pre"

    @property
    def causal(self) -> bool:
        return True

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.h]

    def output_projections(self) -> list[nn.Module]:
        return [block.attn.c_proj for block in self.model.h]

    def layer_modules(self) -> list[nn.Module]:
        return list(self.model.h)

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(block.ln_1, block.ln_2) for block in self.model.h]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        d_model = int(self.config.hidden_size)
        return self.model.h[layer].attn.c_attn, slice(2 * d_model, 3 * d_model)  # c_attn's output is [q | k | v]

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        attn = self.model.h[layer].attn
        n_heads, d_model = self.n_heads, int(self.config.hidden_size)
        weight = attn.c_attn.weight.detach()  # [d_model, 3·d_model], Conv1D: [in, out]
        bias = attn.c_attn.bias.detach()  # [3·d_model]
        (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = (
            _split_conv1d_in_out(weight[:, i * d_model : (i + 1) * d_model], bias[i * d_model : (i + 1) * d_model], n_heads)
            for i in range(3)
        )
        d_head = d_model // n_heads
        scale = d_head**-0.5 if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=attn.c_proj.weight.detach().reshape(n_heads, d_head, d_model).contiguous(),  # [in, out] already
            b_O=attn.c_proj.bias.detach(),
            scale=scale,
            causal=True,
        )
