"""Attribution measures that account for the residual stream and the LayerNorms, and an intervention.

- `alti`:          ALTI (Ferrando, Gállego & Costa-jussà, EMNLP 2022), rolled out across layers.
- `globenc`:       GlobEnc (Modarressi et al., NAACL 2022), rolled out across layers.
- `value_zeroing`: Value Zeroing (Mohebbi et al., EACL 2023), per layer: an intervention on the real layer.
- `agreement`:     per-layer Spearman agreement between measures (which measure follows the intervention).

One module per idea: `decompose` (the attention block + residual through LayerNorm, per source token),
`alti`, `globenc`, `rollout`, `value_zeroing` (maths), `replay` (recording and re-running a real layer),
`layer_pass` (what `analysis.analyse_batch` calls), `agreement`. The measure names live in
`extractor.attribution.measures` (ATTRIBUTION_MEASURES).
"""
