"""The attribution measures inside `analysis.analyse_batch`: record during the forward pass, compute per layer.

`alti` and `globenc` are stored rolled out (as both papers report them); `value_zeroing` per layer (as its
paper reports it). All three are layer-level measures (head = -1), 0 on keys a row cannot see and on padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from extractor.attribution.alti import alti_layer
from extractor.attribution.decompose import NormParams
from extractor.attribution.globenc import globenc_layer
from extractor.attribution.measures import ATTRIBUTION_MEASURES
from extractor.attribution.replay import LayerRecording, ZeroedValueLayer, record_layers
from extractor.attribution.rollout import chain
from extractor.attribution.value_zeroing import value_zeroing_scores, zeroing_distances
from extractor.core.adapters import ADAPTERS
from extractor.core.adapters.base import AttentionWeights, ModelAdapter
from extractor.core.recompute import value_vectors_out, visible_cells, visible_range
from extractor.errors import UserError

# Measures that decompose through the LayerNorm after each residual sum: defined for post-LN encoders only.
POST_NORM_MEASURES = ("alti", "globenc")


def check_supported(adapter: ModelAdapter, measures: Sequence[str]) -> None:
    """A `UserError` naming the method, the family and why, for a measure the family's layout does not define."""
    for name in POST_NORM_MEASURES:
        if name in measures and adapter.norm_placement != "post":
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
    """Collects `alti`, `globenc` and `value_zeroing` for one batch; does nothing when none is requested."""

    def __init__(self, adapter: ModelAdapter, attention_mask: torch.Tensor, measures: Sequence[str]) -> None:
        self.wanted = tuple(m for m in ATTRIBUTION_MEASURES if m in measures)
        check_supported(adapter, self.wanted)
        self.adapter = adapter
        self.attention_mask = attention_mask
        self.recording: LayerRecording | None = None
        self.per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in self.wanted}
        self._visible: dict[int | None, torch.Tensor] = {}  # sliding window → visibility

    @property
    def needs_values(self) -> bool:
        """Whether `add_layer` needs V (ALTI and GlobEnc decompose f_h(x_j))."""
        return any(m in self.wanted for m in POST_NORM_MEASURES)

    @contextmanager
    def recording_forward(self) -> Iterator[None]:
        """Wrap the forward pass: records layer calls/outputs and FFN LayerNorm inputs only when needed."""
        if not self.wanted:
            yield
            return
        calls = "value_zeroing" in self.wanted
        with record_layers(self.adapter, calls=calls, output_norm_inputs="globenc" in self.wanted) as recording:
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
            if "alti" in self.wanted:
                self.per_layer["alti"].append(alti_layer(pattern, f, x, weights.b_O, NormParams.of(attention_norm), visible))
            if "globenc" in self.wanted:
                norm_input = self.recording.output_norm_inputs[layer]
                assert norm_input is not None, "the output LayerNorm's hook did not fire"
                self.per_layer["globenc"].append(globenc_layer(
                    pattern, f, x, weights.b_O, NormParams.of(attention_norm), NormParams.of(output_norm), norm_input,
                    visible,
                ))
                self.recording.output_norm_inputs[layer] = None
        if "value_zeroing" in self.wanted:
            call, original = self.recording.calls[layer], self.recording.outputs[layer]
            assert call is not None and original is not None, "a layer hook did not fire"
            distances = zeroing_distances(ZeroedValueLayer(self.adapter, layer, call), original, original.shape[1])
            self.per_layer["value_zeroing"].append(value_zeroing_scores(distances, visible).to(pattern.dtype))
            self.recording.calls[layer] = self.recording.outputs[layer] = None

    def finish(self) -> dict[str, list[torch.Tensor]]:
        """name → per layer [batch, query, key]: ALTI and GlobEnc rolled out, value zeroing per layer."""
        return {name: chain(values) if name in POST_NORM_MEASURES else values for name, values in self.per_layer.items()}
