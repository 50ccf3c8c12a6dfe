"""One batch through the whole pipeline: forward with capture → recompute → verify → measures → per-document tensors.

This is the single code path that the Python API, `extractor verify/explain/run` and every engine share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from extractor.attribution import measures as M
from extractor.attribution.layer_pass import AttributionPass, ZeroingScope
from extractor.attribution.registry import LayerInputs
from extractor.core.capture import run_with_capture
from extractor.core.encode import EncodedBatch, TokenizedDoc, strip_subword_markers
from extractor.core.models import LoadedModel
from extractor.core.probes import projection_errors, z_probe_errors
from extractor.core.recompute import (
    attention_output,
    attention_pattern,
    first_visible_key,
    layer_masks,
    per_query_head,
    project_values,
    reach_window,
    recompute_attention,
    value_vectors_out,
)
from extractor.core.sdpa_capture import supports_sdpa_recording
from extractor.core.tolerance import DEFAULT_RTOL
from extractor.core.verify import VerificationReport, layer_errors
from extractor.core.words import first_key_words, to_words

# (measure names, layer) → [query] the first key each row sees (None: key 0, full attention): the
# `first_keys` method of `BatchAnalysis` (token level) and of `DocAttention` (token or word level)
FirstKeys = Callable[[Sequence[str], int], torch.Tensor | None]


def measure_window(name: str, layer: int, sliding_windows: Sequence[int | None]) -> int | None:
    """The sliding window measure `name` is confined to at `layer`: the layer's own (None: full attention, as
    for every layer when `sliding_windows` is empty), or for a measure rolled out through layers 0..layer
    (rollout, ALTI, GlobEnc) their `reach_window`."""
    if not sliding_windows:
        return None
    if M.REGISTRY[name].rolled_out:
        return reach_window(sliding_windows[: layer + 1])
    return sliding_windows[layer]


def group_window(names: Sequence[str], layer: int, sliding_windows: Sequence[int | None]) -> int | None:
    """The widest `measure_window` of measures that share one set of cells (a table's head or layer rows)."""
    windows = [measure_window(name, layer, sliding_windows) for name in names]
    known = [w for w in windows if w is not None]
    return max(known) if known and len(known) == len(windows) else None


@dataclass
class DocAttention:
    """One document's association measures, padding trimmed, at token or word level.

    head_measures: name → [layer, head, query, key]; layer_measures: name → [layer, query, key].
    sliding_windows: per layer, the model's sliding window (None: full attention; empty: none in any layer).
    """

    doc: TokenizedDoc
    level: str
    head_measures: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_measures: dict[str, torch.Tensor] = field(default_factory=dict)
    sliding_windows: list[int | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.doc.n_words if self.level == "word" else self.doc.n_tokens

    def document_positions(self) -> torch.Tensor:
        """[size]: each matrix index's position in the whole document (token or word positions)."""
        return torch.tensor(self.doc.word_positions if self.level == "word" else self.doc.positions, dtype=torch.long)

    def labels(self) -> list[str]:
        """[size]: the text of each matrix index: the tokens, or each word's pieces joined without markers."""
        if self.level == "token":
            return list(self.doc.tokens)
        labels: dict[int, str] = {}
        for token, word in zip(self.doc.tokens, self.doc.word_index, strict=True):
            labels[word] = labels.get(word, "") + strip_subword_markers(token)
        return [labels[w] for w in sorted(labels)]

    def first_keys(self, names: Sequence[str], layer: int) -> torch.Tensor | None:
        """[size]: the first key (token or word) each row of `layer` sees in measures `names` (`group_window`);
        None: key 0 for every row (full attention)."""
        window = group_window(names, layer, self.sliding_windows)
        if window is None:
            return None
        first = first_visible_key(self.doc.n_tokens, window)  # [token]
        return first if self.level == "token" else first_key_words(first, self.doc.word_index)

    def to_word_level(self) -> DocAttention:
        """Clark et al. (2019) aggregation of every measure: mean over query pieces, sum over key pieces."""
        if self.level == "word":
            return self
        index = self.doc.word_index
        return DocAttention(
            doc=self.doc,
            level="word",
            head_measures={k: to_words(v, index) for k, v in self.head_measures.items()},
            layer_measures={k: to_words(v, index) for k, v in self.layer_measures.items()},
            sliding_windows=self.sliding_windows,
        )


@dataclass
class BatchAnalysis:
    """One batch's measures as computed, padded, per layer; per-document views on demand.

    per_layer: name → per layer [batch, head, query, key] (head measures) or [batch, query, key] (layer
    measures), padded to the batch's longest document; NaN for a layer or document a measure was not computed
    for (value zeroing outside its `ZeroingScope`: `layer_pass.computed_documents`). Batch-wide consumers (tables, head statistics,
    similarity) read these directly; `docs` trims each document out (a copy) for per-document use.
    sliding_windows: per layer, the model's sliding window (None: full attention; empty: none in any layer).
    """

    batch: EncodedBatch
    level: str
    per_layer: dict[str, list[torch.Tensor]]
    verification: VerificationReport | None
    sliding_windows: list[int | None] = field(default_factory=list)

    def first_keys(self, names: Sequence[str], layer: int) -> torch.Tensor | None:
        """[query]: the first key each row of `layer` sees in measures `names` (`group_window`), token level;
        None: key 0 for every row (full attention)."""
        window = group_window(names, layer, self.sliding_windows)
        mask = self.batch.attention_mask
        return None if window is None else first_visible_key(mask.shape[-1], window, mask.device)

    @cached_property
    def docs(self) -> list[DocAttention]:
        docs = []
        for i, doc in enumerate(self.batch.docs):
            n = doc.n_tokens
            # Trim padding before stacking layers: copies only the real [query, key] block of each document.
            trimmed = {name: torch.stack([t[i, ..., :n, :n] for t in values]).float().cpu()
                       for name, values in self.per_layer.items()}
            result = DocAttention(
                doc=doc,
                level="token",
                head_measures={k: v for k, v in trimmed.items() if k in M.HEAD_MEASURES},
                layer_measures={k: v for k, v in trimmed.items() if k in M.LAYER_MEASURES},
                sliding_windows=self.sliding_windows,
            )
            docs.append(result.to_word_level() if self.level == "word" else result)
        return docs


def validate_measures(measures: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in measures if m not in M.MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {', '.join(unknown)}; choose from: {', '.join(M.MEASURES)}")
    return tuple(dict.fromkeys(measures))


@torch.inference_mode()
def analyse_batch(
    loaded: LoadedModel,
    batch: EncodedBatch,
    measures: Sequence[str] = M.DEFAULT_MEASURES,
    verify: bool = True,
    atol: float = 1e-5,
    level: str = "token",
    eager: bool = True,
    rtol: float = DEFAULT_RTOL,
    zeroing: ZeroingScope | None = None,
) -> BatchAnalysis:
    """Forward `batch`, rebuild every layer's attention, verify it and compute `measures` (value zeroing only
    for the layers and documents of `zeroing`, default all).

    eager (the verification suite's default): Hugging Face's eager kernel returns its patterns; verified
    batches rebuild q, k, v, the pattern and z from the weights and compare them with the model's.
    Otherwise (a run's batches between two comparisons): the model runs its sdpa kernel and the pattern is
    computed once, from the q and k the kernel received; verified batches probe q, k, v against the weights
    and the pattern against the kernel's z (`core.probes`). Attribution measures that re-run layers, and
    models that cannot switch kernels, always take the eager path.
    """
    measures = validate_measures(measures)
    adapter = loaded.adapter
    attribution = AttributionPass(adapter, batch.attention_mask, measures, zeroing)  # alti, globenc, value_zeroing …
    eager = eager or bool(attribution.wanted) or not supports_sdpa_recording(adapter.model)
    with attribution.recording_forward():
        capture = run_with_capture(adapter, batch.model_inputs, eager=eager)
    all_weights = adapter.all_layer_weights()
    sliding_windows = [w.sliding_window for w in all_weights]
    masks = layer_masks(batch.attention_mask, adapter.causal, sliding_windows, capture.hidden_in[0].dtype)
    report = VerificationReport(adapter.n_layers, adapter.n_heads, atol=atol, rtol=rtol) if verify else None
    specs = [M.REGISTRY[name] for name in measures]
    in_loop = [(spec.name, spec.function("per_layer")) for spec in specs if spec.per_layer is not None]
    needs_values = any(spec.needs_values for spec in specs) or attribution.needs_values
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name, _ in in_loop}
    patterns: list[torch.Tensor] = []
    for layer, weights in enumerate(all_weights):
        x = capture.hidden_in[layer]  # [batch, pos, d_model]
        v: torch.Tensor | None  # [batch, head, key, d_head]
        if not eager:
            q, k, kv_v = capture.kernel_inputs[layer]  # as the sdpa kernel received them
            # In float32 whatever the model's dtype: the sdpa kernel accumulates in float32 too, so a bfloat16
            # run's z probe compares like with like; the pattern is stored in the model's dtype, as eager's is.
            _, pattern = attention_pattern(q.float(), k.float(), weights, masks[layer], scale_query=True)  # [b, h, q, k]
            if report is not None:
                report.add_probes(
                    layer,
                    projection_errors(x, weights, q, k, kv_v, capture.position_embeddings[layer], seed=layer),
                    z_probe_errors(pattern, kv_v.float(), capture.z[layer], batch.attention_mask, weights, seed=layer),
                )
            pattern = pattern.to(q.dtype)
            v = per_query_head(kv_v, weights) if needs_values else None
            capture.kernel_inputs[layer] = None  # type: ignore[call-overload]
        elif report is not None:
            rec = recompute_attention(x, weights, masks[layer], capture.position_embeddings[layer])
            report.add(layer, *layer_errors(capture.attentions[layer], rec.pattern, capture.z[layer], rec.z, batch.attention_mask))
            pattern, v = rec.pattern, rec.v
        else:
            # Unverified batch (verify every:N / off): Hugging Face's pattern, which verified batches showed to
            # equal the recomputation; only V is projected, for the value-weighted measures.
            pattern = capture.attentions[layer]
            v = project_values(x, weights) if needs_values else None
        patterns.append(pattern)
        attribution.add_layer(layer, x, pattern, v, weights)
        # Let go of this layer's captured tensors now: peak memory then holds one layer's extra copies, not all.
        capture.hidden_in[layer] = capture.z[layer] = None  # type: ignore[call-overload]
        if eager:
            capture.attentions[layer] = None  # type: ignore[call-overload]
        inputs = LayerInputs(pattern=pattern, v=v, weights=weights)
        for name, compute in in_loop:
            per_layer[name].append(compute(inputs))
    for spec in specs:
        if spec.across_layers is not None:
            per_layer[spec.name] = spec.function("across_layers")(patterns)
    per_layer.update(attribution.finish())
    per_layer = {name: per_layer[name] for name in measures}  # in the order asked
    if report is not None:
        report.n_docs = len(batch.docs)
        report.n_docs_compared = len(batch.docs) if eager else 0
    return BatchAnalysis(batch=batch, level=level, per_layer=per_layer, verification=report,
                         sliding_windows=sliding_windows)


@torch.inference_mode()
def decomposition_error(loaded: LoadedModel, batch: EncodedBatch) -> list[float]:
    """Per layer, max |Σ_h Σ_j α_hij f_h(x_j) + b_O − (the model's output projection)| over real tokens.

    Zero (up to float error) proves `value_norm` is built from the weights the model really uses.
    """
    adapter = loaded.adapter
    capture = run_with_capture(adapter, batch.model_inputs)
    all_weights = adapter.all_layer_weights()
    masks = layer_masks(batch.attention_mask, adapter.causal, [w.sliding_window for w in all_weights],
                        capture.hidden_in[0].dtype)
    real = batch.attention_mask.bool()[:, :, None]
    errors = []
    for layer, weights in enumerate(all_weights):
        rec = recompute_attention(capture.hidden_in[layer], weights, masks[layer], capture.position_embeddings[layer])
        rebuilt = attention_output(rec.pattern, value_vectors_out(rec.v, weights), weights)
        errors.append(float(((rebuilt - capture.attn_out[layer]).abs() * real).max()))
    return errors
