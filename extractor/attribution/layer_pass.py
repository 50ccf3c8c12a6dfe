"""The attribution measures inside `analysis.analyse_batch`: record during the forward pass, compute per layer.

Three per-layer matrices are built here: ALTI's C_l, GlobEnc's N_l and value zeroing's VZ_l. The measures
registered with `attribution=` take one of them as it is (`alti_layer`, `globenc_layer`, `value_zeroing`) or
rolled out (`alti`, `globenc`). All are layer-level measures (head = -1), 0 on keys a row cannot see and on
padding. Value zeroing can be restricted to some layers and some documents (`ZeroingScope`); what it was not
computed for is NaN (`NOT_COMPUTED`), which tables leave out and agreement skips.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from extractor.attribution.alti import alti_layer
from extractor.attribution.decompose import NormParams
from extractor.attribution.globenc import globenc_layer
from extractor.attribution.measures import ATTRIBUTION_MEASURES, REGISTRY
from extractor.attribution.replay import LayerRecording, ZeroedValueLayer, record_layers
from extractor.attribution.rollout import chain
from extractor.attribution.value_zeroing import value_zeroing_scores, zeroing_distances
from extractor.core.adapters import ADAPTERS
from extractor.core.adapters.base import AttentionWeights, ModelAdapter
from extractor.core.recompute import value_vectors_out, visible_cells, visible_range
from extractor.errors import UserError

# Per-layer matrices that decompose through the LayerNorm after each residual sum: post-LN encoders only.
POST_NORM_MATRICES = ("alti", "globenc")
NOT_COMPUTED = float("nan")  # fills a measure's matrix for a layer or document it was not computed for


def computed_documents(matrix: torch.Tensor) -> torch.Tensor:
    """[batch] bool: the documents a measure's matrix [batch, ..., query, key] holds values for (not NaN)."""
    return ~matrix[(slice(None),) + (0,) * (matrix.dim() - 1)].isnan()


@dataclass(frozen=True)
class ZeroingScope:
    """Where value zeroing is computed in one batch (None: everywhere); elsewhere its matrices are NaN."""

    layers: Collection[int] | None = None  # layer indices
    documents: Sequence[bool] | None = None  # [batch]: whether each document of the batch is intervened on

    def rows(self, batch: int) -> torch.Tensor:
        """[chosen] the batch indices of the documents intervened on."""
        if self.documents is None:
            return torch.arange(batch)
        assert len(self.documents) == batch, "one flag per document of the batch"
        return torch.tensor([i for i, chosen in enumerate(self.documents) if chosen], dtype=torch.long)

    def covers(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


def layers_out_of_range(layers: Collection[int] | None, n_layers: int) -> list[int]:
    """The layer indices in `layers` that a model of `n_layers` layers does not have."""
    return sorted(layer for layer in layers or () if not 0 <= layer < n_layers)


def check_supported(adapter: ModelAdapter, measures: Sequence[str]) -> None:
    """A `UserError` naming the method, the family and why, for a measure the family's layout does not define."""
    for name in measures:
        if REGISTRY[name].attribution in POST_NORM_MATRICES and adapter.norm_placement != "post":
            post_norm = ", ".join(t for a in ADAPTERS if a.norm_placement == "post" for t in a.model_types)
            raise UserError(
                f"measure '{name}' is not available for {adapter.family} models: it decomposes the residual sum "
                f"through the LayerNorm that follows it (post-LayerNorm encoders: {post_norm}), and "
                f"{adapter.family} normalises before each sublayer instead; use 'value_zeroing', which only "
                f"re-runs the layer"
            )


def visibility(attention_mask: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """[batch, query, key] bool: key j is visible to real row i (padding rows see nothing; a sliding window
    hides the keys before it)."""
    lengths = attention_mask.sum(dim=-1)  # [batch]
    return visible_cells(*visible_range(lengths, attention_mask.shape[-1], causal, window))


class AttributionPass:
    """Collects the attribution measures for one batch; does nothing when none is requested."""

    def __init__(
        self, adapter: ModelAdapter, attention_mask: torch.Tensor, measures: Sequence[str],
        zeroing: ZeroingScope | None = None,
    ) -> None:
        self.wanted = tuple(m for m in ATTRIBUTION_MEASURES if m in measures)
        check_supported(adapter, self.wanted)
        self.adapter = adapter
        self.attention_mask = attention_mask
        self.zeroing = zeroing or ZeroingScope()
        self.zeroing_rows = self.zeroing.rows(attention_mask.shape[0])  # [chosen]
        self.recording: LayerRecording | None = None
        # the per-layer matrices the wanted measures are built from: "alti", "globenc", "value_zeroing"
        matrices = dict.fromkeys(REGISTRY[m].attribution for m in self.wanted)
        self.per_layer: dict[str, list[torch.Tensor]] = {str(name): [] for name in matrices}
        self._visible: dict[int | None, torch.Tensor] = {}  # sliding window → visibility

    @property
    def needs_values(self) -> bool:
        """Whether `add_layer` needs V (ALTI and GlobEnc decompose f_h(x_j))."""
        return any(m in self.per_layer for m in POST_NORM_MATRICES)

    @property
    def zeroes_values(self) -> bool:
        """Whether this batch re-runs any layer (value zeroing wanted for some layer and some document)."""
        return "value_zeroing" in self.per_layer and len(self.zeroing_rows) > 0 and (
            self.zeroing.layers is None or len(self.zeroing.layers) > 0)

    @contextmanager
    def recording_forward(self) -> Iterator[None]:
        """Wrap the forward pass: records layer calls/outputs and FFN LayerNorm inputs only when needed."""
        if not self.wanted:
            yield
            return
        with record_layers(self.adapter, calls=self.zeroes_values,
                           output_norm_inputs="globenc" in self.per_layer) as recording:
            self.recording = recording
            yield

    def visible(self, window: int | None = None) -> torch.Tensor:
        """[batch, query, key] bool: the keys each row of a layer with this sliding window sees (None: full)."""
        if window not in self._visible:
            self._visible[window] = visibility(self.attention_mask, self.adapter.causal, window)
        return self._visible[window]

    def add_layer(
        self, layer: int, x: torch.Tensor, pattern: torch.Tensor, v: torch.Tensor | None, weights: AttentionWeights
    ) -> None:
        """x: the attention's input [batch, pos, d_model] (post-LN: the layer's input), pattern [batch, head,
        query, key], v [batch, head, key, d_head] (None unless `needs_values`)."""
        if not self.wanted:
            return
        assert self.recording is not None, "add_layer before the recorded forward pass"
        visible = self.visible(weights.sliding_window)
        if self.needs_values:
            assert v is not None
            f = value_vectors_out(v, weights)  # [batch, head, key, d_model]
            attention_norm, output_norm = self.adapter.sublayer_norms()[layer]
            if "alti" in self.per_layer:
                self.per_layer["alti"].append(alti_layer(pattern, f, x, weights.b_O, NormParams.of(attention_norm), visible))
            if "globenc" in self.per_layer:
                norm_input = self.recording.output_norm_inputs[layer]
                assert norm_input is not None, "the output LayerNorm's hook did not fire"
                self.per_layer["globenc"].append(globenc_layer(
                    pattern, f, x, weights.b_O, NormParams.of(attention_norm), NormParams.of(output_norm), norm_input,
                    visible,
                ))
                self.recording.output_norm_inputs[layer] = None
        if "value_zeroing" in self.per_layer:
            self.per_layer["value_zeroing"].append(self.value_zeroing(layer, visible, pattern.dtype))

    def value_zeroing(self, layer: int, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """VZ_l [batch, query, key] for the documents and layer in scope; NaN (`NOT_COMPUTED`) elsewhere."""
        assert self.recording is not None
        call, original = self.recording.calls[layer], self.recording.outputs[layer]
        self.recording.calls[layer] = self.recording.outputs[layer] = None
        scores = torch.full(visible.shape, NOT_COMPUTED, dtype=dtype, device=visible.device)  # [batch, query, key]
        if not (self.zeroes_values and self.zeroing.covers(layer)):
            return scores
        assert call is not None and original is not None, "a layer hook did not fire"
        rows = self.zeroing_rows.to(visible.device)  # [chosen]
        if len(rows) < visible.shape[0]:
            call, original = call.documents(rows), original.index_select(0, rows)
        distances = zeroing_distances(ZeroedValueLayer(self.adapter, layer, call), original, original.shape[1])
        scores[rows] = value_zeroing_scores(distances, visible.index_select(0, rows)).to(dtype)
        return scores

    def finish(self) -> dict[str, list[torch.Tensor]]:
        """name → per layer [batch, query, key]: each wanted measure's matrices, rolled out where it says so."""
        result = {}
        for name in self.wanted:
            spec = REGISTRY[name]
            assert spec.attribution is not None
            matrices = self.per_layer[spec.attribution]
            result[name] = chain(matrices) if spec.rolled_out else matrices
        return result
