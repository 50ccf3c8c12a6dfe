"""RoBERTa: BERT's module layout (bert.py) with byte-level BPE tokens and position ids offset past the pad id."""

from __future__ import annotations

from transformers import PretrainedConfig

from extractor.core.adapters.bert import BertAdapter


class RobertaAdapter(BertAdapter):
    model_types = ("roberta",)
    family = "roberta"
    subword_markers = ("Ġ",)  # byte-level BPE: "Ġ" stands for the space before a word

    @classmethod
    def position_offset(cls, config: PretrainedConfig) -> int:
        # RobertaEmbeddings numbers real tokens from padding_idx + 1 (padding_idx = pad_token_id).
        return (config.pad_token_id or 0) + 1
