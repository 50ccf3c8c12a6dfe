"""What every association measure declares about itself: the entry type of the measure registry.

The registry itself is `extractor.attribution.measures.REGISTRY` (one entry per measure). Config validation,
the analysis pipeline, `explain`, the tables' ranking measure, plots and the HTML report all read it, so a
new measure is one module (its maths) plus one registry entry. Entries name their compute function by
"module:function" and import it on first use, so reading the registry (the CLI's help, config validation)
does not load torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
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

    `per_layer` ("module:function", LayerInputs → [batch, head, query, key] or [batch, query, key]) is computed
    inside the layer loop; `across_layers` (per layer patterns [batch, head, query, key] → per layer
    [batch, query, key]) after it; `attribution` names the per-layer matrix that the attribution pass
    (`extractor.attribution.layer_pass`) builds the measure from, because it re-runs or decomposes whole layers.
    """

    name: str
    level: Literal["head", "layer"]  # head: [layer, head, query, key]; layer: [layer, query, key] (head = -1 rows)
    label: str  # short label for figures and the report's measure switch
    meaning: str  # one line: the definition, with its reference
    scale: Literal["raw", "max"] = "max"  # the report's line opacity: the value itself, or value / matrix max
    needs_values: bool = False  # needs V of every layer (projected from the captured input)
    per_layer: str | None = None
    across_layers: str | None = None
    attribution: Literal["alti", "globenc", "value_zeroing"] | None = None  # the attribution pass's matrix
    # A product over layers 0..l (rollout, ALTI, GlobEnc: per-layer matrices chained by `rollout.chain`); under
    # sliding windows a row reaches further back than one layer's window (`recompute.reach_window`).
    rolled_out: bool = False
    run_default: bool = False  # in `extractor run`'s default measures
    extract_default: bool = True  # in `extract()`'s default measures (one forward pass, every family)

    @property
    def by_attribution_pass(self) -> bool:
        return self.attribution is not None

    def function(self, which: Literal["per_layer", "across_layers"]) -> Callable[..., Any]:
        """The compute function named by `per_layer` or `across_layers`, imported now."""
        target = getattr(self, which)
        assert target is not None, f"measure {self.name} has no {which} function"
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
