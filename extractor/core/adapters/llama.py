"""Llama (and models converted to it, such as SmolLM2): the plain rotary layout, grouped-query attention."""

from __future__ import annotations

from extractor.core.adapters.rotary import RotaryAdapter


class LlamaAdapter(RotaryAdapter):
    model_types = ("llama",)
    family = "llama"
