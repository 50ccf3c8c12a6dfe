"""attention-extractor: see, verify and compare what every attention head of a pretrained transformer does."""

from .analysis import DocAttention, analyse_batch
from .api import ExtractionResult, extract
from .models import LoadedModel, load_model
from .recompute import AttentionRecompute, additive_mask, recompute_attention
from .verify import VerificationReport

__all__ = [
    "AttentionRecompute",
    "DocAttention",
    "ExtractionResult",
    "LoadedModel",
    "VerificationReport",
    "additive_mask",
    "analyse_batch",
    "extract",
    "load_model",
    "recompute_attention",
]
