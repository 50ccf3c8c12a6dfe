"""Recording what each real layer received and produced, and running one layer again with value vectors zeroed.

`record_layers` hooks the adapter's layer modules during the ordinary forward pass: each layer's call (args and
kwargs as the model passed them: hidden states, the prepared mask, position ids ...), its output, and the input
of the FFN sublayer's LayerNorm. `ZeroedValueLayer` re-calls the same module on copies of that input in which
one key's value vector (all heads, bias included) is set to 0 by a forward hook on the value projection, so
the intervention runs the model's own code: attention, output projection, residuals, LayerNorms and FFN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from extractor.core.adapters.base import ModelAdapter


@dataclass
class LayerCall:
    """One layer module's call: args[0] is its input hidden states [batch, pos, d_model]."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args and isinstance(self.args[0], torch.Tensor) else self.kwargs["hidden_states"]

    def per_document(self, change: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """args and kwargs with `change` applied to every per-document tensor (first dimension = batch: hidden
        states, mask; inside tuples too, e.g. rotary (cos, sin)), caches dropped (a replay must not append to
        the model's cache), other values as they are."""
        batch = self.hidden.shape[0]

        def apply(value: Any) -> Any:
            if isinstance(value, Cache):
                return None
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return change(value)
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            return value

        return tuple(apply(a) for a in self.args), {k: apply(v) for k, v in self.kwargs.items()}

    def documents(self, rows: torch.Tensor) -> LayerCall:
        """The same call for the documents `rows` ([chosen] batch indices) of the batch only."""
        args, kwargs = self.per_document(lambda t: t.index_select(0, rows.to(t.device)))
        return LayerCall(args=args, kwargs=kwargs)

    def expanded(self, copies: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call on `copies` copies of each document ([batch·copies, pos, d_model], copies of a document
        adjacent), no attention weights returned."""
        args, kwargs = self.per_document(lambda t: t.repeat_interleave(copies, dim=0))
        for flag in ("use_cache", "output_attentions"):
            if flag in kwargs:
                kwargs[flag] = False
        return args, kwargs


@dataclass
class LayerRecording:
    """Per layer, what `record_layers` saw (None where not asked for)."""

    calls: list[LayerCall | None] = field(default_factory=list)
    outputs: list[torch.Tensor | None] = field(default_factory=list)  # per layer [batch, pos, d_model]
    output_norm_inputs: list[torch.Tensor | None] = field(default_factory=list)  # per layer [batch, pos, d_model]


def first_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def record_layers(adapter: ModelAdapter, calls: bool, output_norm_inputs: bool) -> Iterator[LayerRecording]:
    """Hooks active inside the `with` block; the forward pass run there fills the recording."""
    n = adapter.n_layers
    recording = LayerRecording(calls=[None] * n, outputs=[None] * n, output_norm_inputs=[None] * n)
    handles = []
    try:
        for layer, module in enumerate(adapter.layer_modules()):
            if calls:
                def record_call(module, args, kwargs, layer=layer):
                    recording.calls[layer] = LayerCall(args=tuple(args), kwargs=dict(kwargs))

                def record_output(module, args, output, layer=layer):
                    recording.outputs[layer] = first_tensor(output).detach()

                handles.append(module.register_forward_pre_hook(record_call, with_kwargs=True))
                handles.append(module.register_forward_hook(record_output))
            if output_norm_inputs:
                def record_norm_input(module, args, layer=layer):
                    recording.output_norm_inputs[layer] = args[0].detach()

                handles.append(adapter.sublayer_norms()[layer][1].register_forward_pre_hook(record_norm_input))
        yield recording
    finally:
        for handle in handles:
            handle.remove()


class ZeroedValueLayer:
    """Layer `layer` of the real model, re-run on copies of its recorded input with chosen value vectors zeroed."""

    def __init__(self, adapter: ModelAdapter, layer: int, call: LayerCall) -> None:
        self.module = adapter.layer_modules()[layer]
        self.value_module, self.value_slice = adapter.value_output(layer)
        self.call = call

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """keep [batch, copies, pos] (1 keeps a value vector, 0 zeroes it) → outputs [batch, copies, pos, d_model]."""
        batch, copies, n = keep.shape
        flat_keep = keep.reshape(batch * copies, n, 1).to(self.call.hidden.dtype)  # [batch·copies, pos, 1]

        def zero_values(module, args, output):
            output[..., self.value_slice] *= flat_keep  # [batch·copies, pos, value features]
            return output

        args, kwargs = self.call.expanded(copies)  # hidden states [batch·copies, pos, d_model]
        handle = self.value_module.register_forward_hook(zero_values)
        try:
            out = first_tensor(self.module(*args, **kwargs))  # [batch·copies, pos, d_model]
        finally:
            handle.remove()
        return out.view(batch, copies, n, -1)
