"""What every model-family adapter provides: where the attention weights live and which mask applies.

Everything after an adapter is family-blind. An adapter never computes attention; it only hands the
shared recomputation (`extractor.core.recompute`) the weights in one layout:

    W_Q:      [head, d_model, d_head]       b_Q:      [head, d_head]
    W_K, W_V: [kv_head, d_model, d_head]    b_K, b_V: [kv_head, d_head]
    W_O:      [head, d_head, d_model]       b_O:      [d_model]

kv_head = head except with grouped-query attention, where each key/value head serves a group of
head / kv_head consecutive query heads. Rotary decoders also hand over their per-head q/k RMSNorm gains,
how many dimensions of each head are rotated, and their sliding window; the rotation itself uses the
cos/sin the model hands its attention module (captured, never re-derived).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's self-attention weights, split per head (TransformerLens vocabulary)."""

    W_Q: torch.Tensor  # [head, d_model, d_head]
    W_K: torch.Tensor  # [kv_head, d_model, d_head]
    W_V: torch.Tensor  # [kv_head, d_model, d_head]
    W_O: torch.Tensor  # [head, d_head, d_model]
    b_Q: torch.Tensor  # [head, d_head]
    b_K: torch.Tensor  # [kv_head, d_head]
    b_V: torch.Tensor  # [kv_head, d_head]
    b_O: torch.Tensor  # [d_model]
    scale: float  # multiplies Q·Kᵀ (1/√d_head for most models; GPT-2 flags change it)
    causal: bool  # keys after the query are masked
    rotary_dims: int = 0  # leading dims of each q/k head rotated by the captured cos/sin (0: no rotary)
    q_norm: torch.Tensor | None = None  # [d_head] RMSNorm gain on each query head before rotation (Qwen3)
    k_norm: torch.Tensor | None = None  # [d_head] RMSNorm gain on each key head before rotation (Qwen3)
    norm_eps: float = 0.0  # epsilon of q_norm and k_norm
    sliding_window: int | None = None  # a query sees only its last `sliding_window` keys, itself included

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[2]


def split_linear(weight: torch.Tensor, bias: torch.Tensor | None, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an `nn.Linear` projection d_model → n_heads·d_head into per-head matrices.

    `nn.Linear` stores weight as [out, in]; the result is W: [head, d_model, d_head], b: [head, d_head].
    """
    out_features, d_model = weight.shape
    d_head = out_features // n_heads
    W = weight.detach().T.reshape(d_model, n_heads, d_head).permute(1, 0, 2).contiguous()
    b = torch.zeros(out_features, dtype=weight.dtype, device=weight.device) if bias is None else bias.detach()
    return W, b.reshape(n_heads, d_head).contiguous()


def module_list(module: nn.Module, path: str) -> nn.ModuleList:
    """The `nn.ModuleList` at dotted `path` under `module` (`model.encoder.layer` → `module_list(model, "encoder.layer")`).

    nn.Module types every attribute it looks up as `Tensor | Module`; these helpers read one, check its kind,
    and give it a precise type, so adapters read layouts without casts of their own.
    """
    found = module.get_submodule(path)
    assert isinstance(found, nn.ModuleList), f"{path} is a {type(found).__name__}, not an nn.ModuleList"
    return found


def linear(module: nn.Module, path: str) -> nn.Linear:
    """The `nn.Linear` at dotted `path` under `module`."""
    found = module.get_submodule(path)
    assert isinstance(found, nn.Linear), f"{path} is a {type(found).__name__}, not an nn.Linear"
    return found


def layer_norm(module: nn.Module, path: str) -> nn.LayerNorm:
    """The `nn.LayerNorm` at dotted `path` under `module`."""
    found = module.get_submodule(path)
    assert isinstance(found, nn.LayerNorm), f"{path} is a {type(found).__name__}, not an nn.LayerNorm"
    return found


def number(module: nn.Module, name: str) -> float:
    """A plain number a module keeps as an attribute (`scaling`, `rotary_ndims`, `variance_epsilon`)."""
    value = getattr(module, name)
    assert isinstance(value, int | float), f"{type(module).__name__}.{name} is a {type(value).__name__}, not a number"
    return float(value)


def split_output_linear(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Split an `nn.Linear` output projection n_heads·d_head → d_model ([out, in]) into W_O: [head, d_head, d_model]."""
    d_model, in_features = weight.shape
    return weight.detach().T.reshape(n_heads, in_features // n_heads, d_model).contiguous()


class ModelAdapter(ABC):
    """Knows one model family's module layout. Subclasses list the `model_type`s they cover."""

    model_types: tuple[str, ...] = ()
    family: str = ""
    # Where each residual block's LayerNorm sits: "post" (LN(x + sublayer(x)): BERT, DistilBERT) or "pre"
    # (x + sublayer(LN(x)): GPT-2). The attribution measures that decompose through LayerNorms read it.
    norm_placement: str = "post"
    # Characters this family's tokenizers put in token text to mark where a word starts or continues
    # (WordPiece "##ing", byte-level BPE "Ġthe", SentencePiece "▁the"); labels strip them.
    subword_markers: tuple[str, ...] = ()
    # The tokenizer's special token (its attribute name) that pads batches when the tokenizer has no pad token;
    # None: this family's tokenizers always have one. Any token works: padded keys are masked, padded rows dropped.
    pad_token_fallback: str | None = None

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config: PretrainedConfig = model.config
        self._weight_cache: dict[int, tuple[tuple[tuple[int, int], ...], AttentionWeights]] = {}

    @property
    def n_layers(self) -> int:
        return len(self.attention_modules())

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @classmethod
    def position_offset(cls, config: PretrainedConfig) -> int:
        """How many position ids come before the first token's: the model takes max_position_embeddings − offset tokens."""
        return 0

    @property
    @abstractmethod
    def causal(self) -> bool:
        """Whether queries may only see keys at or before their own position."""

    @abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """Per layer, the module whose first input is the hidden states that Q, K and V are projected from."""

    @abstractmethod
    def output_projections(self) -> list[nn.Module]:
        """Per layer, the module that maps z ([batch, pos, head·d_head]) to d_model (input z, output before residual)."""

    @abstractmethod
    def read_layer_weights(self, layer: int) -> AttentionWeights:
        """Split layer `layer`'s weights into the shared per-head layout (called once per weight version)."""

    def layer_weights(self, layer: int) -> AttentionWeights:
        """The weights of layer `layer`, split once and reused until a parameter changes in place."""
        modules = (self.attention_modules()[layer], self.output_projections()[layer])
        version = tuple((id(p), p._version) for m in modules for p in m.parameters())
        cached = self._weight_cache.get(layer)
        if cached is None or cached[0] != version:
            cached = (version, self.read_layer_weights(layer))
            self._weight_cache[layer] = cached
        return cached[1]

    def all_layer_weights(self) -> list[AttentionWeights]:
        return [self.layer_weights(layer) for layer in range(self.n_layers)]

    # --- Whole-layer layout, for the attribution measures (extractor.attribution) ----------------------------

    def layer_modules(self) -> list[nn.Module]:
        """Per layer, the whole block (attention, residuals, LayerNorms, FFN): input and output [batch, pos, d_model]."""
        raise NotImplementedError(f"the {self.family} adapter does not list its layer modules")

    def sublayer_norms(self) -> list[tuple[nn.LayerNorm, nn.LayerNorm]]:
        """Per layer, (the LayerNorm of the attention sublayer, the LayerNorm of the FFN sublayer)."""
        raise NotImplementedError(f"the {self.family} adapter does not list its LayerNorms")

    def value_output(self, layer: int) -> tuple[nn.Module, slice | torch.Tensor]:
        """The module whose output holds layer `layer`'s value vectors (all heads, bias included), and which columns
        of that output's last dimension they are (a slice, or an index tensor where they interleave with q and k):
        zeroing them at one position zeroes that key's value vector."""
        raise NotImplementedError(f"the {self.family} adapter does not say where its value vectors are")
