"""Rotary-position decoders laid out like Llama: `layers[i].self_attn.{q,k,v,o}_proj` (nn.Linear, [out, in]).

Shared by Llama, Mistral, Qwen2 and Qwen3 (families differ only in the hooks below) and by GPT-NeoX, which
overrides how Q, K and V are stored. Grouped-query attention: k_proj and v_proj project to
num_key_value_heads·d_head, and W_K/W_V keep that [kv_head, d_model, d_head] layout. Everything is read from
the attention module itself (`scaling`, `head_dim`), as Hugging Face's forward uses it.
"""

from __future__ import annotations

import torch
from torch import nn

from extractor.core.adapters.base import (
    AttentionWeights,
    ModelAdapter,
    linear,
    module_list,
    number,
    split_linear,
    split_output_linear,
)

Projection = tuple[torch.Tensor, torch.Tensor]  # W [head or kv_head, d_model, d_head], b [head or kv_head, d_head]


class RotaryAdapter(ModelAdapter):
    """A causal decoder whose q and k are rotated by the cos/sin its model hands each attention module."""

    norm_placement = "pre"  # x + attention(RMSNorm(x)): ALTI and GlobEnc (post-LN) do not apply
    # Byte-level BPE (SmolLM2, Llama 3, Qwen, Pythia) or SentencePiece (Llama 2, Mistral 7B) tokenizers.
    subword_markers = ("Ġ", "▁")
    pad_token_fallback = "eos_token"  # decoders' tokenizers often have no pad token

    @property
    def causal(self) -> bool:
        return True

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    def _layers(self) -> nn.ModuleList:
        return module_list(self.model, "layers")

    def _attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule("self_attn")

    def _output_projection(self, attention: nn.Module) -> nn.Linear:
        return linear(attention, "o_proj")

    def attention_modules(self) -> list[nn.Module]:
        return [self._attention(layer) for layer in self._layers()]

    def layer_modules(self) -> list[nn.Module]:
        return list(self._layers())

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        return linear(self._attention(self._layers()[layer]), "v_proj"), slice(None)

    def output_projections(self) -> list[nn.Module]:
        return [self._output_projection(attention) for attention in self.attention_modules()]

    def qkv(self, attention: nn.Module) -> tuple[Projection, Projection, Projection]:
        """Q [head, …], K and V [kv_head, …] from separate q_proj, k_proj, v_proj."""
        query, key, value = (linear(attention, name) for name in ("q_proj", "k_proj", "v_proj"))
        return (
            split_linear(query.weight, query.bias, self.n_heads),
            split_linear(key.weight, key.bias, self.n_kv_heads),
            split_linear(value.weight, value.bias, self.n_kv_heads),
        )

    def rotary_dims(self, attention: nn.Module, d_head: int) -> int:
        """How many leading dims of each head are rotated (Llama-like: all of them)."""
        return d_head

    def sliding_window(self, attention: nn.Module) -> int | None:
        """This layer's sliding window; Qwen2/3 set it per layer on the module (None on full-attention layers)."""
        window = getattr(attention, "sliding_window", None)
        return None if window is None else int(window)

    def head_norms(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(q gain [d_head], k gain [d_head], eps) of per-head RMSNorms applied before rotation, if any."""
        return None

    def read_layer_weights(self, layer: int) -> AttentionWeights:
        attention = self.attention_modules()[layer]
        (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = self.qkv(attention)
        output = self._output_projection(attention)
        d_model = output.weight.shape[0]
        norms = self.head_norms(attention)
        return AttentionWeights(
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V,
            W_O=split_output_linear(output.weight, self.n_heads),
            b_O=torch.zeros(d_model, dtype=W_Q.dtype, device=W_Q.device) if output.bias is None else output.bias.detach(),
            scale=number(attention, "scaling"),
            causal=True,
            rotary_dims=self.rotary_dims(attention, W_Q.shape[2]),
            q_norm=None if norms is None else norms[0],
            k_norm=None if norms is None else norms[1],
            norm_eps=0.0 if norms is None else norms[2],
            sliding_window=self.sliding_window(attention),
        )
