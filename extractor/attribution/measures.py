"""The measure registry: every association measure, one line each (its module holds its maths and `MEASURE`).

Every list of measure names in the package derives from REGISTRY: config validation, the analysis pipeline,
`explain`, the tables' ranking, plots and the report's measure switch.
"""

from __future__ import annotations

from extractor.attribution import alti, attention, globenc, layer_value_norm, rollout, value_norm, value_zeroing
from extractor.attribution.registry import Measure

REGISTRY: dict[str, Measure] = {m.name: m for m in (
    attention.MEASURE,
    value_norm.MEASURE,
    layer_value_norm.MEASURE,
    rollout.MEASURE,
    alti.MEASURE,
    globenc.MEASURE,
    value_zeroing.MEASURE,
)}

MEASURES = tuple(REGISTRY)
HEAD_MEASURES = tuple(name for name, m in REGISTRY.items() if m.level == "head")
LAYER_MEASURES = tuple(name for name, m in REGISTRY.items() if m.level == "layer")
# Re-run or decompose whole layers (extractor.attribution.layer_pass); ALTI and GlobEnc: post-LN encoders only.
ATTRIBUTION_MEASURES = tuple(name for name, m in REGISTRY.items() if m.by_attribution_pass)
# What `extract()` and `analyse_batch` compute when not told: one forward pass, every family.
DEFAULT_MEASURES = tuple(name for name, m in REGISTRY.items() if m.extract_default)
# `extractor run`'s default.
RUN_MEASURES = tuple(name for name, m in REGISTRY.items() if m.run_default)
