"""The measure registry: every association measure, one entry each; its module holds its maths.

Every list of measure names in the package derives from REGISTRY: config validation, the analysis pipeline,
`explain`, the tables' ranking, plots and the report's measure switch. Reading it loads no torch.
"""

from __future__ import annotations

from extractor.attribution.registry import Measure

A = "extractor.attribution"  # where the compute functions live: "module:function", imported on first use

REGISTRY: dict[str, Measure] = {m.name: m for m in (
    Measure(name="attention", level="head", label="attention", scale="raw", run_default=True,
            per_layer=f"{A}.attention:attention",
            meaning="α_ij, the softmax pattern A of the head: row i is how query i spreads its attention (sums to 1)."),
    Measure(name="value_norm", level="head", label="value norm", needs_values=True, run_default=True,
            per_layer=f"{A}.value_norm:value_norm_of_layer",
            meaning="‖α_ij · v_j W_O‖: the weight times the size of what key j sends (Kobayashi et al. 2020)."),
    # Not in `extractor run`'s default: it needs every head's f_h(x_j) in d_model and a per-key Gram matrix,
    # which costs about as much as the forward pass itself.
    Measure(name="layer_value_norm", level="layer", label="layer value norm", needs_values=True,
            per_layer=f"{A}.layer_value_norm:layer_value_norm_of_layer",
            meaning="‖Σ_h α_hij · v_j W_O^h‖: what key j adds to query i's output in this layer, all heads."),
    Measure(name="rollout", level="layer", label="rollout", run_default=True, rolled_out=True,
            across_layers=f"{A}.rollout:rollout",
            meaning="Attention rollout up to this layer (Abnar & Zuidema 2020): all heads, residual as 0.5·I."),
    # Computed by the attribution pass (extractor.attribution.layer_pass): they re-run or decompose layers.
    Measure(name="alti", level="layer", label="ALTI", extract_default=False, attribution="alti", rolled_out=True,
            meaning="ALTI (Ferrando et al. 2022): each token's share of the attention block + residual after "
                    "the LayerNorm, by L1 distance; rolled out."),
    Measure(name="globenc", level="layer", label="GlobEnc", extract_default=False, attribution="globenc",
            rolled_out=True,
            meaning="GlobEnc (Modarressi et al. 2022): norms through both LayerNorms of the layer, residual "
                    "included; rolled out."),
    Measure(name="alti_layer", level="layer", label="ALTI (layer)", extract_default=False, attribution="alti",
            meaning="ALTI's contribution matrix C_l of this layer alone (Ferrando et al. 2022), before rollout: "
                    "each token's share of the attention block + residual after the LayerNorm, rows normalised."),
    Measure(name="globenc_layer", level="layer", label="GlobEnc (layer)", extract_default=False,
            attribution="globenc",
            meaning="GlobEnc's matrix N_l of this layer alone (Modarressi et al. 2022), before rollout: the norm of "
                    "each token's share through both LayerNorms, residual included (raw norms)."),
    Measure(name="value_zeroing", level="layer", label="value zeroing", extract_default=False,
            attribution="value_zeroing",
            meaning="Value zeroing (Mohebbi et al. 2023): how far query i's layer output moves when key j's value "
                    "vector is zeroed (cosine distance, rows normalised); per layer."),
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
