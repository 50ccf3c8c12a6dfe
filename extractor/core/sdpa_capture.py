"""The fast forward: the model runs its own `sdpa` attention kernel, and what each layer hands it is recorded.

Hugging Face's modeling files call their attention kernel through the attention interface
(`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`). `SDPA_RECORDING` registers one more entry there: Hugging
Face's own `sdpa_attention_forward`, run unchanged, that also records its inputs, per layer in call order:

    q: [batch, head, pos, d_head]      after the projection, any per-head norm and the rotation
    k, v: [batch, kv_head, pos, d_head] likewise (grouped-query attention: one per key/value head)

The sdpa kernel never materialises the pattern. The extractor computes it once, from these q and k, with the
shared recomputation (`recompute.attention_pattern`); `probes` then checks q, k, v against the weights and
the pattern against the z the kernel produced. The implementation is switched only for the one forward pass
(`sdpa_recording`), and back, so every other call (eager comparisons, layer re-runs) is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_RECORDING = "extractor_sdpa"

KernelInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (q, k, v) as the kernel received them
_recorded: ContextVar[list[KernelInputs] | None] = ContextVar("extractor_sdpa_recorded", default=None)


def recording_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Hugging Face's sdpa attention, plus a record of (query, key, value) when a recording is open."""
    recorded = _recorded.get()
    if recorded is not None:
        recorded.append((query.detach(), key.detach(), value.detach()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(SDPA_RECORDING, recording_sdpa_attention)
AttentionMaskInterface.register(SDPA_RECORDING, sdpa_mask)  # the masks Hugging Face builds for its sdpa path


def supports_sdpa_recording(model: PreTrainedModel) -> bool:
    """Whether the model dispatches attention through the attention interface (it can switch implementation)."""
    return bool(getattr(model, "_supports_sdpa", False)) and model._can_set_attn_implementation()


@contextmanager
def sdpa_recording(model: PreTrainedModel) -> Iterator[list[KernelInputs]]:
    """Run the model's forward passes inside on the recording sdpa kernel; yields the list it fills, one
    (q, k, v) per attention call in call order. The model's previous implementation is restored on exit."""
    previous = model.config._attn_implementation
    recorded: list[KernelInputs] = []
    token = _recorded.set(recorded)
    model.set_attn_implementation(SDPA_RECORDING)
    try:
        yield recorded
    finally:
        model.set_attn_implementation(previous)
        _recorded.reset(token)
