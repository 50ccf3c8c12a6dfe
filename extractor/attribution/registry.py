"""What every association measure declares about itself: the entry type of the measure registry.

The registry itself is `extractor.attribution.measures.REGISTRY` (one line per measure). Config validation,
the analysis pipeline, `explain`, the tables' ranking measure, plots and the HTML report all read it, so a
new measure is one module (its maths and its `MEASURE`) plus one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from extractor.core.adapters.base import AttentionWeights


@dataclass(frozen=True)
class LayerInputs:
    """What the analysis loop holds for one layer when it computes the per-layer measures."""

    pattern: torch.Tensor  # [batch, head, query, key]
    v: torch.Tensor | None  # [batch, head, key, d_head] (None unless a requested measure needs_values)
    weights: AttentionWeights


@dataclass(frozen=True)
class Measure:
    """One association measure: how strongly query i is associated with key j.

    Exactly one of `per_layer` and `across_layers` computes it, or neither: then the attribution pass
    (`extractor.attribution.layer_pass`) does, because the measure re-runs or decomposes whole layers.
    """

    name: str
    level: Literal["head", "layer"]  # head: [layer, head, query, key]; layer: [layer, query, key] (head = -1 rows)
    label: str  # short label for figures and the report's measure switch
    meaning: str  # one line: the definition, with its reference
    scale: Literal["raw", "max"] = "max"  # the report's line opacity: the value itself, or value / matrix max
    needs_values: bool = False  # needs V of every layer (projected from the captured input)
    per_layer: Callable[[LayerInputs], torch.Tensor] | None = None  # → [batch, head or -, query, key]
    across_layers: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None  # patterns → per layer [batch, query, key]
    run_default: bool = False  # in `extractor run`'s default measures
    extract_default: bool = True  # in `extract()`'s default measures (one forward pass, every family)

    @property
    def by_attribution_pass(self) -> bool:
        return self.per_layer is None and self.across_layers is None
