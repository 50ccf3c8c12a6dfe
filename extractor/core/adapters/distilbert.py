"""DistilBERT: `transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}` (nn.Linear, [out, in])."""

from __future__ import annotations

from extractor.core.adapters.linear_layout import LinearLayoutAdapter


class DistilBertAdapter(LinearLayoutAdapter):
    model_types = ("distilbert",)
    family = "distilbert"
    subword_markers = ("##",)  # BERT's WordPiece vocabulary
    layers = "transformer.layer"
    attention = "attention"
    projections = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin")
    norms = ("sa_layer_norm", "output_layer_norm")

    @property
    def n_heads(self) -> int:
        return int(self.config.n_heads)
