"""Forward hooks that record what each attention layer actually received and produced.

Per layer, one forward pass records:
- `hidden_in`: the hidden states the attention module projects Q, K, V from   [batch, pos, d_model]
- `z`: the per-head mixture entering the output projection                    [batch, pos, head, d_head]
- `attn_out`: the output projection's result, before dropout/residual/LayerNorm [batch, pos, d_model]
plus, on the eager kernel, Hugging Face's own `output_attentions`                [batch, head, query, key]
or, on the recording sdpa kernel (`sdpa_capture`), the q, k, v each layer handed it
                                                            [batch, head or kv_head, pos, d_head] each
and, for rotary models, the `position_embeddings` (cos, sin) the attention module was handed
                                                                                [batch or 1, pos, rotary_dims]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from extractor.core.adapters.base import ModelAdapter
from extractor.core.sdpa_capture import KernelInputs, sdpa_recording
from extractor.errors import UserError


class MissingAttentionsError(UserError, RuntimeError):
    """The model did not return one attention tensor per layer."""


@dataclass
class ForwardCapture:
    hidden_in: list[torch.Tensor] = field(default_factory=list)  # per layer [batch, pos, d_model]
    z: list[torch.Tensor] = field(default_factory=list)  # per layer [batch, pos, head, d_head]
    attn_out: list[torch.Tensor] = field(default_factory=list)  # per layer [batch, pos, d_model]
    attentions: list[torch.Tensor] = field(default_factory=list)  # per layer [batch, head, query, key] (HF; eager)
    kernel_inputs: list[KernelInputs] = field(default_factory=list)  # per layer (q, k, v) the sdpa kernel received
    # per layer (cos, sin), each [batch or 1, pos, rotary_dims]; None where the module was handed none
    position_embeddings: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


def run_with_capture(adapter: ModelAdapter, model_inputs: dict[str, torch.Tensor], eager: bool = True) -> ForwardCapture:
    """Run one forward pass recording every layer's attention I/O.

    eager: Hugging Face's eager kernel with `output_attentions=True` (its patterns come back); otherwise the
    recording sdpa kernel (no patterns; the q, k, v it received instead).
    """
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    capture = ForwardCapture()
    hidden_in: list[torch.Tensor | None] = [None] * n_layers
    z: list[torch.Tensor | None] = [None] * n_layers
    attn_out: list[torch.Tensor | None] = [None] * n_layers
    rotary: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
    handles = []
    for layer, (attention, projection) in enumerate(
        zip(adapter.attention_modules(), adapter.output_projections(), strict=True)
    ):
        def record_input(module, args, kwargs, layer=layer):
            hidden_in[layer] = _first_tensor(args, kwargs).detach()
            cos_sin = kwargs.get("position_embeddings")
            rotary[layer] = None if cos_sin is None else (cos_sin[0].detach(), cos_sin[1].detach())

        def record_z(module, args, layer=layer):
            flat = args[0].detach()  # [batch, pos, head·d_head]
            z[layer] = flat.reshape(*flat.shape[:-1], n_heads, flat.shape[-1] // n_heads)

        def record_out(module, args, output, layer=layer):
            attn_out[layer] = output.detach()

        handles.append(attention.register_forward_pre_hook(record_input, with_kwargs=True))
        handles.append(projection.register_forward_pre_hook(record_z))
        handles.append(projection.register_forward_hook(record_out))
    try:
        if eager:
            outputs = adapter.model(**model_inputs, output_attentions=True)
        else:
            with sdpa_recording(adapter.model) as kernel_inputs:
                adapter.model(**model_inputs)
    finally:
        for handle in handles:
            handle.remove()
    if any(t is None for t in (*hidden_in, *z, *attn_out)):
        raise MissingAttentionsError("a capture hook did not fire; the model's layout does not match its adapter")
    capture.hidden_in = hidden_in  # type: ignore[assignment]
    capture.z = z  # type: ignore[assignment]
    capture.attn_out = attn_out  # type: ignore[assignment]
    capture.position_embeddings = rotary
    if not eager:
        if len(kernel_inputs) != n_layers:
            raise MissingAttentionsError(
                f"the sdpa kernel was called {len(kernel_inputs)} times for {n_layers} layers; this model does not "
                "dispatch attention through Hugging Face's attention interface")
        capture.kernel_inputs = kernel_inputs
        return capture
    attentions = getattr(outputs, "attentions", None)
    if attentions is None or len(attentions) != n_layers or any(a is None for a in attentions):
        got = "none" if attentions is None else f"{sum(a is not None for a in attentions)}"
        raise MissingAttentionsError(
            f"the model returned {got} attention tensors for {n_layers} layers; load it with "
            "attn_implementation='eager' (sdpa and flash attention return no weights)"
        )
    capture.attentions = [a.detach() for a in attentions]
    return capture
