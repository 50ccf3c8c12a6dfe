"""GPT-2: fused `h[i].attn.c_attn` and `h[i].attn.c_proj`, both `Conv1D`, which store weight as [in, out].

Scaling follows the config: `scale_attn_weights` (÷√d_head) and `scale_attn_by_inverse_layer_idx`
(÷(layer+1)). `reorder_and_upcast_attn` only changes the order of float operations (scale K before the
matmul, in float32), not the maths, so the shared recomputation matches it within tolerance.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from extractor.core.adapters.base import AttentionWeights, ModelAdapter, layer_norm, module_list


def _split_conv1d_in_out(weight: torch.Tensor, bias: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv1D slice [d_model, n_heads·d_head] (already [in, out]) → W: [head, d_model, d_head], b: [head, d_head]."""
    d_model, out_features = weight.shape
    d_head = out_features // n_heads
    W = weight.reshape(d_model, n_heads, d_head).permute(1, 0, 2).contiguous()
    return W, bias.reshape(n_heads, d_head).contiguous()


def _conv1d(module: nn.Module, path: str) -> Conv1D:
    found = module.get_submodule(path)
    assert isinstance(found, Conv1D), f"{path} is a {type(found).__name__}, not a Conv1D"
    return found


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    family = "gpt2"
    norm_placement = "pre"
    subword_markers = ("Ġ",)  # byte-level BPE: "Ġ" stands for the space before a word
    pad_token_fallback = "eos_token"  # GPT-2's tokenizer has no pad token

    @property
    def causal(self) -> bool:
        return True

    def _blocks(self) -> nn.ModuleList:
        return module_list(self.model, "h")

    def attention_modules(self) -> list[nn.Module]:
        return [block.get_submodule("attn") for block in self._blocks()]

    def output_projections(self) -> list[nn.Module]:
        return [_conv1d(block, "attn.c_proj") for block in self._blocks()]

    def layer_modules(self) -> list[nn.Module]:
        return list(self._blocks())

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        return [(layer_norm(block, "ln_1"), layer_norm(block, "ln_2")) for block in self._blocks()]

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        d_model = int(self.config.hidden_size)
        return _conv1d(self._blocks()[layer], "attn.c_attn"), slice(2 * d_model, 3 * d_model)  # output [q | k | v]

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        fused, projection = (_conv1d(self._blocks()[layer], f"attn.{name}") for name in ("c_attn", "c_proj"))
        n_heads, d_model = self.n_heads, int(self.config.hidden_size)
        weight = fused.weight.detach()  # [d_model, 3·d_model], Conv1D: [in, out]
        bias = fused.bias.detach()  # [3·d_model]
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
            W_O=projection.weight.detach().reshape(n_heads, d_head, d_model).contiguous(),  # [in, out] already
            b_O=projection.bias.detach(),
            scale=scale,
            causal=True,
        )
