"""Model-family adapters. `adapter_for(model)` picks the one that knows the model's layout."""

from __future__ import annotations

from torch import nn

from extractor.core.adapters.base import AttentionWeights, ModelAdapter
from extractor.core.adapters.bert import BertAdapter
from extractor.core.adapters.distilbert import DistilBertAdapter
from extractor.core.adapters.gpt2 import GPT2Adapter
from extractor.core.adapters.gpt_neox import GPTNeoXAdapter
from extractor.core.adapters.llama import LlamaAdapter
from extractor.core.adapters.mistral import MistralAdapter
from extractor.core.adapters.qwen2 import Qwen2Adapter
from extractor.core.adapters.qwen3 import Qwen3Adapter
from extractor.errors import UserError

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    BertAdapter, DistilBertAdapter, GPT2Adapter, LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, GPTNeoXAdapter
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


class UnsupportedModelError(UserError, ValueError):
    """The model's architecture has no adapter."""


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls(model)
    raise UnsupportedModelError(
        f"unsupported architecture '{model_type}' ({type(model).__name__}); "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "AttentionWeights", "ModelAdapter", "UnsupportedModelError", "adapter_for"]
