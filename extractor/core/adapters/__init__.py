"""Model-family adapters. `adapter_for(model)` picks the one that knows the model's layout."""

from __future__ import annotations

from transformers import PreTrainedModel

from extractor.core.adapters.base import AttentionWeights, ModelAdapter
from extractor.core.adapters.bert import BertAdapter
from extractor.core.adapters.distilbert import DistilBertAdapter
from extractor.core.adapters.gpt2 import GPT2Adapter
from extractor.core.adapters.gpt_neox import GPTNeoXAdapter
from extractor.core.adapters.llama import LlamaAdapter
from extractor.core.adapters.mistral import MistralAdapter
from extractor.core.adapters.qwen2 import Qwen2Adapter
from extractor.core.adapters.qwen3 import Qwen3Adapter
from extractor.core.adapters.roberta import RobertaAdapter
from extractor.errors import UserError

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    BertAdapter, RobertaAdapter, DistilBertAdapter, GPT2Adapter, LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, GPTNeoXAdapter
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)
# Every family's subword markers, for token text whose model is not at hand (labels, stored tokens).
SUBWORD_MARKERS: tuple[str, ...] = tuple(dict.fromkeys(m for a in ADAPTERS for m in a.subword_markers))


class UnsupportedModelError(UserError, ValueError):
    """The model's architecture has no adapter."""


def adapter_class(model_type: str | None) -> type[ModelAdapter] | None:
    """The adapter class that covers `model_type` (a config's `model_type`), or None."""
    return next((adapter_cls for adapter_cls in ADAPTERS if model_type in adapter_cls.model_types), None)


def adapter_for(model: PreTrainedModel) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    adapter_cls = adapter_class(model_type)
    if adapter_cls is not None:
        return adapter_cls(model)
    raise UnsupportedModelError(
        f"unsupported architecture '{model_type}' ({type(model).__name__}); "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = [
    "ADAPTERS", "SUBWORD_MARKERS", "SUPPORTED_MODEL_TYPES", "AttentionWeights", "ModelAdapter", "UnsupportedModelError",
    "adapter_class", "adapter_for",
]
