"""BERT-layout encoders: `BertModel`, `ElectraModel` (and `RobertaModel`, see roberta.py) share one attention layout.

Per layer: `encoder.layer[i].attention.self.{query,key,value}` (nn.Linear, [out, in]) and
`encoder.layer[i].attention.output.dense` (the output projection, before dropout, residual and LayerNorm).
"""

from __future__ import annotations

from extractor.core.adapters.linear_layout import LinearLayoutAdapter


class BertAdapter(LinearLayoutAdapter):
    model_types: tuple[str, ...] = ("bert", "electra")
    family = "bert"
    subword_markers = ("##",)  # WordPiece: "##" opens every piece after a word's first
    layers = "encoder.layer"
    attention = "attention.self"
    projections = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    norms = ("attention.output.LayerNorm", "output.LayerNorm")

    @property
    def causal(self) -> bool:
        return bool(getattr(self.config, "is_decoder", False))
